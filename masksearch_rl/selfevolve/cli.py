"""``masksearch-rl selfevolve iterate``: one Self-Evolve Distillation iteration with a served teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    se = typer.Typer(help="Self-Evolve Distillation (teacher trajectories -> judge -> merged D_T).",
                     no_args_is_help=True)
    app.add_typer(se, name="selfevolve")

    @se.command("iterate")
    def iterate(
        iteration: int = typer.Option(..., "--iteration", "-i", help="1, 2, ... (names work_dir/iter_<i>)."),
        items: Path = typer.Option(..., "--items", exists=True, dir_okay=False, help="RAMP items pool JSONL."),
        work_dir: Path = typer.Option(Path("runs/selfevolve"), "--work-dir"),
        dataset: Optional[Path] = typer.Option(None, "--dataset", exists=True, help="D_T so far (JSONL)."),
        teacher_url: str = typer.Option(..., "--teacher-url", help="OpenAI-compatible base URL, e.g. vLLM's /v1."),
        teacher_model: str = typer.Option(..., "--teacher-model", help="Served model name."),
        judge_url: str = typer.Option(..., "--judge-url"),
        judge_model: str = typer.Option(..., "--judge-model"),
        api_key_env: str = typer.Option("OPENAI_API_KEY", help="Name of the env variable holding the key."),
        retrieval_url: str = typer.Option("http://127.0.0.1:8000", help="Our retrieval server."),
        num_items: int = typer.Option(1000, help="Fresh RAMP items the teacher attempts."),
        max_turns: int = typer.Option(4, help="Searches answered per episode."),
        chat_mode: str = typer.Option("turns", help="turns (any chat API) | continue (vLLM continue_final_message)."),
        concurrency: int = typer.Option(32),
        progress: bool = typer.Option(True),
        wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="Log the iteration's stats and a "
                                                    "teacher-trajectory table to W&B (WANDB_MODE=offline ok)."),
        wandb_name: Optional[str] = typer.Option(None, "--wandb-name"),
        wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
    ) -> None:
        """Teacher rollouts on fresh items -> judge -> merge into D_T -> SFT parquet; stats in iter_<i>/stats.json."""
        from dataclasses import asdict

        from masksearch_rl.cot.pipeline import record_table
        from masksearch_rl.selfevolve.iteration import IterationConfig, run_iteration
        from masksearch_rl.tracking import TrackingConfig, start_run

        config = IterationConfig(
            iteration=iteration, items=str(items), work_dir=str(work_dir),
            dataset=str(dataset) if dataset else None,
            teacher={"base_url": teacher_url, "model": teacher_model, "api_key_env": api_key_env,
                     "concurrency": concurrency, "temperature": 0.7},
            judge={"base_url": judge_url, "model": judge_model, "api_key_env": api_key_env},
            search={"backend": {"type": "server", "url": retrieval_url}}, num_items=num_items, max_turns=max_turns,
            chat_mode=chat_mode, concurrency=concurrency, progress=progress,
        )
        tracking = TrackingConfig(project=wandb_project, name=wandb_name or f"selfevolve-iter{iteration}",
                                  mode=wandb_mode)
        with start_run(tracking, "selfevolve", asdict(config)) as tracker:
            stats = run_iteration(config)
            tracker.summary(stats)
            if tracker.enabled:
                tracker.log_table("selfevolve/teacher_trajectories", *record_table(config.iter_dir / "teacher.jsonl"))
        typer.echo(json.dumps(stats, indent=2))
