"""Commands of this domain; ``register(app)`` adds them to the ``masksearch-rl`` CLI."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this domain's commands to the top-level app."""
