"""``masksearch-rl selfevolve iterate``: one Self-Evolve Distillation iteration with a served teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK


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
        retrieval_url: Optional[str] = typer.Option(None, "--retrieval-url", help="Our retrieval server (default "
                                                    "http://127.0.0.1:8000)."),
        index_dir: Optional[str] = typer.Option(None, "--index", help="Search a local index directly (no server)."),
        web: Optional[str] = typer.Option(None, "--web", help="Web search instead: serper | serpapi | google_cse "
                                          "(key from $SERPER_API_KEY ...)."),
        topk: int = typer.Option(DEFAULT_TOPK, "--topk", help="Results per search."),
        max_info_tokens: int = typer.Option(DEFAULT_MAX_INFO_TOKENS, "--max-info-tokens", help="Words of results per <information>."),
        temperature: float = typer.Option(0.7, "--temperature", help="Teacher sampling temperature."),
        judge_fallback: bool = typer.Option(False, "--judge-fallback/--no-judge-fallback",
                                            help="On a failed judge call grade by exact match (marked in the "
                                            "record) instead of retrying the item on the next run."),
        num_items: int = typer.Option(1000, help="Fresh RAMP items the teacher attempts."),
        max_turns: int = typer.Option(4, help="Searches answered per episode."),
        chat_mode: str = typer.Option("turns", help="turns (any chat API) | continue (vLLM continue_final_message)."),
        concurrency: int = typer.Option(32),
        curriculum: Optional[str] = typer.Option(None, "--curriculum", help="Take fresh items and order the SFT "
                                                 "rows by mask count as the RL sampler does: staged | mixed."),
        curriculum_seed: int = typer.Option(0, "--curriculum-seed", help="Shuffle seed of the schedule."),
        engine: str = typer.Option("asyncio", "--engine", help="The teacher step: asyncio (this process) | ray (Ray "
                                   "Data: a local Ray, or the cluster at $RAY_ADDRESS)."),
        ray_workers: int = typer.Option(2, "--ray-workers", help="--engine ray: worker actors."),
        ray_work_dir: Optional[str] = typer.Option(None, "--ray-work-dir", help="--engine ray: shards and "
                                                   "checkpoints (default iter_<i>/teacher.jsonl.ray)."),
        progress: bool = typer.Option(True),
        wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="Log the iteration's stats and a "
                                                    "teacher-trajectory table to W&B (WANDB_MODE=offline ok)."),
        wandb_name: Optional[str] = typer.Option(None, "--wandb-name"),
        wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
        wandb_dir: Optional[str] = typer.Option(None, "--wandb-dir", help="Where W&B writes its run files."),
    ) -> None:
        """Teacher rollouts on fresh items -> judge -> merge into D_T -> SFT parquet; stats in iter_<i>/stats.json."""
        from dataclasses import asdict

        from envs.search_client import search_backend_config
        from masksearch_rl.cot.pipeline import record_table
        from masksearch_rl.selfevolve.iteration import IterationConfig, run_iteration
        from masksearch_rl.sft.cli import curriculum_config
        from masksearch_rl.tracking import TrackingConfig, start_run

        try:
            backend = search_backend_config(retrieval_url, index_dir, web)
        except ValueError as err:
            raise typer.BadParameter("choose one of --retrieval-url, --index, --web") from err
        config = IterationConfig(
            iteration=iteration, items=str(items), work_dir=str(work_dir),
            dataset=str(dataset) if dataset else None,
            teacher={"base_url": teacher_url, "model": teacher_model, "api_key_env": api_key_env,
                     "concurrency": concurrency, "temperature": temperature},
            judge={"base_url": judge_url, "model": judge_model, "api_key_env": api_key_env},
            search={"backend": backend, "topk": topk, "max_info_tokens": max_info_tokens}, num_items=num_items,
            max_turns=max_turns, chat_mode=chat_mode, judge_fallback=judge_fallback, concurrency=concurrency,
            curriculum=asdict(curriculum_config(curriculum, None, curriculum_seed)) if curriculum else None,
            engine=engine, ray={"workers": ray_workers, "work_dir": ray_work_dir, "batch_size": 16},
            progress=progress,
        )
        tracking = TrackingConfig(project=wandb_project, name=wandb_name or f"selfevolve-iter{iteration}",
                                  mode=wandb_mode, dir=wandb_dir)
        with start_run(tracking, "selfevolve", asdict(config)) as tracker:
            stats = run_iteration(config, tracker)
            tracker.summary(stats)
            if tracker.enabled:
                tracker.log_table("selfevolve/teacher_trajectories", *record_table(config.iter_dir / "teacher.jsonl"))
        typer.echo(json.dumps(stats, indent=2))
        if not stats["merge"]["total"]:
            typer.echo(f"no trajectories to train on; failures: {config.iter_dir / 'teacher.jsonl.errors.jsonl'}",
                       err=True)
            raise typer.Exit(1)
