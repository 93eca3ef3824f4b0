"""``masksearch-rl synth``: write the synthetic corpus and its multi-hop questions."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this domain's commands to the top-level app."""

    @app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", help="Output directory (gets corpus.jsonl and questions.jsonl)."),
        passages: int = typer.Option(10_000, "--passages", min=40, help="Number of passages (at least 40)."),
        questions: int = typer.Option(1_000, "--questions", min=0, help="Number of multi-hop questions."),
        seed: int = typer.Option(0, "--seed", help="World seed: same seed, byte-identical files."),
    ) -> None:
        """Generate a fictional encyclopedia (names are invented, so answers need search) and questions over it."""
        from masksearch_rl.synthetic import write_synthetic_corpus

        summary = write_synthetic_corpus(out, passages, questions, seed)
        typer.echo(f"wrote {summary['passages']} passages to {summary['corpus_path']}")
        typer.echo(f"wrote {summary['questions']} questions to {summary['questions_path']}")
        typer.echo("entities per type: " + json.dumps(summary["entities_per_type"]))
        typer.echo("questions per hop count: " + json.dumps(summary["questions_per_hops"]))
