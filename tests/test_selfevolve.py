"""One and two Self-Evolve iterations with a scripted teacher (tag protocol over chat) and judge on 127.0.0.1, real
searches through our retrieval server: fresh items only, judge-filtered, merged without duplicates, stats match."""

from __future__ import annotations

import json

import pandas as pd

from masksearch_rl.cot.scripted import ScriptedServer
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
from masksearch_rl.retrieval.index import build_index, load_index
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.selfevolve.iteration import IterationConfig, run_iteration
from masksearch_rl.synthetic import write_synthetic_corpus
from reward.format import check_format


def test_two_iterations_use_fresh_items_and_merge_without_duplicates(tmp_path):
    write_synthetic_corpus(tmp_path, num_passages=80, num_questions=1, seed=5, progress=False)
    generate_ramp(RampConfig(corpus=tmp_path / "corpus.jsonl", out=tmp_path / "ramp.jsonl", limit=10, progress=False))
    items = read_jsonl(tmp_path / "ramp.jsonl")
    retriever = load_index(build_index(tmp_path / "corpus.jsonl", tmp_path / "index", kind="bm25",
                                       show_progress=False))
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url, ScriptedServer(items) as llm:
        llm.behaviour[str(items[1]["id"])] = "wrong"
        endpoint = {"base_url": llm.base_url, "model": "teacher", "api_key_env": "SE_TEST_KEY", "timeout_s": 5}

        def config(i, dataset=None):
            return IterationConfig(iteration=i, items=str(tmp_path / "ramp.jsonl"), work_dir=str(tmp_path / "se"),
                                   teacher=endpoint, judge=endpoint, dataset=dataset, num_items=4, progress=False,
                                   search={"backend": {"type": "server", "url": url}, "topk": 3}, val_fraction=0.0)

        first = run_iteration(config(1))
        second = run_iteration(config(2, dataset=str(tmp_path / "se" / "iter_1" / "dataset.jsonl")))
    one = read_jsonl(tmp_path / "se" / "iter_1" / "teacher.jsonl")
    two = read_jsonl(tmp_path / "se" / "iter_2" / "teacher.jsonl")
    assert [r["id"] for r in one] and not {r["id"] for r in one} & {r["id"] for r in two}, "items are fresh"
    assert len(one) == len(two) == 4
    assert one[[r["id"] for r in one].index(str(items[1]["id"]))]["status"] == "wrong"
    assert first["teacher"]["judged_wrong"] == 1 and first["teacher"]["correct"] == first["merge"]["added"]
    for record in one + two:
        if record["keep"]:
            assert record["status"] == "correct" and check_format(record["response"], num_masks=len(record["gold"])).ok
            assert record["messages"][-1]["role"] == "assistant"
    merged = read_jsonl(tmp_path / "se" / "iter_2" / "dataset.jsonl")
    assert len(merged) == len({r["id"] for r in merged}) == second["merge"]["total"]
    assert second["merge"]["previous"] == first["merge"]["total"]
    assert len(pd.read_parquet(tmp_path / "se" / "iter_2" / "sft" / "train.parquet")) == len(merged)
    stats = json.loads((tmp_path / "se" / "iter_2" / "stats.json").read_text())
    assert stats["iteration"] == 2 and stats["fresh_items"] == 4


def test_cli_logs_stats_and_teacher_trajectories_to_wandb_offline(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    write_synthetic_corpus(tmp_path, num_passages=60, num_questions=1, seed=6, progress=False)
    generate_ramp(RampConfig(corpus=tmp_path / "corpus.jsonl", out=tmp_path / "ramp.jsonl", limit=4, progress=False))
    items = read_jsonl(tmp_path / "ramp.jsonl")
    retriever = load_index(build_index(tmp_path / "corpus.jsonl", tmp_path / "index", kind="bm25",
                                       show_progress=False))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("SE_TEST_KEY", "test")
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url, ScriptedServer(items) as llm:
        result = CliRunner().invoke(app, [
            "selfevolve", "iterate", "-i", "1", "--items", str(tmp_path / "ramp.jsonl"),
            "--work-dir", str(tmp_path / "se"), "--teacher-url", llm.base_url, "--teacher-model", "teacher",
            "--judge-url", llm.base_url, "--judge-model", "judge", "--api-key-env", "SE_TEST_KEY",
            "--retrieval-url", url, "--num-items", "3", "--no-progress",
            "--wandb-project", "masksearch-test", "--wandb-mode", "offline",
        ])
    assert result.exit_code == 0, result.output
    teacher = read_jsonl(tmp_path / "se" / "iter_1" / "teacher.jsonl")
    [table_path] = tmp_path.glob("wandb/offline-run-*/files/media/table/selfevolve/teacher_trajectories_*.json")
    table = json.loads(table_path.read_text())
    assert [row[table["columns"].index("id")] for row in table["data"]] == [r["id"] for r in teacher]
    assert len(teacher) == 3 and json.loads(result.output[result.output.index("{"):])["fresh_items"] == 3
