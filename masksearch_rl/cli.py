"""The ``masksearch-rl`` command line.

Each domain module owns its commands in ``<domain>/cli.py`` and exposes ``register(app)``; this file only assembles
them, so commands stay next to the code they drive. Domain CLIs import heavy libraries (torch, verl, faiss) inside
their command functions, keeping ``masksearch-rl --help`` fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from masksearch_rl.corpus import cli as corpus_cli
from masksearch_rl.cot import cli as cot_cli
from masksearch_rl.eval import cli as eval_cli
from masksearch_rl.lab import cli as lab_cli
from masksearch_rl.ramp import cli as ramp_cli
from masksearch_rl.retrieval import cli as retrieval_cli
from masksearch_rl.retrieval import serve_cli
from masksearch_rl.selfevolve import cli as selfevolve_cli
from masksearch_rl.sft import cli as sft_cli
from masksearch_rl.synthetic import cli as synthetic_cli

app = typer.Typer(
    name="masksearch-rl",
    help="MaskSearch-RL: RAMP data, retrieval, CoT trajectories, verl training and evaluation for search agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; that drowns progress output (and web-search URLs can carry keys).
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


for _module in (corpus_cli, synthetic_cli, retrieval_cli, serve_cli, ramp_cli, cot_cli, sft_cli, selfevolve_cli, eval_cli,
                lab_cli):
    _module.register(app)


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where every stage writes its outputs."),
    passages: int = typer.Option(2000, help="Passages in the synthetic world."),
    questions: int = typer.Option(200, help="Multi-hop questions generated over it."),
    seed: int = typer.Option(0),
    train: bool = typer.Option(True, help="Run the training stages (tiny model, SFT warm-up, verl DAPO, report)."),
    sft_steps: int = typer.Option(200, help="SFT warm-up steps on oracle trajectories (0: start RL from random weights)."),
    rl_steps: int = typer.Option(4, help="DAPO steps through verl's main_ppo."),
    wandb: bool = typer.Option(True, help="Log the RL run to W&B (offline unless WANDB_MODE is set)."),
) -> None:
    """The main job on the embedded synthetic corpus: world -> index -> server -> RAMP -> curriculum -> SFT -> RL."""
    from masksearch_rl.quickstart import QuickstartConfig, run_quickstart

    run_quickstart(
        QuickstartConfig(
            out_dir=out_dir, passages=passages, questions=questions, seed=seed, train=train, sft_steps=sft_steps,
            rl_steps=rl_steps, wandb=wandb,
        )
    )


if __name__ == "__main__":
    app()
