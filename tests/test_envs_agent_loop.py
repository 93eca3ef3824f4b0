"""The tag agent loop (envs/agent_loop.py) run by verl's own agent-loop machinery, on CPU.

Real pieces: the trainer config composed from verl's ``ppo_trainer``; the loop built from verl's registry by
``hydra.utils.instantiate`` exactly as ``AgentLoopWorker`` does (and, in one test, the whole ``AgentLoopWorker``
with padding and verl's naive reward manager); a tiny random ``Qwen2ForCausalLM`` with a BPE tokenizer trained here on
the synthetic world; a BM25 index of that world behind our retrieval server on 127.0.0.1. The only stand-in is the
LLM server: random weights never write tags, so :class:`ScriptedServer` follows a script per question, with token
ids from the real tokenizer and logprobs from the real model (``Free(n)`` samples n tokens from the model).
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import verl  # noqa: F401 - loads our verl.plugins entry point, which registers masksearch_agent
from hypothesis import given, settings
from hypothesis import strategies as st
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

# Taken before this file imports envs.agent_loop itself: what `import verl` alone registered.
REGISTERED_BY_VERL_IMPORT = dict(_agent_loop_registry)

import hydra  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, DictConfigWrap, ToolListWrap  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from envs.agent_loop import engine_decodes_text, stop_sampling_params  # noqa: E402
from envs.prompts import (  # noqa: E402
    SEARCH_EMPTY_QUERY,
    SEARCH_LIMIT_REACHED,
    SEARCH_QUERY_TOO_LONG,
    STOP_STRINGS,
    TAG_AGENT_NAME,
    TRUNCATION_MARKER,
    find_stop,
    information_block,
    parse_query,
    qa_messages,
    tokens_through_stop,
)
from envs.search_client import close_shared_backends, format_hits, truncate_to_budget  # noqa: E402
from masksearch_rl.retrieval.index import build_index, load_index  # noqa: E402
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server  # noqa: E402
from masksearch_rl.synthetic import write_synthetic_corpus  # noqa: E402

QUESTION = "Which country is Vyvutyr the capital of?"
OTHER_QUESTION = "Who is Osric Mumomy?"
RESPONSE_LENGTH = 384
TOPK = 2
MAX_INFO_TOKENS = 200
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_corpus(root, num_passages=60, num_questions=1, seed=0, progress=False)
    passages = [json.loads(line) for line in open(root / "corpus.jsonl")]
    assert passages[0]["title"] == "Vyvutyr"  # the questions above are about this world (seed 0)
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    return passages, retriever


@pytest.fixture(scope="module")
def retrieval_url(world):
    with running_server(create_app(world[1], ServerConfig(max_topk=10))) as url:
        yield url


@pytest.fixture(scope="module")
def slow_url():
    """A /retrieve that answers after 3 s, to hit the loop's own deadline."""
    app = FastAPI()

    @app.post("/retrieve")
    async def retrieve() -> dict:
        await asyncio.sleep(3)
        return {"result": [[]]}

    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def dead_url():
    """A port nothing listens on: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    """A BPE tokenizer trained on the world + the tags, with a ChatML template, and a random tiny Qwen2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    passages, _ = world
    tags = " ".join(["<think> </think> <search> </search> <information> </information> <answer> </answer>"] * 20)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([p["contents"] for p in passages] + [tags], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def lm(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def base_config(model_dir, retrieval_url):
    overrides = [
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.prompt_length=256",
        f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        # The documented way to configure the environment: a top-level `search_env` section.
        f"+search_env.backend.url={retrieval_url}",
        f"+search_env.topk={TOPK}",
        "+search_env.max_turns=3",
        f"+search_env.max_info_tokens={MAX_INFO_TOKENS}",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(autouse=True)
async def _close_backends():
    """Each test runs on its own event loop; close the connection pools opened on it."""
    yield
    await close_shared_backends()


def with_env(config, response_length: int | None = None, **search_env):
    """``config`` with ``search_env`` keys (and the response length) changed."""
    changes: dict = {"search_env": search_env}
    if response_length:
        changes["actor_rollout_ref"] = {"rollout": {"response_length": response_length}}
    config = copy.deepcopy(config)
    with open_dict(config):  # hydra's composed config is in struct mode
        config.merge_with(changes)
    return config


# --------------------------------------------------------------------------------------------- fake server
@dataclass
class Free:
    """``n`` tokens sampled from the tiny model (tag characters and special tokens excluded)."""

    n: int


class ScriptedServer:
    """Stands in for verl's LLM server client: same ``generate`` call, returns ``TokenOutput``.

    ``scripts`` maps a question to its turns; a new request id picks the script whose question is in the prompt,
    and each call of that request plays the next turn (a string, a ``Free``, or a list of both). Like vLLM with
    ``include_stop_str_in_output`` it ends a turn after the first stop string and at ``max_tokens``; with
    ``obey=False`` it ignores both, like a backend that does not support them.
    """

    def __init__(self, model, tokenizer, scripts: dict[str, list], obey: bool = True):
        self.model, self.tokenizer, self.obey = model, tokenizer, obey
        self.scripts = {question: list(turns) for question, turns in scripts.items()}
        self.playing: dict[str, list] = {}
        self.calls: list[dict] = []
        self.generator = torch.Generator().manual_seed(0)
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.banned = torch.tensor([t in tokenizer.all_special_tokens or "<" in t or ">" in t for t in vocab])

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        if request_id not in self.playing:
            prompt = self.tokenizer.decode(prompt_ids)
            (question,) = [q for q in self.scripts if q in prompt]
            self.playing[request_id] = self.scripts.pop(question)
        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids), "params": dict(sampling_params)})
        turn = self.playing[request_id].pop(0)
        ids: list[int] = []
        for piece in turn if isinstance(turn, list) else [turn]:
            if isinstance(piece, Free):
                ids += self._sample(list(prompt_ids) + ids, piece.n)
            else:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        if self.obey:
            ids = ids[: self._through_stop(ids, sampling_params.get("stop") or [])]
            ids = ids[: sampling_params["max_tokens"]]
        logprobs = self._logprobs(list(prompt_ids), ids) if sampling_params.get("logprobs") else None
        fields = {"global_steps": 7, "min_global_steps": 7, "max_global_steps": 7}
        return TokenOutput(token_ids=ids, log_probs=logprobs, num_preempted=0, extra_fields=fields)

    def _through_stop(self, ids: list[int], stops: list[str]) -> int:
        for k in range(1, len(ids) + 1):
            if any(stop in self.tokenizer.decode(ids[:k]) for stop in stops):
                return k
        return len(ids)

    @torch.no_grad()
    def _sample(self, context: list[int], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            logits = self.model(torch.tensor([context + out])).logits[0, -1]
            logits[self.banned] = float("-inf")
            out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator)))
        return out

    @torch.no_grad()
    def _logprobs(self, prompt: list[int], ids: list[int]) -> list[float]:
        if not ids:
            return []
        logits = self.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()


def make_loop(config, server, tokenizer):
    """Our loop, built the way AgentLoopWorker._run_agent_loop builds every agent loop."""
    return hydra.utils.instantiate(
        config=_agent_loop_registry[TAG_AGENT_NAME],
        trainer_config=DictConfigWrap(config=config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        hf_model_type="qwen2",
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap([]),
    )


async def rollout(config, server, tokenizer, question: str = QUESTION):
    loop = make_loop(config, server, tokenizer)
    return await loop.run(dict(SAMPLING), raw_prompt=qa_messages(question), extra_info={}, index=0)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def expected_info(world, tokenizer, query: str, budget: int = MAX_INFO_TOKENS) -> str:
    hits = world[1].search([query], TOPK)[0]
    return information_block(truncate_to_budget(format_hits(hits), budget, tokenizer))


# ------------------------------------------------------------------------------------------------------ tests
def test_import_verl_registers_the_loop():
    assert REGISTERED_BY_VERL_IMPORT[TAG_AGENT_NAME] == {"_target_": "envs.agent_loop.MaskSearchAgentLoop"}
    assert "masksearch_rl.verl_plugins" in sys.modules


async def test_search_then_answer(base_config, tokenizer, lm, world):
    turn1 = [Free(6), " <think> I need the country. </think>\n<search> Vyvutyr </search>"]
    turn2 = "<think> Doc 1 says it. </think>\n<answer> Kraimadon </answer>"
    server = ScriptedServer(lm, tokenizer, {QUESTION: [turn1, turn2]})
    out = await rollout(base_config, server, tokenizer)

    prompt_text = tokenizer.apply_chat_template(qa_messages(QUESTION), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(out.prompt_ids) == prompt_text
    first, second = server.calls
    t1_ids = out.response_ids[: out.response_mask.index(0)]  # 6 sampled tokens + the forced text
    assert tokenizer.decode(t1_ids).endswith(turn1[1]) and len(t1_ids) == 6 + len(enc(tokenizer, turn1[1]))
    info = expected_info(world, tokenizer, "Vyvutyr")
    info_ids, t2_ids = enc(tokenizer, info), enc(tokenizer, turn2)
    assert out.response_ids == t1_ids + info_ids + t2_ids
    assert tokenizer.decode(out.response_ids) == tokenizer.decode(t1_ids) + info + turn2
    body = info.split("<information>\n")[1].split("\n</information>")[0]
    assert body.startswith("Doc 1 (Title: Vyvutyr) Vyvutyr lies at an elevation of 215 metres.")
    assert "\nDoc 2 (Title: Vyvutyr) The city of Vyvutyr is the capital of" in body
    assert body.endswith(TRUNCATION_MARKER) and len(enc(tokenizer, body)) <= MAX_INFO_TOKENS + 2
    # Loss mask: the policy's tokens 1, the environment's 0; logprobs line up, 0.0 on the environment's tokens.
    assert out.response_mask == [1] * len(t1_ids) + [0] * len(info_ids) + [1] * len(t2_ids)
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs)
    assert all(lp == 0.0 for lp, m in zip(out.response_logprobs, out.response_mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(out.response_logprobs, out.response_mask) if m == 1)
    # The second turn continues from the exact ids of the first: prompt + policy tokens + information tokens.
    assert second["prompt_ids"] == out.prompt_ids + t1_ids + info_ids
    for call, used in ((first, 0), (second, len(t1_ids) + len(info_ids))):
        assert call["params"]["stop"] == STOP_STRINGS and call["params"]["include_stop_str_in_output"] is True
        assert call["params"]["max_tokens"] == RESPONSE_LENGTH - used
        assert call["request_id"] == first["request_id"]
    fields = out.extra_fields
    assert (fields["model_turns"], fields["search_count"], fields["search_calls"], fields["search_errors"]) == (
        2, 1, 1, 0)
    assert fields["finish_reason"] == "answer" and fields["response_truncated"] is False
    assert fields["search_latency_s"] > 0 and fields["info_tokens"] == len(info_ids)
    assert fields["min_global_steps"] == fields["max_global_steps"] == 7
    assert out.num_turns == 4  # prompt, policy, information, policy
    assert out.metrics.tool_calls == pytest.approx(fields["search_latency_s"], abs=1e-5)


async def test_the_rows_exclusion_hides_passages_from_every_search(base_config, tokenizer, lm, world):
    """A row exported with --hide-source: verl hands its ``tools_kwargs`` to ``run``; each search hides them."""
    first, second, *_ = world[1].search(["Vyvutyr"], 10)[0]
    tools_kwargs = {"search": {"create_kwargs": {
        "item_id": first.id, "exclude": {"ids": [first.id], "texts": [second.text]}}}}
    turns = ["<search> Vyvutyr </search>", "<search> Vyvutyr capital </search>", "<answer> Kraimadon </answer>"]
    server = ScriptedServer(lm, tokenizer, {QUESTION: list(turns)})
    loop = make_loop(with_env(base_config, max_info_tokens=60), server, tokenizer)  # both blocks fit the response
    out = await loop.run(dict(SAMPLING), raw_prompt=qa_messages(QUESTION), extra_info={}, index=0,
                         tools_kwargs=tools_kwargs)

    def hidden_info(query: str) -> str:
        hits = [h for h in world[1].search([query], 10)[0] if h.id != first.id and h.text != second.text][:TOPK]
        return information_block(truncate_to_budget(format_hits(hits), 60, tokenizer))

    expected = turns[0] + hidden_info("Vyvutyr") + turns[1] + hidden_info("Vyvutyr capital") + turns[2]
    assert tokenizer.decode(out.response_ids) == expected
    assert expected_info(world, tokenizer, "Vyvutyr", 60) != hidden_info("Vyvutyr")  # unhidden, the source shows
    assert out.extra_fields["search_calls"] == 2 and out.extra_fields["search_errors"] == 0


@pytest.mark.parametrize(
    "turn1, expected",
    [
        ("<search>   </search>", SEARCH_EMPTY_QUERY),
        ("<think> no opening tag </think> Vyvutyr </search>", SEARCH_EMPTY_QUERY),
        ("<search> " + "Vyvutyr river " * 60 + "</search>",
         SEARCH_QUERY_TOO_LONG.format(length=len(("Vyvutyr river " * 60).strip()), limit=100)),
    ],
    ids=["empty", "no-opening-tag", "too-long"],
)
async def test_bad_queries_get_an_error_text(base_config, tokenizer, lm, turn1, expected):
    server = ScriptedServer(lm, tokenizer, {QUESTION: [turn1, "<answer> Kraimadon </answer>"]})
    out = await rollout(with_env(base_config, max_query_chars=100), server, tokenizer)
    assert tokenizer.decode(out.response_ids) == turn1 + information_block(expected) + "<answer> Kraimadon </answer>"
    fields = out.extra_fields
    assert (fields["search_count"], fields["search_calls"], fields["search_errors"]) == (1, 0, 1)
    assert fields["search_limit_hits"] == 0 and fields["finish_reason"] == "answer"


@pytest.mark.parametrize("where", ["down", "slow"])
async def test_backend_failure_is_reported_and_the_rollout_goes_on(base_config, tokenizer, lm, dead_url, slow_url,
                                                                   where):
    if where == "down":  # refused at once; one retry (tenacity adds up to 1 s of jitter to the backoff)
        config = with_env(base_config, backend={"url": dead_url, "max_retries": 1, "backoff_s": 0.01})
    else:  # the server would answer after 3 s; the loop's own deadline gives up first
        config = with_env(base_config, backend={"url": slow_url, "max_retries": 0}, search_timeout_s=0.5)
    server = ScriptedServer(lm, tokenizer, {QUESTION: ["<search> Vyvutyr </search>", "<answer> unknown </answer>"]})
    out = await rollout(config, server, tokenizer)
    text = tokenizer.decode(out.response_ids)
    reason = "ConnectError" if where == "down" else "no answer within 0.5 s"
    assert f"<information>\nSearch error: the search engine did not answer ({reason})." in text
    assert text.endswith("</information>\n\n<answer> unknown </answer>")
    fields = out.extra_fields
    assert (fields["search_calls"], fields["search_errors"], fields["finish_reason"]) == (1, 1, "answer")
    if where == "slow":
        assert 0.5 <= fields["search_latency_s"] < 2.0


async def test_backend_ignoring_stop_strings_is_cut_after_the_first_tag(base_config, tokenizer, lm, world):
    rambling = "<search> Vyvutyr </search>\n<information> made-up facts </information>\n<answer> Atlantis </answer>"
    server = ScriptedServer(lm, tokenizer, {QUESTION: [rambling, "<answer> Kraimadon </answer>"]}, obey=False)
    out = await rollout(base_config, server, tokenizer)
    text = tokenizer.decode(out.response_ids)
    info = expected_info(world, tokenizer, "Vyvutyr")
    assert text == "<search> Vyvutyr </search>" + info + "<answer> Kraimadon </answer>"
    assert "made-up" not in text and "Atlantis" not in text
    assert out.response_mask[: out.response_mask.index(0)] == [1] * len(enc(tokenizer, "<search> Vyvutyr </search>"))


@pytest.mark.parametrize("last_turn, finish", [("<answer> Kraimadon </answer>", "answer"),
                                               ("<search> again </search>", "search_limit")])
async def test_search_limit(base_config, tokenizer, lm, last_turn, finish):
    searches = [f"<search> {q} </search>" for q in ("Vyvutyr", "Kraimadon", "Osric Mumomy")]
    server = ScriptedServer(lm, tokenizer, {QUESTION: searches + [last_turn]})
    out = await rollout(with_env(base_config, max_turns=2, max_info_tokens=40), server, tokenizer)
    text = tokenizer.decode(out.response_ids)
    notice = information_block(SEARCH_LIMIT_REACHED.format(limit=2))
    assert text.count("<information>") == 3 and text.count("Doc 1 (Title: ") == 2
    assert text.endswith(searches[2] + notice + last_turn)
    fields = out.extra_fields
    assert fields["model_turns"] == 4 and fields["search_calls"] == 2
    assert fields["search_count"] == (3 if finish == "answer" else 4)
    # searches past the limit are the policy's doing, not search errors
    assert fields["search_limit_hits"] == (1 if finish == "answer" else 2) and fields["search_errors"] == 0
    assert fields["finish_reason"] == finish
    assert out.num_turns == 1 + 4 + 3


@pytest.mark.parametrize("obey", [True, False], ids=["server-stops-at-max_tokens", "server-ignores-max_tokens"])
async def test_over_long_generation_is_truncated(base_config, tokenizer, lm, obey):
    server = ScriptedServer(lm, tokenizer, {QUESTION: ["<think> " + "Vyvutyr lies on a river. " * 40]}, obey=obey)
    out = await rollout(with_env(base_config, response_length=48), server, tokenizer)
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs) == 48
    assert out.response_mask == [1] * 48
    assert server.calls[0]["params"]["max_tokens"] == 48
    assert out.extra_fields["finish_reason"] == "length" and out.extra_fields["response_truncated"] is True


async def test_results_are_cut_to_what_is_left_of_the_response(base_config, tokenizer, lm):
    turn1 = "<search> Vyvutyr </search>"
    server = ScriptedServer(lm, tokenizer, {QUESTION: [turn1, "<answer> Kraimadon </answer>"]})
    out = await rollout(with_env(base_config, response_length=80), server, tokenizer)
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs) == 80
    assert out.extra_fields["finish_reason"] == "length" and out.extra_fields["model_turns"] == 1
    text = tokenizer.decode(out.response_ids)
    info = text[len(turn1):]
    assert info.startswith("\n\n<information>\nDoc 1 (Title: Vyvutyr) Vyvutyr lies") and TRUNCATION_MARKER in info
    assert "</information>" in info  # the block still closes: its text was shortened, not its tags
    assert out.response_mask.count(0) == out.extra_fields["info_tokens"]
    assert out.extra_fields["search_errors"] == 0


@pytest.mark.parametrize("turn1", ["<search> Vyvutyr </search>", "<search>   </search>"], ids=["results", "error-text"])
async def test_information_block_always_closes_near_the_budget_edge(base_config, tokenizer, lm, turn1):
    """Whatever room is left after the search (results or an error text, tokens merging where text meets tag), the
    block ends with its closing tag, or is left out when not even its tags fit; never a block cut mid-tag."""
    from reward.format import FormatReason, check_format

    empty_block = len(enc(tokenizer, information_block("")))
    seen = set()
    for room in range(1, empty_block + 30):
        server = ScriptedServer(lm, tokenizer, {QUESTION: [turn1, "<answer> Kraimadon </answer>"]})
        config = with_env(base_config, response_length=len(enc(tokenizer, turn1)) + room)
        out = await rollout(config, server, tokenizer)
        text = tokenizer.decode(out.response_ids)
        info = text[len(turn1):]
        assert out.response_mask.count(0) == out.extra_fields["info_tokens"] <= room
        if room < empty_block:  # not even the tags fit: no block, the response is full
            assert info == "" and out.extra_fields["finish_reason"] == "length"
            continue
        block, closing, policy = info.partition("\n</information>\n\n")
        assert block.startswith("\n\n<information>\n") and closing, (room, info)
        if not policy:  # the block filled the response: to the format check the search was answered, not cut
            assert check_format(text).reason is not FormatReason.UNCLOSED_TAG
        seen.add(block == "\n\n<information>\n")
    assert seen == {True, False}  # both the emptied and the shortened block were hit


async def test_agent_loop_worker_batch_and_reward_routing(base_config, tokenizer, lm, model_dir):
    """verl's AgentLoopWorker runs two rows through our loop, pads them and calls verl's naive reward manager:
    our extra_fields reach compute_score's extra_info, and its returned keys come back as reward_extra_info."""
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    seen: list[dict] = []

    def compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs):
        seen.append(dict(extra_info))
        return {"score": float("Kraimadon" in solution_str), "searches": extra_info["search_count"]}

    class RewardHandle:
        """In-process stand-in for a RewardLoopWorker actor handle: ``compute_score.remote(data)``."""

        def __init__(self):
            manager = NaiveRewardManager(base_config, tokenizer, compute_score)
            self.compute_score = type("Remote", (), {"remote": staticmethod(manager.run_single)})()

    scripts = {QUESTION: ["<search> Vyvutyr </search>", "<answer> Kraimadon </answer>"],
               OTHER_QUESTION: ["<think> I know this. </think>\n<answer> a writer </answer>"]}
    server = ScriptedServer(lm, tokenizer, scripts)
    worker = AgentLoopWorker(base_config, llm_client=server, reward_loop_worker_handles=[RewardHandle()])
    rows = 2
    prompts = np.empty(rows, dtype=object)
    prompts[:] = [qa_messages(QUESTION), qa_messages(OTHER_QUESTION)]
    batch = DataProto.from_dict(non_tensors={
        "raw_prompt": prompts,
        "agent_name": np.array([TAG_AGENT_NAME] * rows, dtype=object),
        "data_source": np.array(["synthetic"] * rows, dtype=object),
        "reward_model": np.array([{"ground_truth": {"target": ["Kraimadon"]}}] * rows, dtype=object),
        "extra_info": np.array([{"index": 0}, {"index": 1}], dtype=object),
    })
    out = await worker.generate_sequences(batch)

    assert out.batch["responses"].shape == (rows, RESPONSE_LENGTH)
    mask, logprobs = out.batch["response_mask"], out.batch["rollout_log_probs"]
    assert torch.all(logprobs[mask == 0] == 0.0) and torch.all(logprobs[mask == 1] < 0.0)
    lengths = out.batch["attention_mask"][:, -RESPONSE_LENGTH:].sum(-1)
    assert mask[0, : lengths[0]].eq(0).any() and mask[1, : lengths[1]].eq(1).all()  # only row 0 searched
    assert list(out.non_tensor_batch["search_count"]) == [1, 0]
    assert list(out.non_tensor_batch["finish_reason"]) == ["answer", "answer"]
    assert list(out.non_tensor_batch["__num_turns__"]) == [4, 2]
    assert list(out.non_tensor_batch["searches"]) == [1, 0]  # reward_extra_info, from compute_score's dict
    assert out.batch["rm_scores"].sum(-1).tolist() == [1.0, 0.0]
    by_searches = {info["search_count"]: info for info in seen}
    assert by_searches[1]["search_calls"] == 1 and by_searches[1]["search_latency_s"] > 0
    assert by_searches[0]["finish_reason"] == "answer" and by_searches[0]["num_turns"] == 2
    assert {"model_turns", "search_errors", "info_tokens", "response_truncated"} <= set(by_searches[1])


def test_stop_tag_cut_and_query_parse(tokenizer):
    text = "<think> a </think>\n<search> Vyvutyr river </search>\n\n<information> x </information> <answer> y </answer>"
    ids = enc(tokenizer, text)
    keep, tag = tokens_through_stop(ids, tokenizer)
    assert tag == "</search>" and tokenizer.decode(ids[:keep]).endswith("</search>")
    assert find_stop(tokenizer.decode(ids[: keep - 1])) is None
    assert parse_query(tokenizer.decode(ids[:keep])) == "Vyvutyr river"
    assert tokens_through_stop(enc(tokenizer, "no tags here"), tokenizer) == (len(enc(tokenizer, "no tags here")), None)
    assert tokens_through_stop(enc(tokenizer, "<answer> x </answer> <search>"), tokenizer)[1] == "</answer>"
    assert parse_query("<search> a </search> <search> b </search>") == "a"
    assert parse_query("<search> <search> b </search>") == "b"


def test_stop_params_per_engine():
    assert stop_sampling_params("vllm", True) == {"stop": STOP_STRINGS, "include_stop_str_in_output": True}
    assert stop_sampling_params("trtllm", True) == {"stop": STOP_STRINGS, "include_stop_str_in_output": True}
    assert stop_sampling_params("sglang", True) == {"stop": STOP_STRINGS, "no_stop_trim": True}
    assert stop_sampling_params("sglang", False) == {}  # no tokenizer in the engine: the loop cuts turns itself
    # Under verl's default skip_tokenizer_init=true, vLLM and our hf backend still decode with their own tokenizer.
    for engine in ("vllm", "hf"):
        assert engine_decodes_text(engine, skip_tokenizer_init=True)
        assert stop_sampling_params(engine, engine_decodes_text(engine, True)) == {
            "stop": STOP_STRINGS, "include_stop_str_in_output": True}
    assert not engine_decodes_text("sglang", skip_tokenizer_init=True)
    assert engine_decodes_text("sglang", skip_tokenizer_init=False)


async def test_hf_rollout_is_asked_to_stop_at_the_tags(base_config, tokenizer, lm):
    """verl's default skip_tokenizer_init=true with our hf backend: the loop still sends stop strings."""
    from omegaconf import open_dict

    config = copy.deepcopy(base_config)
    with open_dict(config):
        config.actor_rollout_ref.rollout.name = "hf"
    assert config.actor_rollout_ref.rollout.skip_tokenizer_init is True
    server = ScriptedServer(lm, tokenizer, {QUESTION: ["<answer> Kraimadon </answer>"]})
    await rollout(config, server, tokenizer)
    assert server.calls[0]["params"]["stop"] == STOP_STRINGS


FRAGMENTS = st.lists(st.sampled_from(["<search>", "</search>", "</answer>", "<answer>", " Vyvutyr", " river ", "\n",
                                      "é", " 1388.", "</", ">", "<"]), max_size=12)


@settings(max_examples=60, deadline=None)
@given(FRAGMENTS)
def test_cut_is_the_shortest_prefix_through_the_first_stop(tokenizer, fragments):
    ids = enc(tokenizer, "".join(fragments))
    keep, tag = tokens_through_stop(ids, tokenizer)
    first = find_stop(tokenizer.decode(ids))
    if first is None:
        assert (keep, tag) == (len(ids), None)
    else:
        assert tag == first[1] == find_stop(tokenizer.decode(ids[:keep]))[1]
        assert find_stop(tokenizer.decode(ids[: keep - 1])) is None


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40), st.text(max_size=20))
def test_parse_query_reads_the_last_open_tag_before_the_first_close(query, prefix):
    assert parse_query(f"{prefix.replace('<', '')}<search>{query}</search> <search> later </search>") == query.strip()
    assert parse_query(query) == ""


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200), st.integers(1, 40))
def test_truncation_keeps_a_prefix_within_budget(tokenizer, text, budget):
    for tok in (None, tokenizer):
        cut = truncate_to_budget(text, budget, tok)
        if cut == text:
            continue
        if tok is None:
            assert cut.endswith(TRUNCATION_MARKER)
            kept = cut[: -len(TRUNCATION_MARKER)]
            assert text.startswith(kept) and len(kept.split()) == budget
        else:
            assert cut.endswith(TRUNCATION_MARKER) or budget <= len(enc(tokenizer, TRUNCATION_MARKER))
            assert len(enc(tokenizer, cut)) <= budget + 2  # + a merge or two at the seam


# --------------------------------------------------------------------------------- the hermes variant, end to end
# The tool-related part of Qwen2.5's chat template (system turn with the tools, <tool_call> in assistant turns, tool
# messages as <tool_response> blocks in one user turn), on the tiny tokenizer's ChatML.
QWEN25_TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and tools %}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{%- endif %}"
    "\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant{%- if m.content %}\n{{ m.content }}"
    "{%- endif %}{%- for tc in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def test_hermes_tool_agent_response_passes_our_format_check(base_config, tokenizer, lm, model_dir, retrieval_url,
                                                                  monkeypatch):
    """verl's own tool_agent loop with our search tool (the shipped YAML): the response verl decodes for the reward
    (skip_special_tokens, as its dapo manager does) is well formed for the hermes rules and scores its answer."""
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.tools.tool_registry import initialize_tools_from_config

    from envs.prompts import TOOL_AGENT_NAME
    from reward.masksearch_reward import compute_score

    hermes_tokenizer = copy.deepcopy(tokenizer)
    hermes_tokenizer.chat_template = QWEN25_TOOL_TEMPLATE
    monkeypatch.setenv("MASKSEARCH_RETRIEVAL_URL", retrieval_url)
    monkeypatch.setenv("MASKSEARCH_POLICY_TOKENIZER", str(model_dir))  # what the hermes recipe exports
    (tool,) = initialize_tools_from_config(str(Path(__file__).resolve().parents[1] / "envs/config/search_tool.yaml"))
    tool.settings.max_info_tokens = MAX_INFO_TOKENS  # the policy's tokens: the results fit the response
    config = copy.deepcopy(base_config)
    with open_dict(config):
        config.actor_rollout_ref.rollout.prompt_length = 1024  # the tools' schemas make the system turn long
        config.actor_rollout_ref.rollout.multi_turn.merge_with(
            {"enable": True, "format": "hermes", "max_assistant_turns": 5, "max_tool_response_length": 4096})
    call = '<tool_call>\n{"name": "search", "arguments": {"query": "Vyvutyr"}}\n</tool_call><|im_end|>'
    turns = ["I need the country.\n" + call, "<answer> Kraimadon </answer><|im_end|>"]
    server = ScriptedServer(lm, hermes_tokenizer, {QUESTION: turns})
    loop = hydra.utils.instantiate(
        config=_agent_loop_registry[TOOL_AGENT_NAME], trainer_config=DictConfigWrap(config=config),
        server_manager=server, tokenizer=hermes_tokenizer, processor=None, hf_model_type="qwen2",
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), tools=ToolListWrap([tool]),
    )
    assert isinstance(loop, ToolAgentLoop)
    prompt = qa_messages(QUESTION, tool_variant=True)
    out = await loop.run({**SAMPLING, "max_tokens": RESPONSE_LENGTH}, raw_prompt=prompt, extra_info={}, index=0)
    text = hermes_tokenizer.decode(out.response_ids, skip_special_tokens=True)
    assert "<tool_response>\nDoc 1 (Title: Vyvutyr)" in text and text.endswith("<answer> Kraimadon </answer>")
    result = await compute_score("synthetic", text, {"target": ["Kraimadon"]}, {"agent_name": TOOL_AGENT_NAME})
    assert result["format"] == 1 and result["score"] == 1 and result["num_searches"] == 1, text
    # the same text under the tag protocol's rules is untagged text: the reason the hermes rules exist
    assert (await compute_score("synthetic", text, {"target": ["Kraimadon"]}))["format_code"] == 11
