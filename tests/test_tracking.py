"""W&B tracking in offline mode: metrics, tables and images land in the run directory; off means no-op; online
without a key fails with a clear message. Also the eval logging and verl's dumps turned into trajectory tables."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from masksearch_rl.tracking import NullTracker, TrackingConfig, start_run


def _tables(root: Path) -> dict[str, dict]:
    found = {}
    for path in root.glob("wandb/offline-run-*/files/media/table/**/*.table.json"):
        found[path.name.rsplit("_", 2)[0]] = json.loads(path.read_text())
    return found


def test_disabled_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert isinstance(start_run(None, "eval"), NullTracker)
    assert isinstance(start_run(TrackingConfig(), "eval"), NullTracker)  # no project: off
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = start_run(TrackingConfig(project="p", dir=str(tmp_path)), "eval")
    assert not tracker.enabled
    tracker.log({"a": 1})
    tracker.log_table("t", ["a"], [[1]])
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="W&B mode must be one of"):
        TrackingConfig(project="p", mode="sometimes")


def test_online_without_a_key_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(RuntimeError, match="export MY_KEY=.*WANDB_MODE=offline"):
        start_run(TrackingConfig(project="p", api_key_env="MY_KEY"), "eval")


def test_offline_run_with_eval_tables_and_verl_dump(monkeypatch, tmp_path, wandb_history):
    """One offline run (W&B start-up is slow): the eval logging and the trajectory table from a verl dump."""
    from masksearch_rl.eval.metrics import summarize_all
    from masksearch_rl.eval.report import results_dict, write_report
    from masksearch_rl.eval.runner import SAMPLE_COLUMNS, _track
    from masksearch_rl.eval.trajectories import log_generation_dumps

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = [
        {"dataset": "hotpotqa", "id": str(i), "question": f"q{i}", "answers": ["Paris"], "answer": "Paris" if i else None,
         "searches": ["capital of France"], "information": ["Doc 1 (Title: Paris) Paris is the capital."],
         "num_searches": 1, "num_turns": 2, "finish": "answer",
         "scores": {"recall": float(i > 0), "em": float(i > 0), "f1": float(i > 0), "cover_em": float(i > 0)}}
        for i in range(3)
    ]
    results = results_dict("unit", summarize_all(records), {"max_turns": 4})
    results["report"] = write_report([results], tmp_path / "report", plots=False)
    dump = tmp_path / "val_dumps"
    dump.mkdir()
    sample = {
        "input": "system\n...\nuser\nQuestion: Where?", "step": 20, "score": 1.0, "gts": {"target": ["Paris"]},
        "output": "<think> a </think>\n<search> where </search>\n\n<information>\nDoc 1 (Title: P) <search> quoted "
                  "</search> Paris\n</information>\n\n<answer> Paris </answer>",
        "acc": 1.0, "format": 1.0, "recall": 1.0, "em": 1.0, "num_searches": 1, "reward": 1.0, "uid": "u",
    }
    (dump / "20.jsonl").write_text(json.dumps(sample) + "\n" + "{torn line\n")
    # verl's val_before_train dump is step 0, the first step W&B sees.
    (dump / "0.jsonl").write_text(json.dumps({**sample, "step": 0, "score": 0.0, "acc": 0.0, "recall": 0.5}) + "\n")

    config = TrackingConfig(project="masksearch-test", name="unit", dir=str(tmp_path / "wb"), tags=("ci",))
    with start_run(config, "eval", {"method": "unit", "path": tmp_path}) as tracker:
        assert tracker.enabled and tracker.run.job_type == "eval"
        _track(tracker, results, records, log_samples=10)
    # `eval log-generations` is a run of its own (as on the command line).
    config = TrackingConfig(project="masksearch-test", name="dumps", dir=str(tmp_path / "wb_dumps"))
    with start_run(config, "rl-trajectories") as tracker:
        logged = log_generation_dumps(dump, tracker, per_step=5)
    assert logged == {"0": 1, "20": 1}

    tables = _tables(tmp_path / "wb")
    trajectories = tables["trajectories"]  # media/table/eval/trajectories_<n>_<hash>.table.json
    assert trajectories["columns"] == list(SAMPLE_COLUMNS)
    assert len(trajectories["data"]) == 3 and trajectories["data"][1][3] == "capital of France"
    table = tables["table"]
    assert table["columns"] == ["metric", "hotpotqa", "avg"]
    assert ["recall", "66.67", "–"] in table["data"]  # Avg. needs the paper's six benchmarks
    history = wandb_history(tmp_path / "wb")
    [row] = [row for row in history.values() if "eval/hotpotqa/recall" in row]
    assert row["eval/hotpotqa/recall"] == pytest.approx(2 / 3) and row["eval/average_run/recall"] == pytest.approx(2 / 3)
    assert not any(key.startswith("eval/average/") for key in row)

    step = _tables(tmp_path / "wb_dumps")["step_20"]  # media/table/trajectories/step_20_<n>_<hash>.table.json
    assert step["columns"][:7] == ["step", "prompt", "searches", "information", "answer", "gold", "score"]
    assert step["columns"][7:11] == ["acc", "format", "recall", "em"]
    row = step["data"][0]
    # The search quoted inside <information> is not taken for one of the policy's.
    assert row[2] == "where" and row[4] == "Paris" and row[5] == "Paris"
    # Each dump's table and reward means share one history row at verl's step, step 0 included.
    history = wandb_history(tmp_path / "wb_dumps")
    assert sorted(history) == [0, 20]
    assert history[0]["trajectories/score"] == 0.0 and history[0]["trajectories/recall"] == 0.5
    assert history[20]["trajectories/score"] == 1.0 and history[20]["trajectories/acc"] == 1.0
    assert history[0]["trajectories/step_0/_type"] == "table-file"


def test_flatten_for_charts():
    from masksearch_rl.tracking import flatten

    assert flatten({"a": {"b": 1, "c": None}, "d": 2}) == [("a/b", 1), ("d", 2)]


def test_data_generation_commands_log_offline(monkeypatch, tmp_path):
    """`synth` and `ramp generate` with --wandb-mode offline: each run carries a sample table of what it wrote."""
    from typer.testing import CliRunner

    from masksearch_rl.cli import app
    from masksearch_rl.jsonl import read_jsonl

    wandb = ["--wandb-project", "masksearch-test", "--wandb-mode", "offline", "--wandb-dir", str(tmp_path)]
    runner = CliRunner()
    world = tmp_path / "world"
    result = runner.invoke(app, ["synth", "--out", str(world), "--passages", "60", "--questions", "5", *wandb])
    assert result.exit_code == 0, result.output
    items = tmp_path / "ramp.jsonl"
    result = runner.invoke(app, ["ramp", "generate", "--corpus", str(world / "corpus.jsonl"), "--out", str(items),
                                 "--limit", "10", *wandb])
    assert result.exit_code == 0, result.output
    tables = _tables(tmp_path)
    questions = read_jsonl(world / "questions.jsonl")
    synth = tables["questions"]
    assert [row[synth["columns"].index("question")] for row in synth["data"]] == [q["question"] for q in questions]
    ramp = tables["items"]
    assert [row[ramp["columns"].index("id")] for row in ramp["data"]] == [r["id"] for r in read_jsonl(items)]
    assert all("[mask]" in row[ramp["columns"].index("query")] for row in ramp["data"])
    k_table = tables["k_histogram"]  # the realized k (masks per item) over the output
    assert k_table["columns"] == ["k", "items", "share"]
    assert {row[0]: row[1] for row in k_table["data"]} == dict(Counter(r["num_masks"] for r in read_jsonl(items)))
