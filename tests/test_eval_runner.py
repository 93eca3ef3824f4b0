"""`eval run` end to end over the synthetic world: a real BM25 retrieval server and a scripted OpenAI-compatible
policy server, both over HTTP on 127.0.0.1, give scores known in advance.

The fake policy searches each hop's entity (the question's ``oracle_queries``), then, by the question's position
``i % 4``: 0 answers the gold exactly, 1 answers something unrelated, 2 answers the gold plus two extra words,
3 stops without an answer. So per benchmark EM = 1/4, recall = cover-EM = 2/4, F1 = (1 + f1(2)) / 4, searches = mean
hops, turns = hops + 1, all computed by hand below.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from masksearch_rl.eval.runner import EvalConfig, PolicyConfig, run_eval
from masksearch_rl.jsonl import write_jsonl
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.synthetic import write_synthetic_corpus

WRONG = "zebra quartz"


def _plain(answer: str) -> bool:
    """Answers whose normalisation is just lower-casing (hand-checkable F1)."""
    return all(ch.isalnum() or ch == " " for ch in answer) and not {"a", "an", "the", "and", "more"} & set(
        answer.lower().split()
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    write_synthetic_corpus(root, num_passages=300, num_questions=80, seed=3, progress=False)
    questions = [json.loads(line) for line in open(root / "questions.jsonl")]
    questions = [q for q in questions if _plain(q["answer"])][:16]
    assert len(questions) == 16
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    # Two benchmarks in two public formats: MaskSearch sample JSONL and a HotpotQA-style JSON list.
    write_jsonl(root / "musique.jsonl", [{"idx": i, "question": q["question"], "answer": q["answer"]}
                                         for i, q in enumerate(questions[8:])])
    (root / "hotpot_dev.json").write_text(json.dumps(
        [{"_id": f"h{i}", "question": q["question"], "answer": q["answer"]} for i, q in enumerate(questions[:8])]
    ))
    return root, questions, retriever


@pytest.fixture(scope="module")
def retrieval_url(world):
    with running_server(create_app(world[2], ServerConfig(max_topk=10))) as url:
        yield url


class Script:
    """The fake policy's behaviour, shared with the test for bookkeeping."""

    def __init__(self, questions):
        self.by_question = {}
        for group in (questions[:8], questions[8:]):
            for i, q in enumerate(group):
                self.by_question[q["question"]] = (i % 4, q)
        self.requests: list[str] = []
        self.failing: set[str] = set()
        self.info_seen: dict[str, list[str]] = {}
        self.judge_calls = 0


def policy_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        messages = body["messages"]
        if body["model"] == "judge":  # the judge: right when the answer starts with the gold
            script.judge_calls += 1
            text = messages[-1]["content"]
            correct = "and more" in text
            return _completion(json.dumps({"correct": [correct]}), "stop", None)
        user = next(m["content"] for m in messages if m["role"] == "user")
        question = user.removeprefix("Question: ").strip()
        script.requests.append(question)
        if question in script.failing:
            return JSONResponse(status_code=500, content={"error": "scripted failure"})
        kind, q = script.by_question[question]
        so_far = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        assert body.get("continue_final_message") is (True if so_far else None)
        assert body["stop"] == ["</search>", "</answer>"] and body["include_stop_str_in_output"] is True
        infos = re.findall(r"<information>(.*?)</information>", so_far, flags=re.S)
        script.info_seen[question] = infos
        hop = len(infos)
        if hop < len(q["oracle_queries"]):
            return _completion(f"<think> I need hop {hop + 1}. </think>\n<search> {q['oracle_queries'][hop]} </search>",
                               "stop", "</search>")
        if kind == 3:
            return _completion("I cannot tell.", "stop", None)
        answer = {0: q["answer"], 1: WRONG, 2: f"{q['answer']} and more"}[kind]
        return _completion(f"<think> done </think>\n<answer> {answer} </answer>", "stop", "</answer>")

    return app


def _completion(text: str, finish: str, stop_reason: str | None) -> dict:
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "policy",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "stop_reason": stop_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def expected_scores(questions) -> dict[str, float]:
    def f1_extra(answer: str) -> float:  # prediction = gold + 2 extra tokens: P = n/(n+2), R = 1
        n = len(answer.translate(str.maketrans("", "", string.punctuation)).split())
        precision = n / (n + 2)
        return 2 * precision / (precision + 1)

    kinds = [i % 4 for i in range(len(questions))]
    return {
        "em": kinds.count(0) / len(questions),
        "recall": (kinds.count(0) + kinds.count(2)) / len(questions),
        "cover_em": (kinds.count(0) + kinds.count(2)) / len(questions),
        "f1": (kinds.count(0) + sum(f1_extra(q["answer"]) for i, q in enumerate(questions) if i % 4 == 2))
        / len(questions),
        "judge": (kinds.count(0) + kinds.count(2)) / len(questions),
        "searches": sum(min(q["hops"], 4) for q in questions) / len(questions),
        "turns": sum(min(q["hops"], 4) + (1 if i % 4 != 3 else 1) for i, q in enumerate(questions)) / len(questions),
    }


def make_config(root: Path, out: Path, policy_url: str, retrieval_url: str, model: str = "policy",
                **overrides) -> EvalConfig:
    settings = {
        "datasets": [("hotpotqa", root / "hotpot_dev.json"), (None, root / "musique.jsonl")],
        "out_dir": out,
        "method": "scripted",
        "policy": PolicyConfig(kind="chat", llm={"base_url": f"{policy_url}/v1", "model": model, "max_retries": 0,
                                                 "timeout_s": 10}),
        "search": {"backend": {"type": "server", "url": retrieval_url}, "topk": 3},
        "max_turns": 4,
        "concurrency": 4,
        "judge": {"base_url": f"{policy_url}/v1", "model": "judge", "max_retries": 0},
        "progress": False,
    }
    return EvalConfig(**{**settings, **overrides})


def test_scripted_policy_gets_the_known_scores_and_resumes(world, retrieval_url, tmp_path):
    root, questions, _ = world
    script = Script(questions)
    # One question fails at the policy endpoint on the first run.
    failing = questions[9]["question"]
    script.failing.add(failing)
    with running_server(policy_app(script)) as policy_url:
        config = make_config(root, tmp_path / "run", policy_url, retrieval_url, plots=False)
        first = run_eval(config)
        assert first["complete"] is False and first["missing"] == {"hotpotqa": 0, "musique": 1}
        assert first["run"]["policy_errors"] == 1
        predictions = [json.loads(line) for line in open(tmp_path / "run" / "predictions.jsonl")]
        assert len(predictions) == 15 and failing not in {p["question"] for p in predictions}

        # Re-run: only the failed question is asked again; the table is then complete.
        script.failing.clear()
        script.requests.clear()
        second = run_eval(make_config(root, tmp_path / "run", policy_url, retrieval_url))
        assert set(script.requests) == {failing}
        assert second["complete"] is True and second["run"]["resumed"] == 15

    lines = open(tmp_path / "run" / "predictions.jsonl").read().splitlines()
    assert len(lines) == 16 and len({json.loads(line)["key"] for line in lines}) == 16

    for dataset, group in (("hotpotqa", questions[:8]), ("musique", questions[8:])):
        got, want = second["datasets"][dataset], expected_scores(group)
        assert got["n"] == 8
        for metric in ("em", "recall", "cover_em", "f1", "judge", "searches", "turns"):
            assert got[metric] == pytest.approx(want[metric]), (dataset, metric)
    # The judge was only asked about answers that are neither missing nor exact.
    assert script.judge_calls == 8
    # Two of the paper's six benchmarks: no Avg., only the mean over this run's benchmarks.
    assert second["average"] is None and second["average_search_r1"] is None
    average = second["average_run"]
    assert average["recall"] == pytest.approx(0.5) and average["em"] == pytest.approx(0.25)
    assert second["mixed_settings"] == []

    # The policy really searched: each hop's results reached it, and hits name the entity searched for.
    record = next(json.loads(line) for line in lines if json.loads(line)["dataset"] == "hotpotqa")
    q = next(q for q in questions if q["question"] == record["question"])
    assert record["searches"] == q["oracle_queries"]
    assert len(record["information"]) == q["hops"]
    assert all(entity in info for entity, info in zip(q["oracle_queries"], record["information"]))
    assert record["information"][0].startswith("Doc 1 (Title: ")

    # Table 2 files: paper column order, percentages, Avg.
    table = (tmp_path / "run" / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert header == "| Method | HotpotQA† | Musique | Avg. |"
    assert "| scripted | 50.00 | 50.00 | – |" in table
    csv_lines = (tmp_path / "run" / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "method,metric,hotpotqa,musique,avg"
    assert csv_lines[1] == "scripted,recall,0.500000,0.500000,"
    for name in ("answers", "search"):
        png = tmp_path / "run" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_other_settings_unless_forced(world, retrieval_url, tmp_path):
    """Resuming into a run directory with another model, turn limit or judge is refused, naming the settings; options
    that change no prediction may differ. Forced, the old predictions stay and a judge added then has judged only
    the new questions: no judge mean over that subset is reported, and the mixed settings are."""
    from typer.testing import CliRunner

    from masksearch_rl.cli import app
    from masksearch_rl.eval.fingerprint import ConfigMismatch

    root, questions, _ = world
    script = Script(questions)
    out = tmp_path / "run"
    with running_server(policy_app(script)) as policy_url:
        def config(**overrides) -> EvalConfig:
            return make_config(root, out, policy_url, retrieval_url, **{"judge": None, "plots": False, **overrides})

        first = run_eval(config(limit=2))
        assert first["run"]["written"] == 4 and json.loads((out / "run_config.json").read_text())["mixed"] == []
        script.requests.clear()
        assert run_eval(config(limit=2, concurrency=1, log_samples=3))["run"]["resumed"] == 4  # same predictions
        assert script.requests == []

        with pytest.raises(ConfigMismatch, match=r"max_turns: 4 then, 2 now; policy\.llm\.model: 'policy' then, "
                                                 r"'policy-v2' now\)\. Use a new --out, or --force"):
            run_eval(config(max_turns=2, model="policy-v2"))
        with pytest.raises(ConfigMismatch, match=r"judge\.model: unset then, 'judge' now"):
            run_eval(config(judge={"base_url": f"{policy_url}/v1", "model": "judge", "max_retries": 0}))
        cli = CliRunner().invoke(app, [
            "eval", "run", "--out", str(out), "--data", f"hotpotqa={root / 'hotpot_dev.json'}", "--limit", "2",
            "--base-url", f"{policy_url}/v1", "--retriever-url", retrieval_url, "--max-turns", "3", "--no-progress",
        ])
        assert cli.exit_code == 2 and "max_turns: 4 then, 3 now" in cli.output
        assert script.requests == [] and len((out / "predictions.jsonl").read_text().splitlines()) == 4

        # Forced: the 12 remaining questions are run and judged; the first 4 keep their (unjudged) predictions.
        judge = {"base_url": f"{policy_url}/v1", "model": "judge", "max_retries": 0}
        forced = run_eval(config(judge=judge, force=True))
        assert forced["complete"] and forced["run"]["resumed"] == 4 and forced["run"]["written"] == 12
        for summary in forced["datasets"].values():
            assert (summary["n"], summary["judged"], summary["judge"]) == (8, 6, None)
        assert forced["average_run"]["judge"] is None and "judge.model" in forced["mixed_settings"]
        table = (out / "table.md").read_text()
        assert "## Model judge" not in table and "scripted hotpotqa (6/8), scripted musique (6/8)" in table
        # The directory now holds the new settings; its predictions stay marked as mixed.
        again = run_eval(config(judge=judge))
        assert again["run"]["resumed"] == 16 and "judge.model" in again["mixed_settings"]


def test_bad_benchmark_file_fails_before_any_request(world, tmp_path):
    root, _, _ = world
    bad = tmp_path / "bamboogle.jsonl"
    bad.write_text('{"question": "Who?", "answer": "me"}\n{"question": "Where?"}\n')
    config = EvalConfig(datasets=[(None, bad)], out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"bamboogle\.jsonl:2: bamboogle item has no field 'answer'"):
        run_eval(config)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


# ------------------------------------------------------------------------------------------ a local HF policy
def markov_model(tokenizer, out: Path, chain: list[int], default: int, eos_ids: list[int] | None = None) -> Path:
    """A real HF model directory whose greedy next token depends on the last token only: ``chain[i]`` is followed
    by ``chain[i + 1]``, every other token by ``default``. Built by hand: all transformer layers add zero to the
    residual stream, token t's embedding is a one-hot state vector and the (untied) output head maps each state to
    its next token. So an episode's text, and how each turn ends, is known in advance."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    transitions = dict(itertools.pairwise(chain))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids if eos_ids is not None else tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, 0] = 1.0  # state 0: any token not in the chain
        head[default, 0] = 1.0
        for state, (token, following) in enumerate(transitions.items(), start=1):
            embed[token, 0], embed[token, state] = 0.0, 1.0
            head[following, state] = 1.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(world):
    """The tiny models' tokenizer, trained on the world's passages; the protocol tags are single tokens so that a
    last-token model can write them."""
    from masksearch_rl.tiny_model import corpus_texts, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts(world[0] / "corpus.jsonl"), vocab_size=1200)
    tokenizer.add_tokens(["<search>", "</search>", "<answer>", "</answer>"])
    return tokenizer


def test_hf_policy_eval_run_finishes_as_the_model_does(world, hf_tokenizer, tmp_path):
    """`eval run --policy hf` on hand-built models against the real BM25 index: every question gets a record, and each
    finish says how the model's turns really ended -- an answer, searching past the limit, running out of tokens
    while emitting the pad token, or EOS (one of the generation config's EOS ids, with pad = EOS: no pad token)."""
    import copy

    from typer.testing import CliRunner

    from envs.prompts import qa_messages
    from masksearch_rl.cli import app

    root, questions, _ = world
    tok = hf_tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def distinct(chain: list[int]) -> bool:  # a last-token model can only write a sequence without repeats
        return len(set(chain)) == len(chain)

    # Every prompt ends with the generation prompt's last token: each turn starts from there.
    start = ids(tok.apply_chat_template(qa_messages("q"), add_generation_prompt=True, tokenize=False))[-1]
    hotpot = questions[:3]  # hotpot_dev.json's first items, in order
    gold = next(q["answer"] for q in hotpot if distinct([start, *ids(f"<answer> {q['answer']} </answer>")]))
    entity = next(e for q in hotpot for e in q["oracle_queries"] if distinct([start, *ids(f"<search> {e} </search>")]))
    word = ids(" Paris")[0]  # one token of it
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None

    def run(name, tokenizer, chain, default, max_new_tokens=24, eos_ids=None):
        model = markov_model(tokenizer, tmp_path / name, chain, default, eos_ids)
        result = CliRunner().invoke(app, [
            "eval", "run", "--policy", "hf", "--hf-model", str(model), "--index", str(root / "index"),
            "--data", f"hotpotqa={root / 'hotpot_dev.json'}", "--limit", "3", "--max-turns", "1",
            "--max-new-tokens", str(max_new_tokens), "--concurrency", "3", "--out", str(tmp_path / f"{name}_run"),
            "--no-plots", "--no-progress",
        ])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in open(tmp_path / f"{name}_run" / "predictions.jsonl")]
        assert sorted(r["id"] for r in records) == ["h0", "h1", "h2"]
        for r in records:  # what every finish implies
            assert (r["answer"] is not None) == (r["finish"] == "answer")
            assert r["num_turns"] == len(r["searches"]) + (r["finish"] != "search_limit")
        return records

    answered = run("answers", tok, [start, *ids(f"<answer> {gold} </answer>")], default=endoftext)
    assert {(r["finish"], r["answer"], r["num_turns"]) for r in answered} == {("answer", gold, 1)}
    assert [r["scores"]["em"] for r in answered if gold in r["answers"]] == [1.0]

    # Searches every turn: one answered from the index, one gets the limit notice, the next ends the episode.
    searched = run("searches", tok, [start, *ids(f"<search> {entity} </search>")], default=endoftext)
    for r in searched:
        assert (r["finish"], r["searches"], r["num_turns"]) == ("search_limit", [entity] * 3, 3)
        assert r["information"][0].startswith("Doc 1 (Title: ") and entity in r["information"][0]
        assert r["information"][1].startswith("Search limit reached")

    # Emits the pad token (not an EOS id) until max_new_tokens: out of tokens, however empty the text.
    padded = run("pads", tok, [], default=tok.pad_token_id, max_new_tokens=5)
    assert {(r["finish"], r["raw"]) for r in padded} == {("length", "")}

    # Qwen2.5-style EOS ids, no pad token: a word, then <|endoftext|> as the last token allowed, is an EOS stop.
    stopped = run("eos", no_pad, [start, word, endoftext], default=endoftext, max_new_tokens=2,
                  eos_ids=[tok.eos_token_id, endoftext])
    assert {(r["finish"], r["raw"]) for r in stopped} == {("no_tag", tok.decode([word]))}
