"""``masksearch-rl lab``: data -> policy -> diagnostics -> RL arms -> results, each stage kept when done.

A killed lab resumes where it stopped: the world, items and parquets are written atomically, verl's SFT runs resume
from their checkpoints, and each RL run that finished left ``done.json`` (an unfinished one starts over).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from masksearch_rl.lab.config import ARM_TASK, LabConfig
from masksearch_rl.lab.data import LabPaths

console = Console()
STAGES = ("data", "policy", "arms", "report")


def run_lab(cfg: LabConfig, command: str, stop_after: str = "report") -> dict[str, Any]:
    """Run the lab up to ``stop_after`` (one of :data:`STAGES`); returns what ``learning.json`` holds."""
    from masksearch_rl.lab.data import build_data, build_world
    from masksearch_rl.lab.policy import copy_diagnostics, init_policy, train_policy

    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    paths = LabPaths(cfg.out_dir)
    timings: dict[str, float] = {}

    console.rule("lab 1/4: world, items, splits, RL parquets, oracle trajectories")
    started = time.perf_counter()
    build_world(cfg, paths)
    init_dir = init_policy(cfg, paths, cfg.out_dir / "policy" / "init")
    data = build_data(cfg, paths, init_dir)
    timings["data_s"] = round(time.perf_counter() - started, 1)
    console.print(data)
    if stop_after == "data":
        return {"data": data}

    console.rule("lab 2/4: policy (copy pre-training + SFT) and its diagnostics")
    started = time.perf_counter()
    sft_model = train_policy(cfg, paths, init_dir, cfg.out_dir / "policy")
    timings["policy_s"] = round(time.perf_counter() - started, 1)
    diagnostics = copy_diagnostics(cfg, paths, sft_model, cfg.out_dir / "policy" / "diagnostics.json")
    console.print({k: v for k, v in diagnostics["ramp"].items() if k != "examples"}, diagnostics["qa"])
    policy = {"model": str(sft_model), "diagnostics": diagnostics, "build": _build_note(cfg, sft_model)}
    if stop_after == "policy":
        return {"data": data, "policy": policy}

    console.rule(f"lab 3/4: RL arms {list(cfg.arms)} x seeds {list(cfg.seeds)} through verl's main_ppo")
    started = time.perf_counter()
    arms = run_arms(cfg, paths, sft_model)
    timings["arms_s"] = round(time.perf_counter() - started, 1)
    learning = {"command": command, "date": datetime.date.today().isoformat(), "config": cfg.describe(),
                "data": data, "policy": policy, "arms": arms, "timings": timings}
    if stop_after == "arms":
        return learning

    console.rule("lab 4/4: results")
    from masksearch_rl.lab.report import write_results

    for path in write_results(cfg.results_dir, learning):
        console.print(f"wrote {path}")
    return learning


def run_arms(cfg: LabConfig, paths: LabPaths, sft_model: Path) -> dict[str, Any]:
    """Every arm and seed, with one retrieval server (``masksearch-rl serve``) for all of them."""
    from masksearch_rl.lab.arms import run_arm
    from masksearch_rl.lab.report import seed_record
    from masksearch_rl.retrieval.server_process import ServerProcess

    arms: dict[str, Any] = {arm: {"task": ARM_TASK[arm], "seeds": {}} for arm in cfg.arms}
    log_path = cfg.out_dir / "arms" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(paths.index)]
    with open(log_path, "a") as log, ServerProcess(cmd, log=log) as server:
        for seed in cfg.seeds:
            for arm in cfg.arms:
                console.print(f"[bold]{arm}[/bold] seed {seed}")
                curves = run_arm(cfg, paths, arm, seed, sft_model, server.url)
                arms[arm]["seeds"][str(seed)] = seed_record(arm, curves)
    return arms


def _build_note(cfg: LabConfig, sft_model: Path) -> str:
    """How the policy was built, from its stages' records."""
    meta_path = sft_model / "masksearch_sft.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    pretrain_meta = cfg.out_dir / "policy" / "pretrain" / "model" / "masksearch_sft.json"
    pretrain = json.loads(pretrain_meta.read_text()) if pretrain_meta.is_file() else {}
    return (f"`{cfg.model_shape}` Qwen2, {cfg.pretrain_steps} copy pre-training steps "
            f"({pretrain.get('train_s', '?')} s) + {cfg.sft_steps} SFT steps ({meta.get('train_s', '?')} s), "
            f"batch {cfg.batch_size}, through masksearch_rl.sft.train (backend {cfg.sft_backend}) on the CPU")
