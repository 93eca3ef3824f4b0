"""envs.rollout.run_episode against a scripted OpenAI-compatible policy server and our retrieval server (127.0.0.1).

The policy (masksearch_rl.cot.scripted) searches the oracle chain of a synthetic question and answers once an
<information> block holds the answer; every layout (chat turns, vLLM continue_final_message, /v1/completions) and
both stop-string conventions (kept by vLLM, stripped OpenAI-style) must give the same, well-formed episode.
"""

from __future__ import annotations

import asyncio

import pytest

from envs.prompts import SEARCH_LIMIT_REACHED, qa_messages
from envs.rollout import ChatPolicy, CompletionPolicy, PolicyReply, close_turn, make_search_env, run_episode
from envs.search_client import close_shared_backends
from masksearch_rl.cot.scripted import ScriptedServer
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.llm import LLMClient, LLMConfig
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.synthetic import write_synthetic_corpus
from reward.format import check_format


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-world")
    write_synthetic_corpus(root, num_passages=120, num_questions=6, seed=3, hops=(2,), progress=False)
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    questions = read_jsonl(root / "questions.jsonl")
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url, ScriptedServer(questions) as llm:
        yield questions, url, llm


class _Tokenizer:
    """Stands in for a chat template: ChatML rendering as text."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _policies(llm_url: str):
    client = LLMClient(LLMConfig(base_url=llm_url, model="scripted", api_key_env="ROLLOUT_TEST_KEY", timeout_s=5))
    return {
        "turns": ChatPolicy(client, mode="turns"),
        "continue": ChatPolicy(client, mode="continue"),
        "turns-openai-stop": ChatPolicy(client, mode="turns", vllm_stop_params=False),
        "completions": CompletionPolicy(client, _Tokenizer()),
    }


def test_every_layout_gives_the_same_correct_episode(setup):
    questions, url, llm = setup

    async def run():
        search = make_search_env({"backend": {"type": "server", "url": url}, "topk": 3})
        out = {}
        for name, policy in _policies(llm.base_url).items():
            out[name] = [await run_episode(policy, search, qa_messages(q["question"]), max_turns=4) for q in questions]
        await close_shared_backends()
        return out

    results = asyncio.run(run())
    answered = 0
    for name, episodes in results.items():
        for question, episode in zip(questions, episodes):
            assert episode.errors == [], (name, episode.errors)
            if episode.finish == "answer":
                answered += 1
                assert episode.answer == question["answer"]
                assert check_format(episode.raw).ok, (name, episode.raw)
                assert episode.searches[0] == question["oracle_queries"][0]
                messages = episode.to_messages()
                assert [m["role"] for m in messages[2:]] == ["assistant", "tool"] * episode.search_count + [
                    "assistant"]
    assert answered >= 0.6 * sum(len(e) for e in results.values())
    first = [[e.raw for e in eps] for eps in results.values()]
    assert all(raws == first[0] for raws in first), "layouts and stop conventions must not change the episode"


def test_limits_errors_and_stop_repair(setup):
    questions, url, llm = setup
    llm.behaviour.update({questions[0]["id"]: "loop", questions[1]["id"]: "429", questions[2]["id"]: "garbage"})

    async def run():
        search = make_search_env({"backend": {"type": "server", "url": url}})
        client = LLMClient(LLMConfig(base_url=llm.base_url, model="s", max_retries=1, api_key_env="ROLLOUT_TEST_KEY"))
        policy = ChatPolicy(client)
        episodes = [await run_episode(policy, search, qa_messages(q["question"]), max_turns=2, max_policy_calls=10)
                    for q in questions[:3]]
        await close_shared_backends()
        return episodes

    try:
        loop, limited, garbage = asyncio.run(run())
    finally:
        llm.behaviour.clear()
    assert loop.finish == "search_limit" and loop.search_count == 4
    assert loop.turns[2].information == SEARCH_LIMIT_REACHED.format(limit=2) and loop.turns[3].information is None
    # Hitting the limit is the policy's move, counted apart from failed searches (as the RL loop's fields are).
    assert (loop.search_errors, loop.search_limit_hits) == (0, 2) and loop.to_dict()["search_limit_hits"] == 2
    assert limited.finish == "policy_error" and "429" in limited.errors[0]
    assert garbage.finish == "no_tag" and garbage.answer is None
    assert close_turn(PolicyReply("<think> a </think><search> q", "stop")) == (
        "<think> a </think><search> q</search>", "</search>")
    assert close_turn(PolicyReply("<search> q", "length"))[1] is None
    assert close_turn(PolicyReply("x <answer> y </answer> tail <search> z </search>", "stop"))[0] == (
        "x <answer> y </answer>")


def test_exclusion_hides_passages_from_every_search_of_the_episode(setup):
    """What eval and self-evolve would pass for a RAMP item: the hidden passages never reach <information>."""
    from envs.search_client import results_text
    from masksearch_rl.retrieval.exclusion import SearchExclusion

    questions, url, llm = setup
    question = questions[0]
    hidden = set(question["supporting_ids"])
    exclusion = SearchExclusion(ids=tuple(hidden))

    async def run():
        search = make_search_env({"backend": {"type": "server", "url": url}, "topk": 3})
        client = LLMClient(LLMConfig(base_url=llm.base_url, model="s", api_key_env="ROLLOUT_TEST_KEY", timeout_s=5))
        episode = await run_episode(ChatPolicy(client), search, qa_messages(question["question"]), max_turns=2,
                                    exclusion=exclusion)
        queries = [turn.query for turn in episode.turns if turn.information is not None and not turn.search_error]
        plain = await search.backend.search(queries, 3)
        shown = await search.backend.search(queries, 3, exclusion)
        await close_shared_backends()
        return episode, plain, shown

    episode, plain, shown = asyncio.run(run())
    assert episode.turns[0].query == question["oracle_queries"][0] and len(shown) >= 1
    assert hidden & {h.id for h in plain[0]}  # unhidden, the first hop's passage comes back
    answered = [turn for turn in episode.turns if turn.information is not None and not turn.search_error]
    for turn, hits in zip(answered, shown):
        assert turn.information == results_text(hits, 512) and not hidden & {h.id for h in hits}
