"""`eval run` end to end over the synthetic world: a real BM25 retrieval server and a scripted OpenAI-compatible
policy server, both over HTTP on 127.0.0.1, give scores known in advance.

The fake policy searches each hop's entity (the question's ``oracle_queries``), then, by the question's position
``i % 4``: 0 answers the gold exactly, 1 answers something unrelated, 2 answers the gold plus two extra words,
3 stops without an answer. So per benchmark EM = 1/4, recall = cover-EM = 2/4, F1 = (1 + f1(2)) / 4, searches = mean
hops, turns = hops + 1, all computed by hand below.
"""

from __future__ import annotations

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


def make_config(root: Path, out: Path, policy_url: str, retrieval_url: str, **overrides) -> EvalConfig:
    return EvalConfig(
        datasets=[("hotpotqa", root / "hotpot_dev.json"), (None, root / "musique.jsonl")],
        out_dir=out,
        method="scripted",
        policy=PolicyConfig(kind="chat", llm={"base_url": f"{policy_url}/v1", "model": "policy", "max_retries": 0,
                                              "timeout_s": 10}),
        search={"backend": {"type": "server", "url": retrieval_url}, "topk": 3},
        max_turns=4,
        concurrency=4,
        judge={"base_url": f"{policy_url}/v1", "model": "judge", "max_retries": 0},
        progress=False,
        **overrides,
    )


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
    average = second["average"]
    assert average["recall"] == pytest.approx(0.5) and average["em"] == pytest.approx(0.25)

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
    assert "| scripted | 50.00 | 50.00 | 50.00 |" in table
    csv_lines = (tmp_path / "run" / "table.csv").read_text().splitlines()
    assert csv_lines[0] == "method,metric,hotpotqa,musique,avg"
    assert csv_lines[1].startswith("scripted,recall,0.500000,0.500000,0.500000")
    for name in ("answers", "search"):
        png = tmp_path / "run" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_benchmark_file_fails_before_any_request(world, tmp_path):
    root, _, _ = world
    bad = tmp_path / "bamboogle.jsonl"
    bad.write_text('{"question": "Who?", "answer": "me"}\n{"question": "Where?"}\n')
    config = EvalConfig(datasets=[(None, bad)], out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"bamboogle\.jsonl:2: bamboogle item has no field 'answer'"):
        run_eval(config)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
