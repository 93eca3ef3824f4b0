"""The lab's RL arms: ``python -m verl.trainer.main_ppo`` with the lab recipe (recipes/configs/lab/tiny_cpu.yaml),
our plugins and the lab's data, one run per arm and seed, each validated on both held-out sets.

Arms (``LabConfig.arms``):

* ``sft``: the SFT policy, evaluated only: the validation ``dapo`` runs before its first step (the same policy, the
  same greedy validation), or its own ``trainer.val_only`` run when ``dapo`` is not among the arms;
* ``dapo``: DAPO on RAMP items, staged curriculum (1 -> 2 -> 3 -> 4 masks, then all mixed); it also saves the
  checkpoint at half its steps, from which ``ramp_then_qa`` goes on;
* ``dapo_mixed``: the same with the mixed sampler (no curriculum);
* ``dapo_hidden``: ``dapo`` with each item's source passage hidden from its searches (``ramp export --hide-source``);
* ``qa_only``: DAPO on the questions, all its steps;
* ``ramp_then_qa``: ``dapo``'s first half (RAMP), then DAPO on the questions for the other half (Stage I -> II), the
  same total steps as ``qa_only``.

Every run validates on the held-out RAMP items and the held-out questions every ``eval_every`` steps (greedy,
verl's validation): answer accuracy (our reward's ``acc``), EM, F1, format rate, searches per episode and response
length in tokens. Every arm starts from the same SFT policy, so step 0 is validated once per seed (by ``dapo``) and
shared. A finished run leaves ``done.json`` and is not run again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import atomic_path
from masksearch_rl.lab.config import LabConfig
from masksearch_rl.lab.data import QA_SOURCE, RAMP_SOURCE, LabPaths

RECIPE = "lab/tiny_cpu"
# What the curves record, per held-out set: our name -> the reward key verl logs as val-*/<data source>/<key>/mean@1.
CURVE_KEYS = {"val_acc": "acc", "em": "em", "f1": "f1", "format_rate": "format", "searches": "rollout_searches",
              "response_length": "rollout_response_tokens"}
TASK_SOURCE = {"ramp": RAMP_SOURCE, "qa": QA_SOURCE}


@dataclass(frozen=True)
class Run:
    """One main_ppo run: train on ``task`` (``ramp``, ``ramp_hidden`` or ``qa``) from ``model`` for ``steps``."""

    name: str
    task: str
    steps: int
    model: Path
    seed: int
    curriculum: str | None = None  # staged | mixed (RAMP); None: no curriculum (QA)
    save_at: int | None = None  # also save an HF checkpoint at this step
    val_only: bool = False
    val_before_train: bool = False  # the step-0 validation of the SFT policy (once per seed)


def run_dir(cfg: LabConfig, name: str, seed: int) -> Path:
    return cfg.out_dir / "arms" / f"{name}_seed{seed}"


def overrides(cfg: LabConfig, paths: LabPaths, run: Run, out: Path, server_url: str) -> list[str]:
    """The hydra overrides of one run (the lab recipe's defaults do the rest)."""
    train_file, _ = paths.rl_files(run.task)
    values = [
        f"paths.data_dir={paths.root.resolve()}",
        f"paths.model_dir={run.model.resolve()}",
        f"data.train_files={train_file.resolve()}",
        f"data.val_files=[{paths.rl_files('ramp')[1].resolve()},{paths.rl_files('qa')[1].resolve()}]",
        f"data.seed={run.seed}",
        f"actor_rollout_ref.actor.fsdp_config.seed={run.seed}",
        f"trainer.total_training_steps={max(run.steps, 1)}",
        f"trainer.test_freq={cfg.eval_every}",
        f"trainer.experiment_name=lab-{run.name}-seed{run.seed}",
        f"trainer.default_local_dir={(out / 'checkpoints').resolve()}",
        f"trainer.validation_data_dir={(out / 'validation').resolve()}",
        f"search_env.backend.url={server_url}",
        f"search_env.topk={cfg.topk}",
        f"search_env.max_info_tokens={cfg.max_info_tokens}",
    ]
    if run.val_only:
        values.append("trainer.val_only=true")
    values.append(f"trainer.val_before_train={str(run.val_only or run.val_before_train).lower()}")
    if run.curriculum is not None:
        values += [f"curriculum={run.curriculum}", f"curriculum.seed={run.seed}"]
        if run.curriculum == "staged":
            # Four stages of an eighth of the run each, then everything mixed.
            values.append(f"curriculum.steps_per_stage={max(1, run.steps // 8)}")
    else:
        values.append("trainer.v1.trainer_mode=masksearch_sync")
    if run.save_at is not None:
        values += [f"trainer.save_freq={run.save_at}",
                   "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"]
    if run.task == "ramp_hidden":
        # Hidden sources leave most groups all-wrong; DAPO would refill forever, so every group is kept.
        values.append("algorithm.filter_groups.enable=false")
    return [*values, *cfg.extra_overrides]


def execute(cfg: LabConfig, paths: LabPaths, run: Run, server_url: str) -> dict[str, Any]:
    """Run ``run`` through verl's main_ppo (kept when ``done.json`` says it finished); returns done.json."""
    from masksearch_rl.rl.launch import PPORun, run_ppo

    out = run_dir(cfg, run.name, run.seed)
    done_path = out / "done.json"
    if done_path.is_file():
        return json.loads(done_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    env = {"VERL_PLATFORM": os.environ.get("VERL_PLATFORM", "cpu")}
    ppo = PPORun(RECIPE, overrides(cfg, paths, run, out, server_url), log_path=out / "main_ppo.log",
                 metrics_path=out / "metrics.jsonl", env=env, timeout_s=cfg.rl_timeout_s)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a killed run starts over: its metrics would repeat steps
    wall_s = run_ppo(ppo)
    done = {"run": run.name, "seed": run.seed, "task": run.task, "steps": run.steps, "model": str(run.model),
            "wall_s": round(wall_s, 1), "metrics": str(out / "metrics.jsonl")}
    with atomic_path(done_path) as tmp:
        tmp.write_text(json.dumps(done, indent=2))
    return done


def half_checkpoint(cfg: LabConfig, seed: int) -> Path:
    """The HF model ``dapo`` saved at half its steps (where ``ramp_then_qa`` switches to the questions)."""
    step = cfg.rl_steps // 2
    path = run_dir(cfg, "dapo", seed) / "checkpoints" / f"global_step_{step}" / "actor" / "huggingface"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: dapo (seed {seed}) left no HF checkpoint at step {step}")
    return path


def dapo_run(cfg: LabConfig, seed: int, sft_model: Path) -> Run:
    """``dapo``: staged curriculum, the SFT policy's step-0 validation, an HF checkpoint at half its steps."""
    n = cfg.rl_steps
    return Run("dapo", "ramp", n, sft_model, seed, curriculum="staged", save_at=n // 2, val_before_train=True)


def baseline_run(cfg: LabConfig, seed: int, sft_model: Path) -> Run:
    """The run whose step-0 validation every arm of ``seed`` shares: ``dapo``'s, or a validation-only run."""
    if "dapo" in cfg.arms:
        return dapo_run(cfg, seed, sft_model)
    return Run("sft", "ramp", 0, sft_model, seed, val_only=True)


def runs_for(cfg: LabConfig, arm: str, seed: int, sft_model: Path) -> list[Run]:
    """The main_ppo runs an arm trains with, in order (``ramp_then_qa`` goes on from ``dapo``'s first half)."""
    n = cfg.rl_steps
    if arm == "sft":
        return []
    if arm == "dapo":
        return [dapo_run(cfg, seed, sft_model)]
    if arm == "dapo_mixed":
        return [Run("dapo_mixed", "ramp", n, sft_model, seed, curriculum="mixed")]
    if arm == "dapo_hidden":
        return [Run("dapo_hidden", "ramp_hidden", n, sft_model, seed, curriculum="staged")]
    if arm == "qa_only":
        return [Run("qa_only", "qa", n, sft_model, seed)]
    if arm == "ramp_then_qa":
        return [dapo_run(cfg, seed, sft_model), Run("ramp_then_qa", "qa", n // 2, Path("<dapo half>"), seed)]
    raise ValueError(f"unknown arm {arm!r}")


def run_arm(cfg: LabConfig, paths: LabPaths, arm: str, seed: int, sft_model: Path, server_url: str) -> dict:
    """Run (or reuse) an arm's runs; returns its curves on both held-out sets, step 0 being the SFT policy."""
    from masksearch_rl.rl.report import load_metrics

    baseline = load_metrics(execute(cfg, paths, baseline_run(cfg, seed, sft_model), server_url)["metrics"])
    start = [s for s in baseline if s["step"] == 0]
    steps_of: list[list[dict]] = []
    for run in runs_for(cfg, arm, seed, sft_model):
        if run.name == "ramp_then_qa":
            run = Run(run.name, run.task, run.steps, half_checkpoint(cfg, seed), seed)
        done = execute(cfg, paths, run, server_url)
        steps_of.append([s for s in load_metrics(done["metrics"]) if s["step"] > 0])
    if arm == "ramp_then_qa":  # dapo's RAMP half, then the QA half shifted by it
        half = cfg.rl_steps // 2
        trained = [s for s in steps_of[0] if s["step"] <= half] + [{**s, "step": s["step"] + half} for s in steps_of[1]]
    else:
        trained = steps_of[-1] if steps_of else []
    return curves(start + trained)


def curves(steps: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{"ramp": {"steps": [...], "val_acc": [...], ...}, "qa": {...}}`` from verl's logged validation metrics."""
    result = {}
    for task, source in TASK_SOURCE.items():
        rows = [s for s in steps if f"val-core/{source}/acc/mean@1" in s]
        series: dict[str, list[float]] = {"steps": [int(s["step"]) for s in rows]}
        for name, key in CURVE_KEYS.items():
            column = "val-core" if key == "acc" else "val-aux"
            series[name] = [round(float(s.get(f"{column}/{source}/{key}/mean@1", float("nan"))), 4) for s in rows]
        result[task] = series
    return result
