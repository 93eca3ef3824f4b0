"""Self-Evolve iterations with a scripted teacher (tag protocol over chat) and judge on 127.0.0.1, real searches through
our retrieval server: fresh items only, judge- and format-filtered, merged without duplicates, stats that match the
files after a resume, and failures (teacher, search, judge, a bug) that are retried instead of recorded."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest

from masksearch_rl.cot.scripted import ScriptedServer
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.selfevolve.iteration import IterationConfig, run_iteration
from masksearch_rl.synthetic import write_synthetic_corpus
from reward.format import check_format


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic corpus, its RAMP items and a BM25 index behind our retrieval server."""
    root = tmp_path_factory.mktemp("se-world")
    write_synthetic_corpus(root, num_passages=80, num_questions=1, seed=5, progress=False)
    generate_ramp(RampConfig(corpus=root / "corpus.jsonl", out=root / "ramp.jsonl", limit=10, progress=False))
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url:
        yield {"root": root, "items": read_jsonl(root / "ramp.jsonl"), "url": url}


@pytest.fixture()
def llm(world):
    with ScriptedServer(world["items"]) as server:
        yield server


def _config(tmp_path, world, llm, i=1, dataset=None, backend=None, **kw) -> IterationConfig:
    endpoint = {"base_url": llm.base_url, "model": "teacher", "api_key_env": "SE_TEST_KEY", "timeout_s": 5,
                "max_retries": 1}
    return IterationConfig(iteration=i, items=str(world["root"] / "ramp.jsonl"), work_dir=str(tmp_path / "se"),
                           teacher=endpoint, judge=endpoint, dataset=dataset, num_items=kw.pop("num_items", 4),
                           progress=False, val_fraction=0.0,
                           search={"backend": backend or {"type": "server", "url": world["url"]}, "topk": 3}, **kw)


def _teacher(tmp_path, i=1) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(tmp_path / "se" / f"iter_{i}" / "teacher.jsonl")}


def _errors(tmp_path, i=1) -> list[dict]:
    path = tmp_path / "se" / f"iter_{i}" / "teacher.jsonl.errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_iterations_use_fresh_items_and_merge_without_duplicates(tmp_path, world, llm):
    items = world["items"]
    llm.behaviour[str(items[1]["id"])] = "wrong"
    first = run_iteration(_config(tmp_path, world, llm))
    second = run_iteration(_config(tmp_path, world, llm, 2, dataset=str(tmp_path / "se" / "iter_1" / "dataset.jsonl")))
    one = read_jsonl(tmp_path / "se" / "iter_1" / "teacher.jsonl")
    two = read_jsonl(tmp_path / "se" / "iter_2" / "teacher.jsonl")
    assert [r["id"] for r in one] and not {r["id"] for r in one} & {r["id"] for r in two}, "items are fresh"
    assert len(one) == len(two) == 4
    assert one[[r["id"] for r in one].index(str(items[1]["id"]))]["status"] == "wrong"
    assert first["teacher"] == {"records": 4, "correct": 3, "judged_wrong": 1, "max_turns": 0, "parse_errors": 0,
                                "kept": 3, "format_rejected": 0, "judged_by_fallback": 0}
    assert first["run"]["backend_errors"] == first["run"]["task_errors"] == first["run"]["skipped_done"] == 0
    assert first["merge"] == {"previous": 0, "added": 3, "duplicates": 0, "total": 3}
    assert second["teacher"]["correct"] == second["teacher"]["kept"] == 4
    assert second["merge"] == {"previous": 3, "added": 4, "duplicates": 0, "total": 7}
    for record in one + two:
        assert (record["format"] == "ok") == (record["status"] == "correct")  # "wrong" wrote one span for all masks
        if record["keep"]:
            assert record["status"] == "correct" and check_format(record["response"], num_masks=len(record["gold"])).ok
            assert record["messages"][-1]["role"] == "assistant"
    merged = read_jsonl(tmp_path / "se" / "iter_2" / "dataset.jsonl")
    assert len(merged) == len({r["id"] for r in merged}) == 7
    assert len(pd.read_parquet(tmp_path / "se" / "iter_2" / "sft" / "train.parquet")) == 7
    stats = json.loads((tmp_path / "se" / "iter_2" / "stats.json").read_text())
    assert stats["iteration"] == 2 and stats["fresh_items"] == 4 and stats == second | {"seconds": stats["seconds"]}


def test_stats_after_a_resume_count_the_whole_file(tmp_path, world, llm):
    items = world["items"]
    down = str(items[2]["id"])
    llm.behaviour[down] = "429"  # the teacher endpoint refuses this item: a backend error, not a record
    config = _config(tmp_path, world, llm)
    first = run_iteration(config)
    assert (first["run"]["backend_errors"], first["run"]["correct"], first["teacher"]["records"]) == (1, 3, 3)
    [entry] = _errors(tmp_path)
    assert entry["id"] == down and entry["kind"] == "backend" and entry["error"].startswith("teacher:")

    llm.behaviour.clear()
    again = run_iteration(config)
    assert again["run"] == {"records": 1, "correct": 1, "judged_wrong": 0, "max_turns": 0, "parse_errors": 0,
                            "kept": 1, "format_rejected": 0, "judged_by_fallback": 0, "backend_errors": 0,
                            "task_errors": 0, "skipped_done": 3}
    assert again["teacher"]["records"] == again["teacher"]["correct"] == again["teacher"]["kept"] == 4
    assert again["merge"]["total"] == 4 and again["errors_pending"] == 0 and _errors(tmp_path) == []
    assert json.loads((tmp_path / "se" / "iter_1" / "stats.json").read_text())["teacher"]["correct"] == 4


def test_an_unexpected_exception_fails_one_item_only(tmp_path, world, llm, monkeypatch):
    from masksearch_rl.cot import pipeline

    broken = str(world["items"][0]["id"])
    real = pipeline.label_answer

    async def label_with_a_bug(judge, task, *args):
        if task.id == broken:
            raise ZeroDivisionError("a bug in labelling")
        return await real(judge, task, *args)

    monkeypatch.setattr(pipeline, "label_answer", label_with_a_bug)
    config = _config(tmp_path, world, llm)
    stats = run_iteration(config)
    assert (stats["run"]["task_errors"], stats["run"]["correct"], stats["teacher"]["records"]) == (1, 3, 3)
    assert broken not in _teacher(tmp_path)
    [entry] = _errors(tmp_path)
    assert entry["kind"] == "task_error" and entry["error"] == "ZeroDivisionError: a bug in labelling"
    assert "label_with_a_bug" in entry["traceback"]

    monkeypatch.setattr(pipeline, "label_answer", real)
    again = run_iteration(config)
    assert again["run"]["correct"] == 1 and again["teacher"]["correct"] == 4 and _errors(tmp_path) == []


def test_a_judge_outage_is_retried_unless_the_fallback_is_asked_for(tmp_path, world, llm):
    outage = str(world["items"][0]["id"])
    llm.behaviour[outage] = "judge_garbage"
    stats = run_iteration(_config(tmp_path, world, llm))
    assert (stats["run"]["backend_errors"], stats["teacher"]["records"], stats["teacher"]["judged_by_fallback"]) == (
        1, 3, 0)
    assert outage not in _teacher(tmp_path) and "unparseable judge reply" in _errors(tmp_path)[0]["error"]

    again = run_iteration(_config(tmp_path, world, llm, judge_fallback=True))
    assert again["run"]["judged_by_fallback"] == again["teacher"]["judged_by_fallback"] == 1
    record = _teacher(tmp_path)[outage]
    assert record["judge"]["by"] == "answer_match" and record["judge"]["fallback"] is True
    assert record["status"] == "correct" and record["keep"]


def test_failed_searches_are_backend_errors_not_trajectories(tmp_path, world, llm):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    backend = {"type": "server", "url": dead, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 2}
    stats = run_iteration(_config(tmp_path, world, llm, num_items=3, backend=backend))
    assert stats["run"]["backend_errors"] == 3 and stats["teacher"]["records"] == 0
    assert _teacher(tmp_path) == {}
    errors = _errors(tmp_path)
    assert len(errors) == 3 and all(e["kind"] == "backend" and e["error"].startswith("search:") for e in errors)
    assert stats["merge"]["added"] == 0 and stats["sft"] == {"train": 0, "val": 0}
    assert json.loads((tmp_path / "se" / "iter_1" / "stats.json").read_text())["run"]["backend_errors"] == 3

    # The same items succeed once search is back (nothing was recorded, so nothing blocks the retry).
    again = run_iteration(_config(tmp_path, world, llm, num_items=3))
    assert again["teacher"]["kept"] == 3 and again["errors_pending"] == 0


def test_a_correct_answer_in_a_malformed_trajectory_is_not_kept(tmp_path, world, llm):
    chatty = str(world["items"][3]["id"])
    llm.behaviour[chatty] = "chatty"
    stats = run_iteration(_config(tmp_path, world, llm))
    record = _teacher(tmp_path)[chatty]
    assert record["status"] == "correct" and not record["keep"]  # the judge liked the answer; the format check did not
    assert record["format"] == "untagged_text" and record["reason"] == "format: untagged_text"
    assert (stats["teacher"]["correct"], stats["teacher"]["format_rejected"], stats["teacher"]["kept"]) == (4, 1, 3)
    assert stats["merge"]["added"] == 3 and chatty not in {r["id"] for r in read_jsonl(
        tmp_path / "se" / "iter_1" / "dataset.jsonl")}


def test_cli_logs_stats_and_teacher_trajectories_to_wandb_offline(tmp_path, world, llm, monkeypatch):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    monkeypatch.setenv("SE_TEST_KEY", "test")
    result = CliRunner().invoke(app, [
        "selfevolve", "iterate", "-i", "1", "--items", str(world["root"] / "ramp.jsonl"),
        "--work-dir", str(tmp_path / "se"), "--teacher-url", llm.base_url, "--teacher-model", "teacher",
        "--judge-url", llm.base_url, "--judge-model", "judge", "--api-key-env", "SE_TEST_KEY",
        "--retrieval-url", world["url"], "--num-items", "3", "--no-progress",
        "--wandb-project", "masksearch-test", "--wandb-mode", "offline", "--wandb-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    teacher = read_jsonl(tmp_path / "se" / "iter_1" / "teacher.jsonl")
    [table_path] = tmp_path.glob("wandb/offline-run-*/files/media/table/selfevolve/teacher_trajectories_*.json")
    table = json.loads(table_path.read_text())
    assert [row[table["columns"].index("id")] for row in table["data"]] == [r["id"] for r in teacher]
    assert len(teacher) == 3 and json.loads(result.output[result.output.index("{"):])["fresh_items"] == 3
    assert {r["temperature"] for r in llm.requests if r["role"] == "policy"} == {0.7}  # the teacher's default


def test_cli_searches_a_local_index_at_the_given_temperature(tmp_path, world, llm, monkeypatch):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    monkeypatch.setenv("SE_TEST_KEY", "test")
    args = ["selfevolve", "iterate", "-i", "1", "--items", str(world["root"] / "ramp.jsonl"),
            "--work-dir", str(tmp_path / "se"), "--teacher-url", llm.base_url, "--teacher-model", "teacher",
            "--judge-url", llm.base_url, "--judge-model", "judge", "--api-key-env", "SE_TEST_KEY",
            "--num-items", "2", "--no-progress", "--temperature", "0.25"]
    clash = CliRunner().invoke(app, [*args, "--index", str(world["root"] / "index"), "--web", "serper"])
    assert clash.exit_code != 0 and "choose one of --retrieval-url, --index, --web" in clash.output
    result = CliRunner().invoke(app, [*args, "--index", str(world["root"] / "index"), "--topk", "2"])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "se" / "iter_1" / "stats.json").read_text())
    assert stats["teacher"]["kept"] == 2 and stats["run"]["backend_errors"] == 0
    assert {r["temperature"] for r in llm.requests if r["role"] == "policy"} == {0.25}
    for record in read_jsonl(tmp_path / "se" / "iter_1" / "teacher.jsonl"):
        assert all(info.count("Doc ") <= 2 for info in (t["information"] for t in record["log"]) if info)


def test_a_staged_curriculum_takes_fresh_items_by_mask_count_and_records_it(tmp_path, world, llm):
    items = world["items"]
    masks = {str(item["id"]): item["num_masks"] for item in items}
    curriculum = {"mode": "staged", "seed": 1}
    first = run_iteration(_config(tmp_path, world, llm, num_items=4, curriculum=curriculum))
    second = run_iteration(_config(tmp_path, world, llm, 2, num_items=4, curriculum=curriculum,
                                   dataset=str(tmp_path / "se" / "iter_1" / "dataset.jsonl")))
    taken = [masks[i] for i in _teacher(tmp_path)] + [masks[i] for i in _teacher(tmp_path, 2)]
    ordered = sorted(masks.values())
    assert sorted(taken) == ordered[:8]  # round 1 took the fewest-mask items, round 2 went on down the schedule
    assert max(masks[i] for i in _teacher(tmp_path)) <= min(masks[i] for i in _teacher(tmp_path, 2))
    for stats, i in ((first, 1), (second, 2)):
        recorded = stats["curriculum"]
        assert recorded["mode"] == "staged" and sum(recorded["fresh_items_by_num_masks"].values()) == 4
        train = pd.read_parquet(tmp_path / "se" / f"iter_{i}" / "sft" / "train.parquet")
        assert list(train["num_masks"]) == sorted(train["num_masks"]) == sorted(masks[x] for x in train["id"])
        assert recorded["sft"]["rows"] == len(train)
        assert json.loads((tmp_path / "se" / f"iter_{i}" / "stats.json").read_text())["curriculum"] == recorded
    with pytest.raises(ValueError, match="staged or mixed"):
        _config(tmp_path, world, llm, curriculum={"mode": "adaptive"})
