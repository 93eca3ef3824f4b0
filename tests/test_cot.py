"""Multi-agent CoT construction against real HTTP servers on 127.0.0.1.

Real pieces: the synthetic world, a BM25 index behind our retrieval server, the pipeline, LLMClient, the judge, the
tag-format checker of the reward. The stand-in is :class:`ScriptedServer`, an OpenAI-compatible server that plays
Planner/Rewriter/Observer/judge deterministically and only answers once search results contain the answer.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.prompts import SEARCH_NO_RESULTS
from envs.search_client import SearchSettings
from masksearch_rl.cot import agents
from masksearch_rl.cot.pipeline import BackendFailure, CotConfig, merged_search, run_cot
from masksearch_rl.cot.scripted import ScriptedServer
from masksearch_rl.jsonl import read_jsonl, write_jsonl
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.retrieval.types import Hit, SearchError
from masksearch_rl.synthetic import write_synthetic_corpus
from reward.format import check_format

REPO = Path(__file__).resolve().parents[1]
QA_SAMPLES = Path(os.environ["MASKSEARCH_SHARED_DATA"]) / "qa"  # tests/conftest.py


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
    assert len(correct) == len(records), [(r["id"], r["status"], r["reason"]) for r in records]
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
    assert summary["run"]["parse_errors"] == summary["run"]["backend_errors"] == summary["run"]["task_errors"] == 0
    assert llm_server.hits["planner"] >= len(records) and llm_server.hits["judge"] >= len(correct)


def test_cli_logs_counts_and_a_trajectory_table_to_wandb_offline(tmp_path, world, llm_server, retrieval_url,
                                                                  monkeypatch):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    _, _, _, ramp = world
    items = tmp_path / "ramp.jsonl"
    write_jsonl(items, ramp[:4])
    result = CliRunner().invoke(app, [
        "cot", "build", "--input", str(items), "--out", str(tmp_path / "traj.jsonl"), "--no-progress",
        "--wandb-project", "masksearch-test", "--wandb-mode", "offline", "--wandb-dir", str(tmp_path),
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
    assert set(records) == {q["id"] for q in subset} - {subset[0]["id"], subset[1]["id"], subset[2]["id"]}
    assert records[subset[3]["id"]]["status"] == "wrong" and not records[subset[3]["id"]]["keep"]
    assert records[subset[4]["id"]]["status"] == "max_turns"
    errors = {e["id"]: e for e in _errors(tmp_path)}
    assert set(errors) == {subset[0]["id"], subset[1]["id"], subset[2]["id"]}
    garbage = errors[subset[0]["id"]]  # replies that never parse are not a final record: retried next run
    assert garbage["kind"] == "parse_error" and garbage["error"].startswith("observer:")
    assert "429" in errors[subset[1]["id"]]["error"] and "timed out" in errors[subset[2]["id"]]["error"]
    assert summary["llm"]["planner"].get("http_429", 0) >= 2  # retried, then given up

    # Parse and backend errors are retried by the next run; finished ids are not redone.
    llm_server.behaviour.clear()
    again = run_cot(config)
    assert again["run"]["skipped_done"] == 3 and again["run"]["correct"] == 3
    assert again["file"]["records"] == 6
    # ...and the error log forgets them once they succeed: it lists only what is still failing.
    assert again["errors_pending"] == 0 and (tmp_path / "traj.jsonl.errors.jsonl").read_text() == ""


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


def _errors(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "traj.jsonl.errors.jsonl").read_text().splitlines()]


def test_an_unexpected_exception_fails_its_task_only_and_the_next_run_retries_it(tmp_path, world, llm_server,
                                                                                 retrieval_url, monkeypatch):
    from masksearch_rl.cot import pipeline

    _, _, questions, _ = world
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, questions[:4])
    broken = str(questions[1]["id"])
    real_construct = pipeline.construct

    async def construct_with_a_bug(task, *args):
        if task.id == broken:
            raise KeyError("a field the code expected")
        return await real_construct(task, *args)

    monkeypatch.setattr(pipeline, "construct", construct_with_a_bug)
    config = _config(tmp_path, llm_server, retrieval_url, path)
    summary = run_cot(config)
    run = summary["run"]
    assert (run["task_errors"], run["backend_errors"], run["correct"], run["processed"]) == (1, 0, 3, 4)
    assert broken not in {r["id"] for r in read_jsonl(tmp_path / "traj.jsonl")}  # not written: retried next run
    [entry] = _errors(tmp_path)
    assert entry["id"] == broken and entry["kind"] == "task_error" and entry["error"].startswith("KeyError")
    assert "Traceback" in entry["traceback"] and "construct_with_a_bug" in entry["traceback"]
    assert summary["errors_pending"] == 1

    monkeypatch.setattr(pipeline, "construct", real_construct)
    again = run_cot(config)
    assert (again["run"]["correct"], again["run"]["skipped_done"], again["run"]["task_errors"]) == (1, 3, 0)
    assert again["file"]["records"] == again["file"]["correct"] == 4
    assert again["errors_pending"] == 0 and _errors(tmp_path) == []


def test_garbage_from_planner_rewriter_and_judge_is_counted(tmp_path, world, llm_server, retrieval_url):
    _, _, questions, _ = world
    subset = questions[:4]
    llm_server.behaviour.update({subset[0]["id"]: "planner_garbage", subset[1]["id"]: "rewriter_garbage",
                                 subset[2]["id"]: "judge_garbage"})
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, subset)
    config = _config(tmp_path, llm_server, retrieval_url, path)
    summary = run_cot(config)
    run = summary["run"]
    assert (run["parse_errors"], run["backend_errors"], run["correct"], run["judged_by_fallback"]) == (2, 1, 1, 0)
    records = {r["id"]: r for r in read_jsonl(tmp_path / "traj.jsonl")}
    assert set(records) == {subset[3]["id"]}  # nothing is written for a task whose replies never parsed
    errors = {e["id"]: e for e in _errors(tmp_path)}
    planner, rewriter = errors[subset[0]["id"]], errors[subset[1]["id"]]
    assert planner["kind"] == rewriter["kind"] == "parse_error"
    assert planner["error"].startswith("planner:") and rewriter["error"].startswith("rewriter:")
    # each role got one correction turn before giving up (parse_retries=1)
    asked = [(r["role"], r["task"]) for r in llm_server.requests]
    assert asked.count(("planner", subset[0]["id"])) == 2 and asked.count(("rewriter", subset[1]["id"])) == 2
    # a judge that answers nonsense is a failed judge: nothing written, the error says why
    judge = errors[subset[2]["id"]]
    assert judge["kind"] == "backend" and "unparseable judge reply" in judge["error"]
    assert summary["judge"]["failures"] == 1

    # The next run asks again (the nonsense was not cached) and, the roles behaving now, records all four.
    llm_server.behaviour.clear()
    again = run_cot(config)
    assert (again["run"]["correct"], again["run"]["skipped_done"], again["errors_pending"]) == (3, 1, 0)
    assert again["file"]["records"] == again["file"]["correct"] == 4


def test_a_judge_outage_is_retried_or_graded_by_a_marked_fallback_when_asked(tmp_path, world, llm_server,
                                                                           retrieval_url):
    _, _, _, ramp = world
    path = tmp_path / "ramp.jsonl"
    write_jsonl(path, ramp[:3])
    outage = str(ramp[0]["id"])
    llm_server.behaviour[outage] = "judge_garbage"
    assert CotConfig(input="in", out="out").judge_fallback is False  # the default: never label by a weaker grader
    summary = run_cot(_config(tmp_path, llm_server, retrieval_url, path))
    assert (summary["run"]["backend_errors"], summary["run"]["correct"], summary["file"]["records"]) == (1, 2, 2)
    assert outage not in {r["id"] for r in read_jsonl(tmp_path / "traj.jsonl")}

    fallback = run_cot(_config(tmp_path, llm_server, retrieval_url, path, judge_fallback=True))
    assert (fallback["run"]["judged_by_fallback"], fallback["run"]["correct"], fallback["run"]["skipped_done"]) == (
        1, 1, 2)
    assert fallback["file"]["judged_by_fallback"] == 1 and fallback["file"]["records"] == 3
    record = {r["id"]: r for r in read_jsonl(tmp_path / "traj.jsonl")}[outage]
    assert record["judge"]["by"] == "answer_match" and record["judge"]["fallback"] is True
    assert "unparseable judge reply" in record["judge"]["judge_error"] and record["status"] == "correct"
    others = [r for r in read_jsonl(tmp_path / "traj.jsonl") if r["id"] != outage]
    assert all(r["judge"]["by"] == "judge" and r["judge"]["fallback"] is False for r in others)
    assert fallback["errors_pending"] == 0


def test_observer_replans_and_answers_from_own_knowledge_after_failed_rounds(tmp_path, world, llm_server,
                                                                            retrieval_url):
    _, _, _, ramp = world
    replan, own = str(ramp[0]["id"]), str(ramp[1]["id"])
    llm_server.behaviour.update({replan: "replan", own: "own_knowledge"})
    path = tmp_path / "ramp.jsonl"
    write_jsonl(path, ramp[:2])
    summary = run_cot(_config(tmp_path, llm_server, retrieval_url, path, fallback_after=2, max_rounds=6))
    assert summary["run"]["correct"] == 2
    records = {r["id"]: r for r in read_jsonl(tmp_path / "traj.jsonl")}

    # Re-plan: the Observer gave up on round 1, the Planner was asked again with the findings, round 2 answered.
    replanned = records[replan]
    assert [e["role"] for e in replanned["log"] if e["role"] in ("planner", "observer")] == [
        "planner", "observer", "planner", "observer"]
    assert replanned["num_searches"] == 2
    thoughts = [m["content"] for m in replanned["messages"] if m["role"] == "assistant"]
    assert "New plan:" not in thoughts[0] and "New plan:" in thoughts[1]  # round 2's thought carries the new plan
    planner_prompts = [r["user"] for r in llm_server.requests if r["task"] == replan and r["role"] == "planner"]
    assert len(planner_prompts) == 2 and "The current plan is not working" in planner_prompts[1]
    assert "Nothing useful yet." in planner_prompts[1]  # the findings so far went into the new plan
    _assert_well_formed(replanned)

    # Own knowledge: told it may answer from memory only after `fallback_after` rounds that found nothing.
    answered = records[own]
    hints = [agents.OWN_KNOWLEDGE_HINT in r["user"] for r in llm_server.requests
             if r["task"] == own and r["role"] == "observer"]
    assert hints == [False, False, True] and answered["num_searches"] == 3
    assert answered["status"] == "correct" and answered["answer"] == " | ".join(ramp[1]["masks"])
    _assert_well_formed(answered)


class _FakeBackend:
    """A search backend with canned results per query, recording how it was called."""

    name = "fake"

    def __init__(self, results: dict[str, list[str]], fail: Exception | None = None, delay_s: float = 0.0):
        self.results, self.fail, self.delay_s = results, fail, delay_s
        self.calls: list[tuple[list[str], int]] = []

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        self.calls.append((list(queries), topk))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [[Hit(i, f'"{i.upper()}"\ntext of {i}', 1.0) for i in self.results[q][:topk]] for q in queries]

    async def aclose(self) -> None:
        return None


def test_merged_search_round_robin_dedupes_and_caps():
    backend = _FakeBackend({"q1": ["a", "b", "c"], "q2": ["b", "d"], "q3": ["e", "a", "f"]})
    settings = SearchSettings(topk=3, max_info_tokens=100)
    text, hits = asyncio.run(merged_search(backend, ["q1", "q2", "q3"], settings, max_docs=4))
    # rank 1 of each list (a, b, e), then rank 2 (b again, d, a again), then rank 3 (c, f) -> capped at 4
    assert [h.id for h in hits] == ["a", "b", "e", "d"]
    assert backend.calls == [(["q1", "q2", "q3"], 3)]  # one batched call
    assert text.splitlines() == [f"Doc {n} (Title: {i.upper()}) text of {i}" for n, i in enumerate("abed", start=1)]
    _, everything = asyncio.run(merged_search(backend, ["q1", "q2", "q3"], settings, max_docs=10))
    assert [h.id for h in everything] == ["a", "b", "e", "d", "c", "f"]  # no repeats
    short, _ = asyncio.run(merged_search(backend, ["q1"], SearchSettings(topk=3, max_info_tokens=5), max_docs=3))
    assert short.startswith("Doc 1 (Title: A) text") and len(short.split()) < 10  # cut to the budget
    assert asyncio.run(merged_search(_FakeBackend({"q": []}), ["q"], settings, 4)) == (SEARCH_NO_RESULTS, [])


def test_merged_search_failures_are_backend_failures():
    settings = SearchSettings(topk=2, search_timeout_s=0.05)
    with pytest.raises(BackendFailure, match="search: server down"):
        asyncio.run(merged_search(_FakeBackend({}, fail=SearchError("server down")), ["q"], settings, 3))
    with pytest.raises(BackendFailure, match="no answer within 0.05 s"):
        asyncio.run(merged_search(_FakeBackend({"q": ["a"]}, delay_s=1.0), ["q"], settings, 3))


@pytest.mark.shared_data
def test_cot_build_reads_the_real_qa_samples(tmp_path, retrieval_url):
    """HotpotQA / 2Wiki / MuSiQue files as shipped (``idx``, string answers, extra fields) build without errors."""
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    files = sorted(QA_SAMPLES.glob("*.jsonl"))
    assert files
    samples = {f: read_jsonl(f)[:3] for f in files}
    with ScriptedServer([r for rs in samples.values() for r in rs]) as server:
        for source, records in samples.items():
            server.behaviour[str(records[0]["idx"])] = "own_knowledge"  # answers (from memory) -> judged
            path = tmp_path / source.name  # the file name gives data_source, as for the real file
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            out = tmp_path / f"{source.stem}.traj.jsonl"
            result = CliRunner().invoke(app, [
                "cot", "build", "--input", str(path), "--out", str(out), "--no-progress",
                f"llm.default.base_url={server.base_url}", "llm.default.api_key_env=COT_TEST_KEY",
                "llm.default.timeout_s=5", "llm.default.max_retries=1", f"search.backend.url={retrieval_url}",
                "max_rounds=2", "fallback_after=1",
            ])
            assert result.exit_code == 0, result.output
            summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
            run = summary["run"]
            assert summary["bad_input_lines"]["total"] == 0
            assert (run["parse_errors"], run["backend_errors"], run["task_errors"]) == (0, 0, 0), summary
            # the synthetic index knows none of these answers: the scripted agents run out of rounds, except the
            # one told to answer from memory
            assert (run["correct"], run["max_turns"]) == (1, 2)
            written = {r["id"]: r for r in read_jsonl(out)}
            assert set(written) == {str(r["idx"]) for r in records}
            for record in records:
                got = written[str(record["idx"])]
                assert got["kind"] == "qa" and got["data_source"] == source.stem.split("_")[0]
                assert got["gold"] == [[record["answer"]]] and record["question"].strip() in got["messages"][1]["content"]


# ------------------------------------------------------------------------------------------------- parsers
@contextmanager
def _no_eval():
    """Any eval/exec (or literal_eval) while parsing a reply fails the test: parsing must be ``json`` only."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reply parser evaluated model output")

    with mock.patch.object(builtins, "eval", refuse), mock.patch.object(builtins, "exec", refuse), \
            mock.patch.object(ast, "literal_eval", refuse):
        yield


@given(st.lists(st.text(min_size=1, max_size=20).filter(lambda s: s.strip()), min_size=3, max_size=6, unique=True),
       st.sampled_from(["", "Here you go:\n", "```json\n"]))
@settings(max_examples=60, deadline=None)
def test_rewriter_parser_roundtrips_and_never_evals(queries, prefix):
    cleaned = [" ".join(q.split()) for q in queries]
    reply = prefix + json.dumps({"queries": queries}) + ("\n```" if prefix.startswith("```") else "")
    with _no_eval():
        if len(set(cleaned)) >= 3:
            assert agents.parse_queries(reply, 3, 10) == list(dict.fromkeys(cleaned))
        else:
            with pytest.raises(agents.ParseError):
                agents.parse_queries(reply, 3, 10)


@given(st.one_of(st.text(max_size=200),
                 st.sampled_from(["__import__('os').system('true')", "{'queries': ['a', 'b', 'c']}",
                                  '{"plan": 1, "sub_queries": "x"}', "[1, 2, 3]", "{" * 50, "exec('1')"])))
@settings(max_examples=200, deadline=None)
def test_parsers_reject_garbage_with_parse_error(text):
    """Only ParseError comes out of a parser (any other exception fails the test), and nothing is evaluated."""
    with _no_eval():
        for parse in (agents.parse_plan, agents.parse_observation, lambda t: agents.parse_queries(t, 3, 5)):
            try:
                parse(text)
            except agents.ParseError:
                pass


def test_no_eval_guard_catches_an_evaluating_parser():
    """The guard above really fires: a parser that evals would fail those tests."""
    with _no_eval(), pytest.raises(AssertionError, match="evaluated model output"):
        eval("1 + 1")


def test_json_reply_is_the_last_top_level_object_not_one_inside_it():
    """Braces inside strings and nested objects belong to the reply's object; only whole objects count."""
    assert agents.extract_json_object('Here you go:\n{"queries": ["0", "1", "{}"]}') == {"queries": ["0", "1", "{}"]}
    assert agents.extract_json_object('x {"a": {"b": 1}} y') == {"a": {"b": 1}}
    assert agents.extract_json_object('draft {"a": 1} final {"a": 2} done') == {"a": 2}
    assert agents.extract_json_object('{ broken {"a": "}"}') == {"a": "}"}


def test_observer_parser_shapes():
    ok = agents.parse_observation('{"summary": "s", "action": "answer", "answer": ["a", "b"]}')
    assert ok.answer == "a | b" and ok.found
    assert agents.parse_observation('x {"think": "t", "action": "search", "sub_query": " q  r "} y').sub_query == "q r"
    for bad in ('{"summary": "s", "action": "dance"}', '{"summary": "s", "action": "search"}',
                '{"action": "answer", "answer": "a"}', '{"summary": "s", "action": "answer", "answer": [1, {}]}',
                '{"summary": "s", "found": "yes", "action": "replan"}', "__import__('os').system('true')"):
        with pytest.raises(agents.ParseError):
            agents.parse_observation(bad)


def test_a_bom_and_a_non_utf8_line_lose_only_that_line_and_a_truncated_gz_fails(tmp_path, world, llm_server,
                                                                               retrieval_url):
    import gzip

    import typer
    from typer.testing import CliRunner

    from masksearch_rl.cot.cli import register

    _, _, questions, _ = world
    lines = [json.dumps(q).encode() + b"\n" for q in questions[:3]]
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b'{"question": "caf\xe9?", "answer": "x"}\n' + lines[1] + lines[2])
    summary = run_cot(_config(tmp_path, llm_server, retrieval_url, path))
    assert summary["file"]["records"] == 3 and summary["bad_input_lines"]["total"] == 1
    assert summary["bad_input_lines"]["examples"][0].startswith(f"{path}:2: not valid UTF-8 (byte 0xe9")

    truncated = tmp_path / "qa.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(lines) * 50)[:-40])
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["cot", "build", "--input", str(truncated), "--out", str(tmp_path / "t2.jsonl"),
                                      "--no-progress", f"llm.default.base_url={llm_server.base_url}",
                                      f"search.backend.url={retrieval_url}"])
    assert result.exit_code == 1 and f"{truncated}: cannot be read past line" in result.output
