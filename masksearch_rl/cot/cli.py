"""``masksearch-rl cot build``: multi-agent CoT trajectory construction (see masksearch_rl.cot.pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


def load_config(config: Path | None, overrides: list[str], **fields) -> "CotConfig":  # noqa: F821
    """default.yaml < ``config`` file < ``fields`` (the command's options) < ``key=value`` overrides."""
    from omegaconf import OmegaConf

    from masksearch_rl.configs import reject_unknown
    from masksearch_rl.cot.pipeline import CotConfig

    merged = OmegaConf.load(DEFAULT_CONFIG)
    if config is not None:
        merged = OmegaConf.merge(merged, OmegaConf.load(config))
    merged = OmegaConf.merge(merged, OmegaConf.create({k: v for k, v in fields.items() if v is not None}))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise typer.BadParameter(f"overrides must be key=value, got {bad}")
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    data = OmegaConf.to_container(merged, resolve=True)
    try:
        reject_unknown(CotConfig, data, "cot config key")
        return CotConfig(**data)
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(f"bad cot config: {err}") from err


def register(app: typer.Typer) -> None:
    cot = typer.Typer(help="Multi-agent CoT trajectories (Planner / Rewriter / Observer + judge) for SFT.",
                      no_args_is_help=True)
    app.add_typer(cot, name="cot")

    @cot.command("build")
    def build(
        input: Path = typer.Option(..., "--input", exists=True, dir_okay=False, help="RAMP items or QA JSONL."),
        out: Path = typer.Option(..., "--out", help="Trajectory JSONL (appended; finished ids are skipped)."),
        config: Optional[Path] = typer.Option(None, "--config", exists=True, help="YAML over cot/default.yaml."),
        limit: Optional[int] = typer.Option(None, help="Only the first N input records."),
        concurrency: Optional[int] = typer.Option(None, help="Tasks in flight."),
        progress: bool = typer.Option(True, help="Progress bar."),
        engine: Optional[str] = typer.Option(None, "--engine", help="asyncio (this process) | ray (Ray Data: a "
                                             "local Ray, or the cluster at $RAY_ADDRESS); settings as ray.<key>=..."),
        wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="Log counts and a trajectory "
                                                    "table to W&B (key from $WANDB_API_KEY; WANDB_MODE=offline ok)."),
        wandb_name: Optional[str] = typer.Option(None, "--wandb-name"),
        wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
        wandb_dir: Optional[str] = typer.Option(None, "--wandb-dir", help="Where W&B writes its run directory."),
        overrides: Optional[list[str]] = typer.Argument(None, help="key=value settings, e.g. max_rounds=8"),
    ) -> None:
        """Build trajectories; resumable (re-run the same command after a kill)."""
        from dataclasses import asdict

        from masksearch_rl.cot.pipeline import record_table, run_cot
        from masksearch_rl.jsonl import InputError
        from masksearch_rl.tracking import TrackingConfig, start_run

        cfg = load_config(config, overrides or [], input=str(input), out=str(out), limit=limit,
                          concurrency=concurrency, progress=progress, engine=engine)
        tracking = TrackingConfig(project=wandb_project, name=wandb_name, mode=wandb_mode, dir=wandb_dir)
        with start_run(tracking, "cot-build", asdict(cfg)) as tracker:
            try:
                summary = run_cot(cfg, tracker)
            except InputError as err:  # a truncated .gz: finished records are kept, the command fails naming it
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(1) from None
            tracker.summary({"run": summary["run"], "file": summary["file"], "judge": summary["judge"]})
            if tracker.enabled:
                tracker.log_table("cot/trajectories", *record_table(out))
        typer.echo(json.dumps(summary["run"], indent=2))
        typer.echo(f"file totals: {json.dumps(summary['file'])}")
