"""``masksearch-rl ramp generate|export``: RAMP items from a passage corpus, then verl parquet."""

from __future__ import annotations

import json
from typing import Optional

import typer

ramp_app = typer.Typer(help="RAMP data: mask salient spans in passages; export verl RL parquet.", no_args_is_help=True)


@ramp_app.command("generate")
def generate_command(
    corpus: str = typer.Option(
        ..., "--corpus", help="Passage JSONL ({id, contents} and/or {title, text}, optional entities)."
    ),
    out: str = typer.Option(..., "--out", help="Output RAMP items JSONL (appended to; finished passages are skipped)."),
    corpus_format: str = typer.Option(
        "passages",
        "--corpus-format",
        help="passages (our JSONL) | auto | kilt | flashrag | wikiextractor | masksearch-dir",
    ),
    extractor: str = typer.Option("offline", "--extractor", help="offline | llm"),
    llm_base_url: str = typer.Option("http://127.0.0.1:8000/v1", "--llm-base-url", help="OpenAI-compatible endpoint."),
    llm_model: str = typer.Option("Qwen/Qwen2.5-72B-Instruct", "--llm-model"),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="NAME of the env variable holding the key."
    ),
    llm_concurrency: int = typer.Option(
        16, "--llm-concurrency", help="Requests in flight (with --engine ray: over all workers together)."
    ),
    llm_rate: Optional[float] = typer.Option(
        None, "--llm-rate-per-s", help="Requests per second (with --engine ray: over all workers together)."
    ),
    llm_timeout: float = typer.Option(60.0, "--llm-timeout", help="Deadline of one attempt, whole reply included."),
    llm_max_retries: int = typer.Option(3, "--llm-max-retries"),
    llm_cache_dir: Optional[str] = typer.Option(
        None, "--llm-cache-dir", help="On-disk response cache (default: next to --out)."
    ),
    k_dist: str = typer.Option(
        "paper",
        "--k-dist",
        help="Spans masked per passage: paper (= uniform: k uniform on 1..min(--max-masks, candidates), as the "
        "paper draws it) | max_available (the authors' script: as many as there are, up to 4) | weights for k=1.. e.g. "
        "0.4,0.3,0.2,0.1",
    ),
    weighting: str = typer.Option("paper", "--weighting", help="paper (longer spans, numbers favoured) | uniform"),
    max_masks: int = typer.Option(4, "--max-masks"),
    instruction: Optional[str] = typer.Option(
        None, "--instruction", help="Instruction text (default: envs.prompts.RAMP_INSTRUCTION)."
    ),
    ppl_model: Optional[str] = typer.Option(
        None, "--ppl-model", help="HF causal LM path: mask the hardest spans by loss."
    ),
    ppl_device: str = typer.Option("cpu", "--ppl-device"),
    ppl_batch_size: int = typer.Option(4, "--ppl-batch-size"),
    workers: int = typer.Option(1, "--workers", help="Processes for the offline extractor."),
    seed: int = typer.Option(0, "--seed"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N passages of the corpus."),
    min_words: int = typer.Option(8, "--min-words", help="Drop shorter passages."),
    prepend_title: bool = typer.Option(
        True, "--prepend-title/--no-prepend-title", help="Name the subject when the passage never does."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    engine: str = typer.Option(
        "asyncio", "--engine", help="asyncio (this process) | ray (Ray Data: a local Ray, or the cluster at "
        "$RAY_ADDRESS)."
    ),
    ray_workers: int = typer.Option(2, "--ray-workers", help="--engine ray: worker actors."),
    ray_batch_size: int = typer.Option(64, "--ray-batch-size", help="--engine ray: passages per map batch."),
    ray_work_dir: Optional[str] = typer.Option(
        None, "--ray-work-dir", help="--engine ray: input/output shards and checkpoints (default <out>.ray; on a "
        "cluster, a shared file system)."
    ),
    wandb_project: Optional[str] = typer.Option(
        None, "--wandb-project", help="Log the run summary to W&B (key from $WANDB_API_KEY; WANDB_MODE=offline ok)."
    ),
    wandb_name: Optional[str] = typer.Option(None, "--wandb-name"),
    wandb_mode: Optional[str] = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
    wandb_dir: Optional[str] = typer.Option(None, "--wandb-dir", help="Where W&B writes its run directory."),
) -> None:
    """Generate RAMP items (resumable: re-run the same command after a kill)."""
    from envs.prompts import RAMP_INSTRUCTION
    from masksearch_rl.jsonl import InputError
    from masksearch_rl.llm import LLMConfig
    from masksearch_rl.ramp.masking import MaskingConfig
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
    from masksearch_rl.ramp.ppl import PplConfig

    try:
        config = RampConfig(
            corpus=corpus,
            out=out,
            corpus_format=corpus_format,
            extractor=extractor,
            masking=MaskingConfig(
                max_masks=max_masks, k_dist=k_dist, weighting=weighting, instruction=instruction or RAMP_INSTRUCTION
            ),
            llm=LLMConfig(
                base_url=llm_base_url,
                model=llm_model,
                api_key_env=api_key_env,
                concurrency=llm_concurrency,
                rate_per_s=llm_rate,
                timeout_s=llm_timeout,
                max_retries=llm_max_retries,
                cache_dir=llm_cache_dir or f"{out}.llm_cache",
            )
            if extractor == "llm"
            else None,
            ppl=PplConfig(model_path=ppl_model, device=ppl_device, batch_size=ppl_batch_size) if ppl_model else None,
            workers=workers,
            seed=seed,
            limit=limit,
            min_words=min_words,
            prepend_title=prepend_title,
            progress=progress,
            engine=engine,
            ray={"workers": ray_workers, "batch_size": ray_batch_size, "work_dir": ray_work_dir},
        )
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    from masksearch_rl.tracking import TrackingConfig, start_run

    options = {"corpus": corpus, "out": out, "extractor": extractor, "k_dist": k_dist, "weighting": weighting,
               "max_masks": max_masks, "seed": seed, "limit": limit, "ppl_model": ppl_model, "engine": engine}
    with start_run(TrackingConfig(project=wandb_project, name=wandb_name, mode=wandb_mode, dir=wandb_dir),
                   "ramp-generate",
                   options) as tracker:
        try:
            summary = generate_ramp(config, tracker)
        except InputError as err:  # a truncated .gz: what was finished is kept, the command fails naming the file
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from None
        k_rows = _k_rows(summary["totals"]["mask_histogram"])
        tracker.summary({"run": summary["run"], "totals": summary["totals"]})
        if tracker.enabled:
            tracker.log_table("ramp/items", ["id", "query", "masks", "num_masks"], _sample_items(out, 20))
            tracker.log_table("ramp/k_histogram", K_COLUMNS, k_rows)
    run, totals = summary["run"], summary["totals"]
    typer.echo(
        json.dumps(
            {
                "items_this_run": run["items"],
                "dropped_this_run": run["dropped"],
                "skipped_done": run["skipped_done"],
                "mask_histogram": run["mask_histogram"],
                "drop_reasons": run["drop_reasons"],
                "parse_rejects": run["parse_rejects"],
                "llm_errors": run["llm_errors"],
                "bad_lines": run["bad_lines"]["total"],
                "passages_per_s": run["passages_per_s"],
                "totals": totals,
                "summary_file": str(config.summary_path),
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    _print_k_histogram(k_rows)
    if run["llm_errors"] or run["parse_rejects"]:
        typer.echo(f"{run['llm_errors']} passages failed at the endpoint and {run['parse_rejects']} got replies that "
                   "did not parse; they were left for a re-run.", err=True)
    if run["stopped"]:
        typer.echo(run["stopped"], err=True)
        raise typer.Exit(code=1)
    if "ray" in summary and summary["ray"]["error"] is None and summary["run"].get("errors_pending"):
        typer.echo(f"{summary['run']['errors_pending']} passages are still failing: {out}.errors.jsonl", err=True)


@ramp_app.command("export")
def export_command(
    items: str = typer.Option(..., "--items", help="RAMP items JSONL from `ramp generate`."),
    out_dir: str = typer.Option(..., "--out-dir", help="Writes train.parquet and val.parquet here."),
    val_fraction: float = typer.Option(0.05, "--val-fraction"),
    seed: int = typer.Option(0, "--seed"),
    agent_name: Optional[str] = typer.Option(
        None, "--agent-name", help="Row agent_name (default: our tag agent loop)."
    ),
    tool_name: str = typer.Option("search", "--tool-name", help="Key under extra_info.tools_kwargs."),
    hide_source: bool = typer.Option(
        False, "--hide-source", help="Hide each item's source passage from its episode's searches."
    ),
) -> None:
    """Export RAMP items to verl RL parquet (seeded train/val split by passage id)."""
    from envs.prompts import TAG_AGENT_NAME
    from masksearch_rl.ramp.export import ExportConfig, export_parquet

    try:
        config = ExportConfig(
            val_fraction=val_fraction, seed=seed, agent_name=agent_name or TAG_AGENT_NAME, tool_name=tool_name,
            hide_source=hide_source,
        )
        result = export_parquet(items, out_dir, config)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(json.dumps(result, indent=2))


K_COLUMNS = ["k", "items", "share"]


def _k_rows(histogram: dict[str, int]) -> list[list]:
    """[k, items, share] rows of a mask-count histogram (JSON keys are strings), in order of k."""
    total = sum(histogram.values())
    return [[int(k), n, round(n / total, 4)] for k, n in sorted(histogram.items(), key=lambda kv: int(kv[0]))]


def _print_k_histogram(rows: list[list]) -> None:
    """The realized k over the output file, on stderr (stdout stays JSON): a skewed k starves curriculum stages."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="masks per item (k), all items", title_justify="left")
    for column in K_COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("")
    for k, items, share in rows:
        table.add_row(str(k), f"{items:,}", f"{share:.1%}", "\u2588" * round(share * 40))
    Console(stderr=True).print(table)


def _sample_items(path: str, n: int) -> list[list]:
    """The first ``n`` items of the output, for the W&B sample table."""
    from masksearch_rl.jsonl import BadLines, iter_jsonl

    rows = []
    for _, item in iter_jsonl(path, BadLines(), required=("id", "query", "masks", "num_masks")):
        rows.append([item["id"], item["query"], item["masks"], item["num_masks"]])
        if len(rows) >= n:
            break
    return rows


def register(app: typer.Typer) -> None:
    """Add ``ramp`` to the top-level app."""
    app.add_typer(ramp_app, name="ramp")


if __name__ == "__main__":
    ramp_app()
