"""The learning lab's quick mode: the whole lab (world -> policy through verl's SFT trainer -> RL arms through
verl's main_ppo -> results) completes on a CPU and writes a well-formed learning.json, learning.md and curves.

It asserts nothing about learning: a policy this small and briefly trained answers nothing. Whether the lab's arms
learn is the benchmark's job (docs/results/learning.md, produced by ``masksearch-rl lab``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masksearch_rl.lab.config import ARM_TASK, LabConfig
from masksearch_rl.lab.report import REQUIRED, bar_check, mean_ci

ROOT = Path(__file__).resolve().parents[1]
ARMS = "sft,dapo,ramp_then_qa"  # covers both tasks, the staged curriculum, the half-way checkpoint and Stage II


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "WANDB_MODE")}
    cmd = [sys.executable, "-m", "masksearch_rl.cli", "lab", "--quick", "--out", str(out), "--arms", ARMS]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return out


def test_quick_lab_writes_well_formed_results(quick_lab):
    results = quick_lab / "results"
    learning = json.loads((results / "learning.json").read_text())
    assert learning["command"].startswith("masksearch-rl lab --quick")
    assert learning["config"]["quick"] is True and learning["config"]["arms"] == ARMS.split(",")
    assert set(learning["arms"]) == set(ARMS.split(","))
    steps = LabConfig.quick_preset().rl_steps
    for arm, record in learning["arms"].items():
        assert record["task"] == ARM_TASK[arm]
        assert set(record["seeds"]) == {"0"}
        for seed in record["seeds"].values():
            assert all(len(seed[key]) == len(seed["steps"]) for key in REQUIRED)
            assert seed["steps"][0] == 0  # every curve starts from the SFT policy
            for task in ("ramp", "qa"):  # both held-out sets at every evaluation
                assert seed["heldout"][task]["steps"] == seed["steps"]
                assert all(0.0 <= v <= 1.0 for v in seed["heldout"][task]["val_acc"])
                assert all(math.isfinite(v) and v > 0 for v in seed["heldout"][task]["response_length"])
    assert learning["arms"]["sft"]["seeds"]["0"]["steps"] == [0]
    assert learning["arms"]["dapo"]["seeds"]["0"]["steps"] == list(range(steps + 1))
    # Stage I for half the steps, then Stage II: the same total as a QA-only run
    assert learning["arms"]["ramp_then_qa"]["seeds"]["0"]["steps"] == list(range(steps + 1))
    # the SFT arm is dapo's step-0 validation: the same policy, the same greedy evaluation
    sft, dapo = learning["arms"]["sft"]["seeds"]["0"], learning["arms"]["dapo"]["seeds"]["0"]
    assert sft["val_acc"][0] == dapo["val_acc"][0] and sft["response_length"][0] == dapo["response_length"][0]
    assert learning["bar"]["margin"] == 0.05 and "0" in learning["bar"]["gain_per_seed"]
    diagnostics = learning["policy"]["diagnostics"]
    assert diagnostics["ramp"]["items"] > 0 and 0 <= diagnostics["ramp"]["forced_acc"] <= 1
    markdown = (results / "learning.md").read_text()
    assert "| `dapo` |" in markdown and "copy diagnostics" in markdown
    for plot in ("learning_ramp_val_acc.png", "learning_qa_val_acc.png"):
        assert (results / plot).stat().st_size > 1000 and f"({plot})" in markdown


def test_the_lab_resumes_without_redoing_finished_work(quick_lab):
    """A second run finds every stage done: no verl run starts again, the results are the same."""
    before = json.loads((quick_lab / "results" / "learning.json").read_text())
    done = sorted(quick_lab.glob("arms/*/done.json"))
    stamps = [p.stat().st_mtime for p in done]
    cmd = [sys.executable, "-m", "masksearch_rl.cli", "lab", "--quick", "--out", str(quick_lab), "--arms", ARMS]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.stat().st_mtime for p in done] == stamps
    after = json.loads((quick_lab / "results" / "learning.json").read_text())
    assert after["arms"] == before["arms"]


def test_confidence_intervals_and_the_bar():
    mean, half = mean_ci([0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.3) and half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert mean_ci([0.5]) == (0.5, 0.0)
    arms = {"sft": {"seeds": {s: {"val_acc": [0.3]} for s in "012"}},
            "dapo": {"seeds": {s: {"val_acc": [0.3, v]} for s, v in zip("012", (0.40, 0.38, 0.31))}}}
    bar = bar_check(arms)  # gains 0.10, 0.08, 0.01: every seed above sft, 0.063 on average
    assert bar["met"] is True and bar["mean_gain"] == pytest.approx(0.0633, abs=1e-4)
    arms["dapo"]["seeds"]["2"]["val_acc"][-1] = 0.29
    assert bar_check(arms)["met"] is False  # one seed below sft fails the bar whatever the mean
    arms["dapo"]["seeds"]["2"]["val_acc"][-1] = 0.30
    assert bar_check(arms)["met"] is False  # ... and so does one no better than sft


def test_config_rejects_what_the_lab_cannot_run():
    with pytest.raises(ValueError, match="unknown lab arm"):
        LabConfig(arms=("dapo", "ppo"))
    with pytest.raises(ValueError, match="even"):
        LabConfig(rl_steps=5, eval_every=5)
    with pytest.raises(ValueError, match="divide"):
        LabConfig(rl_steps=40, eval_every=15)


def test_a_killed_dapo_run_resumes_from_its_checkpoint(quick_lab, tmp_path):
    """verl's main_ppo with the lab recipe, killed (SIGKILL, with its Ray) once step 1 is checkpointed and logged;
    the same command with trainer.resume_mode=auto goes on from the step after the last checkpoint -- global step,
    curriculum sampler position and dataloader state restored from it -- and its metrics continue."""
    import signal
    import tempfile
    import time

    from masksearch_rl.lab.arms import Run, overrides
    from masksearch_rl.lab.data import LabPaths
    from masksearch_rl.rl.launch import PPORun, run_ppo
    from masksearch_rl.rl.report import load_metrics
    from masksearch_rl.retrieval.server_process import ServerProcess

    cfg = LabConfig.quick_preset(out_dir=quick_lab)
    paths = LabPaths(quick_lab)
    model = quick_lab / "policy" / "sft" / "model"
    # This run's own Ray, killed by its session directory, nothing else touched (short: Ray's socket paths must
    # fit in 107 bytes).
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    serve = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(paths.index)]
    with ServerProcess(serve) as server:
        argv = [*overrides(cfg, paths, Run("resume", "ramp", 3, model, 0, curriculum="staged"), tmp_path, server.url),
                "trainer.save_freq=1", "trainer.resume_mode=auto", "trainer.test_freq=-1",
                f"+ray_kwargs.ray_init._temp_dir={ray_dir}"]
        first = PPORun("lab/tiny_cpu", argv, log_path=tmp_path / "first.log", metrics_path=tmp_path / "first.jsonl")
        env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_FILE_LOGGER_PATH": str(first.metrics_path),
               "PYTHONPATH": str(ROOT)}
        tracker = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
        with open(first.log_path, "w") as log:
            proc = subprocess.Popen(first.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
            deadline = time.monotonic() + 1200

            def trained_steps() -> list[int]:
                return [s["step"] for s in load_metrics(first.metrics_path) if "actor/pg_loss" in s] \
                    if first.metrics_path.is_file() else []

            # verl saves a step's checkpoint before it logs the step's metrics: wait for both, then kill mid-step 2.
            while not (tracker.is_file() and tracker.read_text().strip() and trained_steps()):
                assert proc.poll() is None and time.monotonic() < deadline, first.log_path.read_text()[-3000:]
                time.sleep(1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_ray_session(ray_dir)
        checkpointed = int(tracker.read_text().strip())
        killed = load_metrics(first.metrics_path)
        assert 1 <= checkpointed < 3 and [s["step"] for s in killed if "actor/pg_loss" in s][:1] == [1]
        killed = [s for s in killed if s["step"] <= checkpointed]  # what the checkpoint holds

        second = PPORun("lab/tiny_cpu", argv, log_path=tmp_path / "second.log", metrics_path=tmp_path / "second.jsonl",
                        env={"VERL_PLATFORM": "cpu"}, timeout_s=1200)
        run_ppo(second)
    _kill_ray_session(ray_dir)
    resumed = [s for s in load_metrics(second.metrics_path) if "actor/pg_loss" in s]
    # global step restored: no checkpointed step is trained again
    assert [s["step"] for s in resumed] == list(range(checkpointed + 1, 4))
    # The curriculum sampler went on from its saved position (draws keep counting), not from a fresh start.
    before = [s["curriculum/total_draws"] for s in killed if "curriculum/total_draws" in s][-1]
    assert resumed[0]["curriculum/total_draws"] > before
    assert "Load from checkpoint" in (tmp_path / "second.log").read_text() or \
        f"global_step_{checkpointed}" in (tmp_path / "second.log").read_text()


def _kill_ray_session(temp_dir: Path) -> None:
    """SIGKILL every process of the Ray instance started with ``_temp_dir=temp_dir`` (raylet, GCS, workers)."""
    import signal

    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            try:
                os.kill(int(proc_dir.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
