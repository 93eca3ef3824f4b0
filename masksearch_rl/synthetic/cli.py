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
        flavour: bool = typer.Option(True, "--flavour/--no-flavour", help="Pad passages to 60-130 words with "
                                     "fact-free sentences (default), or state the facts only (shorter texts)."),
        wandb_project: str = typer.Option(None, "--wandb-project", help="Log the summary to W&B (key from "
                                          "$WANDB_API_KEY; WANDB_MODE=offline works without network)."),
        wandb_name: str = typer.Option(None, "--wandb-name"),
        wandb_mode: str = typer.Option(None, "--wandb-mode", help="online | offline | disabled"),
        wandb_dir: str = typer.Option(None, "--wandb-dir", help="Where W&B writes its run directory."),
    ) -> None:
        """Generate a fictional encyclopedia (names are invented, so answers need search) and questions over it."""
        from masksearch_rl.synthetic import write_synthetic_corpus
        from masksearch_rl.tracking import TrackingConfig, start_run

        tracking = TrackingConfig(project=wandb_project, name=wandb_name, mode=wandb_mode, dir=wandb_dir)
        options = {"out": str(out), "passages": passages, "questions": questions, "seed": seed, "flavour": flavour}
        with start_run(tracking, "synth", options) as tracker:
            summary = write_synthetic_corpus(out, passages, questions, seed, flavour=flavour)
            tracker.summary({k: v for k, v in summary.items() if not k.endswith("_path")})
            if tracker.enabled and summary["questions"]:
                rows = [[q["id"], q["question"], q["answer"], q["hops"], q["oracle_queries"]]
                        for q in _first_lines(summary["questions_path"], 20)]
                tracker.log_table("synth/questions", ["id", "question", "answer", "hops", "oracle_queries"], rows)
        typer.echo(f"wrote {summary['passages']} passages to {summary['corpus_path']}")
        typer.echo(f"wrote {summary['questions']} questions to {summary['questions_path']}")
        typer.echo("entities per type: " + json.dumps(summary["entities_per_type"]))
        typer.echo("questions per hop count: " + json.dumps(summary["questions_per_hops"]))


def _first_lines(path: str, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]
