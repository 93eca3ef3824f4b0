"""Launch verl's own PPO entry point (``python -m verl.trainer.main_ppo``) on one of our recipes.

The quickstart, the CI test and a user's first run all go through this one function, so they exercise exactly what
a cluster runs: verl's hydra main, Ray, its V1 trainer, with our plugins loaded by the ``verl.plugins`` entry point.
It adds only what a launcher should: the recipe's config directory, an environment (platform, file logger, W&B
mode), a log file, a progress line per training step, a wall-clock limit, and a clear error naming the log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

import recipes.configs

console = Console()

CONFIG_ROOT = Path(recipes.configs.__file__).resolve().parent
_STEP_LINE = re.compile(r"step:(\d+) - ")
_METRIC = re.compile(r"(critic/score/mean|env/search_count/mean|reward/format/mean|timing_s/step):([-\d.eE+naif]+)")


class TrainingFailed(RuntimeError):
    """verl exited with an error; the message names the log holding its traceback."""


@dataclass
class PPORun:
    """One ``main_ppo`` run: ``recipe`` is a config path under recipes/configs, e.g. ``quickstart/tiny_cpu``."""

    recipe: str
    overrides: list[str] = field(default_factory=list)
    log_path: Path = Path("runs/ppo.log")
    metrics_path: Path | None = None  # verl's file logger output (JSONL, one line per step)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0

    def command(self) -> list[str]:
        config_dir, _, config_name = self.recipe.rpartition("/")
        return [
            sys.executable,
            "-m",
            "verl.trainer.main_ppo",
            f"--config-path={CONFIG_ROOT / config_dir}",
            f"--config-name={config_name}",
            *self.overrides,
        ]


# Config groups that are pieces of a recipe (``+curriculum=staged``, ``platform: cpu``), not recipes.
OVERLAY_GROUPS = ("curriculum", "platform")


def recipe_names() -> list[str]:
    """Every main_ppo recipe we ship, as ``<group>/<name>`` (the ``--config-path``/``--config-name`` pair)."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in CONFIG_ROOT.glob("*/*.yaml")
                  if p.parent.name not in OVERLAY_GROUPS)


def compose_recipe(recipe: str, overrides: list[str] | tuple[str, ...] = ()):
    """The recipe's config as ``main_ppo`` would see it (hydra compose over verl's config), without running it."""
    from hydra import compose, initialize_config_dir

    config_dir, _, config_name = recipe.rpartition("/")
    with initialize_config_dir(config_dir=str(CONFIG_ROOT / config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def run_ppo(run: PPORun) -> float:
    """Run verl's trainer to completion; returns the wall time in seconds, raises :class:`TrainingFailed`."""
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.env}
    if run.metrics_path is not None:
        run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        env["VERL_FILE_LOGGER_PATH"] = str(run.metrics_path.resolve())
    # Ray workers must import this checkout's packages (recipes, reward, envs) whatever their working directory.
    repo_root = str(CONFIG_ROOT.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    console.print(f"[dim]$ {escape(' '.join(run.command()))}[/dim]\n[dim]log: {escape(str(run.log_path))}[/dim]")
    with open(run.log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            run.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                _show_progress(line, started)
                if time.perf_counter() - started > run.timeout_s:
                    process.kill()
                    raise TrainingFailed(f"verl did not finish within {run.timeout_s:.0f} s; see {run.log_path}")
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if code != 0:
        raise TrainingFailed(f"verl's main_ppo exited with code {code}; the traceback is in {run.log_path}")
    return time.perf_counter() - started


def _show_progress(line: str, started: float) -> None:
    match = _STEP_LINE.search(line)
    if match is None:
        return
    values = dict(_METRIC.findall(line))
    shown = "  ".join(f"{key.split('/')[-2] if key.count('/') > 1 else key}={float(v):.3g}" for key, v in values.items())
    console.print(f"  step {match.group(1)}  [{time.perf_counter() - started:6.0f}s]  {shown}")
