"""``masksearch-rl serve``: load an index directory and serve it over HTTP (Search-R1-compatible ``/retrieve``).

Example::

    masksearch-rl serve --index runs/index/wiki-bm25 --port 8000 --token-env RETRIEVAL_TOKEN
    curl -s localhost:8000/retrieve -H "Authorization: Bearer $RETRIEVAL_TOKEN" \\
         -H "Content-Type: application/json" -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'

    masksearch-rl serve --index runs/index/wiki-bm25 --workers 8   # 8 processes on one port, one shared mmap
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
        workers: int = typer.Option(
            1, "--workers", min=1, help="Server processes on the port (SO_REUSEPORT), each mapping the same index."
        ),
        threads_per_worker: int | None = typer.Option(
            None, "--threads-per-worker", min=1, help="Search threads per worker (default: usable cores / workers)."
        ),
    ) -> None:
        """Serve an index over HTTP with micro-batching across concurrent requests."""
        import os

        from masksearch_rl.retrieval.server import ServerConfig, read_token, run_server, serve_workers

        # bm25s probes JAX at import (a top_k call); with a CUDA jaxlib that preallocates 75% of the GPU's memory
        # in every server process (seen on a 1-GPU machine: 12 workers -> out of memory). Serving needs no JAX GPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
        if workers > 1:
            code = serve_workers(index, config, host=host, port=port, workers=workers,
                                 threads_per_worker=threads_per_worker)
            raise typer.Exit(code)
        sparse = config.index_kind in ("bm25", "hybrid")
        retriever = load_index(index, **({"n_threads": threads_per_worker} if threads_per_worker and sparse else {}))
        run_server(retriever, config, host=host, port=port)
