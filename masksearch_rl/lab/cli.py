"""``masksearch-rl lab``: the learning lab (masksearch_rl/lab/__init__.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("lab")(lab_command)


def lab_command(
    out_dir: Path = typer.Option(Path("runs/lab"), "--out", help="Where every stage writes (resumable)."),
    results_dir: Optional[Path] = typer.Option(
        None, "--results", help="Where learning.json/.md and the curves go (default: docs/results; --quick: "
        "<out>/results)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Minutes: tiny world and model, one seed, 2 RL steps per arm "
                               "(checks the lab completes; says nothing about learning)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="RL seeds, comma-separated (default 0,1,2)."),
    arms: Optional[str] = typer.Option(None, "--arms", help="Arms, comma-separated (default: all)."),
    rl_steps: Optional[int] = typer.Option(None, "--rl-steps", help="RL steps per arm."),
    stop_after: str = typer.Option("report", "--stop-after", help="data | policy | arms | report"),
    override: list[str] = typer.Option([], "--override", help="Extra hydra override for every RL run (repeatable)."),
) -> None:
    """Does it learn? Build a tiny search-and-copy policy, run RL arms through verl's main_ppo, write the curves."""
    from masksearch_rl.lab.config import LabConfig
    from masksearch_rl.lab.runner import run_lab

    options: dict = {"out_dir": out_dir}
    if seeds:
        options["seeds"] = tuple(int(s) for s in seeds.split(","))
    if arms:
        options["arms"] = tuple(a.strip() for a in arms.split(",") if a.strip())
    if rl_steps is not None:
        options["rl_steps"] = rl_steps
    if override:
        options["extra_overrides"] = tuple(override)
    options["results_dir"] = results_dir or (out_dir / "results" if quick else Path("docs/results"))
    try:
        cfg = LabConfig.quick_preset(**options) if quick else LabConfig(**options)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    command = "masksearch-rl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_lab(cfg, command, stop_after)
