"""``masksearch-rl serve``: load an index directory and serve it over HTTP (Search-R1-compatible ``/retrieve``).

Example::

    masksearch-rl serve --index runs/index/wiki-bm25 --port 8000 --token-env RETRIEVAL_TOKEN
    curl -s localhost:8000/retrieve -H "Authorization: Bearer $RETRIEVAL_TOKEN" \\
         -H "Content-Type: application/json" -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the top-level app."""

    @app.command("serve")
    def serve(
        index: Path = typer.Option(..., "--index", help="Index directory written by `build_index`."),
        host: str = typer.Option("127.0.0.1", help="Bind address; use 0.0.0.0 only behind a token or firewall."),
        port: int = typer.Option(8000, help="TCP port."),
        token_env: str | None = typer.Option(
            None, "--token-env", help="NAME of an environment variable holding a bearer token; off when unset."
        ),
        default_topk: int = typer.Option(3, "--default-topk", help="topk when a request gives none."),
        max_topk: int = typer.Option(50, "--max-topk", help="Largest topk a request may ask for."),
        max_query_chars: int = typer.Option(2048, "--max-query-chars", help="Longest query accepted."),
        max_batch: int = typer.Option(64, "--max-batch", help="Most queries per retriever call (and per request)."),
        batch_wait_ms: float = typer.Option(2.0, "--batch-wait-ms", help="How long a batch waits for company."),
    ) -> None:
        """Serve an index over HTTP with micro-batching across concurrent requests."""
        from masksearch_rl.retrieval.server import ServerConfig, read_token, run_server

        if not index.is_dir():
            raise typer.BadParameter(f"{index} is not a directory", param_hint="--index")
        try:
            config = ServerConfig(
                default_topk=default_topk,
                max_topk=max_topk,
                max_query_chars=max_query_chars,
                max_batch=max_batch,
                batch_wait_ms=batch_wait_ms,
                token_env=token_env,
            )
            read_token(token_env)  # fail before loading a large index
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        from masksearch_rl.retrieval.index import load_index, read_manifest

        try:
            config.index_kind = read_manifest(index)["kind"]
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint="--index") from err
        retriever = load_index(index)
        run_server(retriever, config, host=host, port=port)
