"""Multi-agent CoT construction against real HTTP servers on 127.0.0.1.

Real pieces: the synthetic world, a BM25 index behind our retrieval server, the pipeline, LLMClient, the judge, the
tag-format checker of the reward. The stand-in is :class:`ScriptedServer`, an OpenAI-compatible server that plays
Planner/Rewriter/Observer/judge deterministically and only answers once search results contain the answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masksearch_rl.cot import agents
from masksearch_rl.cot.pipeline import CotConfig, run_cot
from masksearch_rl.cot.scripted import ScriptedServer
from masksearch_rl.jsonl import read_jsonl, write_jsonl
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.synthetic import write_synthetic_corpus
from reward.format import check_format

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cot-world")
    write_synthetic_corpus(root, num_passages=120, num_questions=12, seed=3, hops=(1, 2), progress=False)
    generate_ramp(RampConfig(corpus=root / "corpus.jsonl", out=root / "ramp.jsonl", limit=12, progress=False))
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    questions = read_jsonl(root / "questions.jsonl")
    ramp = read_jsonl(root / "ramp.jsonl")
    assert questions and ramp
    return root, retriever, questions, ramp


@pytest.fixture(scope="module")
def retrieval_url(world):
    with running_server(create_app(world[1], ServerConfig(max_topk=10))) as url:
        yield url


@pytest.fixture()
def llm_server(world):
    _, _, questions, ramp = world
    with ScriptedServer(questions + ramp, slow_s=3.0) as server:
        yield server


def _config(tmp_path, server, retrieval_url, input_path, **kw) -> CotConfig:
    llm = {"default": {"base_url": server.base_url, "model": "scripted", "api_key_env": "COT_TEST_KEY",
                       "timeout_s": 1.0, "max_retries": 1, "concurrency": 8}}
    return CotConfig(input=str(input_path), out=str(tmp_path / "traj.jsonl"), llm=llm,
                     search={"backend": {"type": "server", "url": retrieval_url}, "topk": 3}, progress=False, **kw)


def _assert_well_formed(record: dict) -> None:
    messages = record["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    roles = [m["role"] for m in messages[2:]]
    assert roles[-1] == "assistant" and roles[0] == "assistant"
    assert all(a != b for a, b in zip(roles, roles[1:])), "assistant and information turns alternate"
    for message in messages[2:]:
        if message["role"] == "tool":
            assert message["content"].startswith("<information>") and message["content"].endswith("</information>")
        else:
            assert "<information>" not in message["content"]
    num_masks = len(record["gold"]) if record["kind"] == "ramp" else None
    result = check_format(record["response"], num_masks=num_masks)
    assert result.ok, (result, record["response"])


def test_qa_and_ramp_trajectories_are_correct_and_well_formed(tmp_path, world, llm_server, retrieval_url):
    root, _, questions, ramp = world
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, questions + ramp)
    summary = run_cot(_config(tmp_path, llm_server, retrieval_url, mixed))
    records = read_jsonl(tmp_path / "traj.jsonl")
    assert len(records) == len(questions) + len(ramp) == summary["file"]["records"]
    by_id = {r["id"]: r for r in records}
    correct = [r for r in records if r["status"] == "correct"]
    assert len(correct) >= 0.75 * len(records), [(r["id"], r["status"], r["reason"]) for r in records]
    for record in correct:
        assert record["keep"] and record["judge"]["by"] == "judge"
        _assert_well_formed(record)
        # the answer really came from search: it appears in an <information> turn
        infos = " ".join(m["content"] for m in record["messages"] if m["role"] == "tool").lower()
        assert all(g[0].lower() in infos for g in record["gold"])
    # the Observer follows the chain: some multi-hop question needed a second search
    assert all(r["num_searches"] >= 1 for r in correct)
    assert max(by_id[q["id"]]["num_searches"] for q in questions if q["hops"] == 2) >= 2
    assert summary["run"]["kept"] == len(correct) == summary["file"]["kept"]
    assert summary["run"]["parse_errors"] == summary["run"]["backend_errors"] == 0
    assert llm_server.hits["planner"] >= len(records) and llm_server.hits["judge"] >= len(correct)


def test_cli_logs_counts_and_a_trajectory_table_to_wandb_offline(tmp_path, world, llm_server, retrieval_url,
                                                                  monkeypatch):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    _, _, _, ramp = world
    items = tmp_path / "ramp.jsonl"
    write_jsonl(items, ramp[:4])
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = CliRunner().invoke(app, [
        "cot", "build", "--input", str(items), "--out", str(tmp_path / "traj.jsonl"), "--no-progress",
        "--wandb-project", "masksearch-test", "--wandb-mode", "offline",
        f"llm.default.base_url={llm_server.base_url}", "llm.default.api_key_env=COT_TEST_KEY",
        "llm.default.timeout_s=5", f"search.backend.url={retrieval_url}",
    ])
    assert result.exit_code == 0, result.output
    records = read_jsonl(tmp_path / "traj.jsonl")
    [table_path] = tmp_path.glob("wandb/offline-run-*/files/media/table/cot/trajectories_*.table.json")
    table = json.loads(table_path.read_text())
    assert len(table["data"]) == len(records) == 4
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {row["id"] for row in rows} == {r["id"] for r in records}
    for row, record in zip(rows, records):
        assert row["status"] == record["status"] and "[mask]" in row["prompt"]
        if record["status"] == "correct":
            assert row["searches"] and row["information"] and row["answer"] == record["answer"]


def test_garbage_timeouts_429_wrong_and_loops_are_counted(tmp_path, world, llm_server, retrieval_url):
    _, _, questions, _ = world
    subset = questions[:6]
    behaviours = {subset[0]["id"]: "garbage", subset[1]["id"]: "429", subset[2]["id"]: "slow",
                  subset[3]["id"]: "wrong", subset[4]["id"]: "loop"}
    llm_server.behaviour.update(behaviours)
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, subset + [{"broken": True}])
    config = _config(tmp_path, llm_server, retrieval_url, path, max_rounds=3)
    summary = run_cot(config)
    run = summary["run"]
    assert (run["parse_errors"], run["backend_errors"], run["judged_wrong"], run["max_turns"], run["correct"]) == (
        1, 2, 1, 1, 1)
    assert summary["bad_input_lines"]["total"] == 1
    records = {r["id"]: r for r in read_jsonl(tmp_path / "traj.jsonl")}
    assert set(records) == {q["id"] for q in subset} - {subset[1]["id"], subset[2]["id"]}
    assert records[subset[0]["id"]]["status"] == "parse_error" and "observer" in records[subset[0]["id"]]["reason"]
    assert records[subset[3]["id"]]["status"] == "wrong" and not records[subset[3]["id"]]["keep"]
    assert records[subset[4]["id"]]["status"] == "max_turns"
    errors = [json.loads(line) for line in open(tmp_path / "traj.jsonl.errors.jsonl")]
    assert {e["id"] for e in errors} == {subset[1]["id"], subset[2]["id"]}
    assert any("429" in e["error"] for e in errors) and any("timed out" in e["error"] for e in errors)
    assert summary["llm"]["planner"].get("http_429", 0) >= 2  # retried, then given up

    # Backend errors are retried by the next run; finished ids are not redone.
    llm_server.behaviour.clear()
    again = run_cot(config)
    assert again["run"]["skipped_done"] == 4 and again["run"]["correct"] == 2
    assert again["file"]["records"] == 6


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, world, retrieval_url):
    _, _, questions, ramp = world
    tasks = questions + ramp
    path = tmp_path / "in.jsonl"
    write_jsonl(path, tasks)
    with ScriptedServer(tasks, delay_s=0.15) as server:
        config = tmp_path / "cot.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "llm": {"default": {"base_url": server.base_url, "model": "scripted", "api_key_env": "COT_TEST_KEY",
                                "timeout_s": 10, "max_retries": 1}},
            "search": {"backend": {"type": "server", "url": retrieval_url}},
        }))
        out = tmp_path / "traj.jsonl"
        cmd = [sys.executable, "-c", "import typer; from masksearch_rl.cot.cli import register; app = typer.Typer();"
               " register(app); app()", "cot", "build", "--input", str(path), "--out", str(out), "--config",
               str(config), "--no-progress", "--concurrency", "2"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        partial = out.read_text().count("\n") if out.exists() else 0
        assert 3 <= partial < len(tasks), ("the kill must land mid-run", stderr.decode()[-2000:])
        finished = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(str(t["id"]) for t in tasks)
    summary = json.loads((tmp_path / "traj.jsonl.summary.json").read_text())
    assert summary["run"]["skipped_done"] >= partial and summary["file"]["records"] == len(tasks)


# ------------------------------------------------------------------------------------------------- parsers
@given(st.lists(st.text(min_size=1, max_size=20).filter(lambda s: s.strip()), min_size=3, max_size=6, unique=True),
       st.sampled_from(["", "Here you go:\n", "```json\n"]))
@settings(max_examples=60, deadline=None)
def test_rewriter_parser_roundtrips_and_never_evals(queries, prefix):
    cleaned = [" ".join(q.split()) for q in queries]
    reply = prefix + json.dumps({"queries": queries}) + ("\n```" if prefix.startswith("```") else "")
    if len(set(cleaned)) >= 3:
        assert agents.parse_queries(reply, 3, 10) == list(dict.fromkeys(cleaned))


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parsers_reject_garbage_with_parse_error(text):
    for parse in (agents.parse_plan, agents.parse_observation, lambda t: agents.parse_queries(t, 3, 5)):
        try:
            parse(text)
        except agents.ParseError:
            pass


def test_observer_parser_shapes():
    ok = agents.parse_observation('{"summary": "s", "action": "answer", "answer": ["a", "b"]}')
    assert ok.answer == "a | b" and ok.found
    assert agents.parse_observation('x {"think": "t", "action": "search", "sub_query": " q  r "} y').sub_query == "q r"
    for bad in ('{"summary": "s", "action": "dance"}', '{"summary": "s", "action": "search"}',
                '{"action": "answer", "answer": "a"}', '{"summary": "s", "action": "answer", "answer": [1, {}]}',
                '{"summary": "s", "found": "yes", "action": "replan"}', "__import__('os').system('true')"):
        with pytest.raises(agents.ParseError):
            agents.parse_observation(bad)
