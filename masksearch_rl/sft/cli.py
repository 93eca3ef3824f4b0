"""``masksearch-rl sft export``: kept trajectories -> SFT parquet (training itself: recipes/launch/sft_torchrun.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


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
    ) -> None:
        """Export the ``keep: true`` trajectories, deduplicated by id and by content."""
        from masksearch_rl.sft.export import export_sft

        typer.echo(json.dumps(export_sft(list(inputs), out_dir, val_fraction, seed), indent=2))
