"""The ``masksearch-rl`` command line.

Each domain module owns its commands in ``<domain>/cli.py`` and exposes ``register(app)``; this file only assembles
them, so commands stay next to the code they drive. Domain CLIs import heavy libraries (torch, verl, faiss) inside
their command functions, keeping ``masksearch-rl --help`` fast.
"""

from __future__ import annotations

import logging

import typer

from masksearch_rl.corpus import cli as corpus_cli
from masksearch_rl.retrieval import cli as retrieval_cli

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


for _module in (corpus_cli, retrieval_cli):
    _module.register(app)


if __name__ == "__main__":
    app()
