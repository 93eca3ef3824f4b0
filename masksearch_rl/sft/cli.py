"""``masksearch-rl sft export|oracle|warmup``: SFT data and the quickstart warm-up.

export  kept trajectories -> SFT parquet (training itself: recipes/launch/sft_torchrun.sh)
oracle  RAMP items + index -> oracle tag-protocol trajectories -> SFT parquet (masksearch_rl.sft.oracle)
warmup  oracle data + verl's SFT trainer on the CPU -> a warmed-up HF model dir (masksearch_rl.sft.warmup)
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK


def curriculum_config(mode: str, stages: str | None, seed: int, epochs_per_stage: float = 1.0,
                      replay_fraction: float = 0.0) -> "CurriculumConfig":  # noqa: F821
    """A data-file curriculum from command-line options (staged or mixed; adaptive needs training rewards)."""
    from masksearch_rl.curriculum.sampler import CurriculumConfig

    if mode not in ("staged", "mixed"):
        raise typer.BadParameter(f"--curriculum must be staged or mixed, got {mode!r}")
    try:
        stage_list = [int(k) for k in stages.split(",")] if stages else None
        return CurriculumConfig(mode=mode, seed=seed, stages=stage_list, epochs_per_stage=epochs_per_stage,
                                replay_fraction=replay_fraction)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def register(app: typer.Typer) -> None:
    sft = typer.Typer(help="SFT data (trajectory JSONL -> parquet for verl's MultiTurnSFTDataset).",
                      no_args_is_help=True)
    app.add_typer(sft, name="sft")

    @sft.command("export")
    def export(
        inputs: list[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                            help="Trajectory JSONL files, oldest first (first occurrence wins)."),
        out_dir: Path = typer.Option(..., "--out-dir", help="Writes train.parquet and val.parquet here."),
        val_fraction: float = typer.Option(0.02, help="Share of ids held out for validation."),
        seed: int = typer.Option(0, help="Split seed."),
        tokenizer: str = typer.Option(None, "--tokenizer", help="The SFT model's tokenizer (HF name or dir), to "
                                      "measure trajectories; use with --max-tokens."),
        max_tokens: int = typer.Option(None, "--max-tokens", help="Drop (and count) trajectories longer than this "
                                       "many chat-template tokens; set to the recipe's data.max_length, so none is "
                                       "cut before its <answer>."),
        curriculum: str = typer.Option(None, "--curriculum", help="Order the train rows by mask count as the RL "
                                       "sampler does: staged (stage by stage, plus one file per stage) | mixed."),
        curriculum_stages: str = typer.Option(None, "--curriculum-stages", help="Stage order as mask counts, e.g. "
                                              "1,2,3,4 (default: every count present, ascending)."),
        curriculum_seed: int = typer.Option(0, "--curriculum-seed", help="Shuffle seed of the schedule."),
        epochs_per_stage: float = typer.Option(1.0, "--epochs-per-stage", help="staged: passes over each stage."),
        replay_fraction: float = typer.Option(0.0, "--replay-fraction", help="staged: share of rows replayed from "
                                              "earlier stages."),
    ) -> None:
        """Export the ``keep: true`` trajectories, deduplicated by id and by content."""
        from masksearch_rl.sft.export import export_sft

        if (tokenizer is None) != (max_tokens is None):
            raise typer.BadParameter("--tokenizer and --max-tokens go together")
        schedule = None
        if curriculum is not None:
            schedule = curriculum_config(curriculum, curriculum_stages, curriculum_seed, epochs_per_stage,
                                         replay_fraction)
        try:
            summary = export_sft(list(inputs), out_dir, val_fraction, seed, tokenizer=tokenizer, max_tokens=max_tokens,
                                 curriculum=schedule)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        typer.echo(json.dumps(summary, indent=2))

    @sft.command("oracle")
    def oracle(
        ramp: Path = typer.Option(..., "--ramp", exists=True, dir_okay=False, help="RAMP items JSONL."),
        index: Path = typer.Option(..., "--index", exists=True, file_okay=False, help="Index directory (BM25 ...)."),
        out: Path = typer.Option(..., "--out", help="Writes trajectories.jsonl, train/val.parquet, summary.json."),
        topk: int = typer.Option(DEFAULT_TOPK, help="Results per search (match the RL environment's search_env.topk)."),
        max_searches: int = typer.Option(2, help="Queries tried per item until the source passage comes back."),
        max_info_tokens: int = typer.Option(
            DEFAULT_MAX_INFO_TOKENS, help="Search results kept per <information> block: tokens of --tokenizer, else words."
        ),
        tokenizer: str = typer.Option(None, help="The policy's tokenizer (HF name or dir), as the RL env truncates."),
        keep_unfound: bool = typer.Option(False, help="Also keep items whose source passage no query retrieved."),
        val_fraction: float = typer.Option(0.05, help="Share of ids held out (same rule as the RL parquet)."),
        seed: int = typer.Option(0, help="Split seed and wording of the thoughts."),
        limit: int = typer.Option(None, help="Only the first N items."),
        wording: str = typer.Option("varied", help="varied | fixed (one wording, no copied names: tiny models)."),
        hide_source: bool = typer.Option(False, "--hide-source", help="Hide each item's source passage from its "
                                         "searches (as `ramp export --hide-source`); found = results state the spans."),
    ) -> None:
        """Oracle trajectories (real search results, gold spans) in the SFT export's message layout."""
        from masksearch_rl.sft.oracle import OracleConfig, write_oracle_sft

        config = OracleConfig(topk=topk, max_info_tokens=max_info_tokens, tokenizer=tokenizer,
                              max_searches=max_searches, seed=seed,
                              keep_unfound=keep_unfound, val_fraction=val_fraction, limit=limit,
                              wording=wording, hide_source=hide_source)
        summary = write_oracle_sft(ramp, index, out, config)
        summary.pop("config")
        typer.echo(json.dumps(summary, indent=2))

    @sft.command("warmup")
    def warmup(
        ramp: Path = typer.Option(..., "--ramp", exists=True, dir_okay=False, help="RAMP items JSONL."),
        index: Path = typer.Option(..., "--index", exists=True, file_okay=False, help="Index directory."),
        model: Path = typer.Option(..., "--model", exists=True, file_okay=False, help="HF model dir to start from."),
        out: Path = typer.Option(..., "--out", help="Warm-up directory (data/, checkpoints/, train.log, model/)."),
        steps: int = typer.Option(300, help="SFT steps."),
        seed: int = typer.Option(0),
        max_info_tokens: int = typer.Option(DEFAULT_MAX_INFO_TOKENS, help="Tokens of search results per block (search_env's value)."),
        wording: str = typer.Option("varied", help="varied | fixed (one wording, no copied names: tiny models)."),
        layout: str = typer.Option("rl", help="rl (the RL rollout's token layout) | chat (verl's chat rendering)."),
        probe: int = typer.Option(0, help="Afterwards, greedy RL-style rollouts on this many held-out items."),
        hide_source: bool = typer.Option(False, "--hide-source", help="Hide each item's source passage from the "
                                         "oracle's and the probe's searches (as `ramp export --hide-source`)."),
        overrides: list[str] = typer.Argument(None, help="Hydra overrides for recipes/configs/sft/quickstart."),
    ) -> None:
        """Oracle data + verl's SFT trainer (VERL_PLATFORM=cpu) -> a warmed-up HF model dir."""
        from masksearch_rl.sft.oracle import OracleConfig
        from masksearch_rl.sft.warmup import run_sft_warmup

        oracle = OracleConfig(max_info_tokens=max_info_tokens, tokenizer=str(model), wording=wording, seed=seed,
                              hide_source=hide_source)
        model_dir = run_sft_warmup(ramp, index, model, out, steps, oracle=oracle, layout=layout,
                                   overrides=list(overrides or []))
        typer.echo(f"warmed-up model: {model_dir}")
        if probe:
            import pandas as pd

            from masksearch_rl.jsonl import read_jsonl
            from masksearch_rl.sft.warmup import ProbeConfig, probe_format

            val_ids = set(pd.read_parquet(out / "data" / "val.parquet")["id"])
            items = [item for item in read_jsonl(ramp) if str(item["id"]) in val_ids]
            probe_config = ProbeConfig(num_prompts=probe, max_info_tokens=max_info_tokens, hide_source=hide_source)
            report = probe_format(model_dir, items, index, probe_config)
            typer.echo(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
