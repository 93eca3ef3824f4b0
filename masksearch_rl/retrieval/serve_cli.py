"""``masksearch-rl serve``: load an index directory and serve it over HTTP (Search-R1-compatible ``/retrieve``).

Example::

    masksearch-rl serve --index runs/index/wiki-bm25 --port 8000 --token-env RETRIEVAL_TOKEN
    curl -s localhost:8000/retrieve -H "Authorization: Bearer $RETRIEVAL_TOKEN" \\
         -H "Content-Type: application/json" -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'

    masksearch-rl serve --index runs/index/wiki-bm25 --workers 8   # 8 processes on one port, one shared mmap

By default one worker process per core (at most 16) serves the port, under a supervisor that restarts a worker
that dies.
"""

from __future__ import annotations

from pathlib import Path

import typer

from masksearch_rl.retrieval.types import DEFAULT_TOPK


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the top-level app."""

    @app.command("serve")
    def serve(
        index: Path = typer.Option(..., "--index", help="Index directory written by `build_index`."),
        host: str = typer.Option("127.0.0.1", help="Bind address; any other than loopback wants --token-env."),
        port: int = typer.Option(8000, help="TCP port."),
        token_env: str | None = typer.Option(
            None, "--token-env", help="NAME of an environment variable holding a bearer token; off when unset."
        ),
        default_topk: int = typer.Option(DEFAULT_TOPK, "--default-topk", help="topk when a request gives none (or 0)."),
        max_topk: int = typer.Option(50, "--max-topk", help="Largest topk a request may ask for."),
        max_query_chars: int = typer.Option(2048, "--max-query-chars", help="Longest query accepted."),
        max_queries: int = typer.Option(16384, "--max-queries", help="Most queries one request may carry."),
        max_batch: int = typer.Option(64, "--max-batch", help="Most queries per retriever call."),
        batch_wait_ms: float = typer.Option(
            2.0, "--batch-wait-ms", help="Longest wait for company, only while clients are expected back (0: never)."
        ),
        max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body (MiB)."),
        request_timeout_s: float = typer.Option(
            15.0, "--request-timeout-s", help="A request must arrive whole this long after its first byte."
        ),
        idle_timeout_s: float = typer.Option(75.0, "--idle-timeout-s", help="Idle keep-alive connections close."),
        workers: int = typer.Option(
            0, "--workers", min=0,
            help="Server processes on the port (SO_REUSEPORT, one shared index mmap); 0: one per core (at most 16).",
        ),
        threads_per_worker: int | None = typer.Option(
            None, "--threads-per-worker", min=1, help="Search threads per worker (default: usable cores / workers)."
        ),
    ) -> None:
        """Serve an index over HTTP with micro-batching across concurrent requests."""
        import logging
        import os

        from masksearch_rl.retrieval.server import ServerConfig, exposure_warning, read_token, run_server
        from masksearch_rl.retrieval.workers import default_workers, serve_workers

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # bm25s probes JAX at import (a top_k call); with a CUDA jaxlib that preallocates 75% of the GPU's memory
        # in every server process (seen on a 1-GPU machine: 12 workers -> out of memory). Serving needs no JAX GPU.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

        try:
            config = ServerConfig(
                default_topk=default_topk,
                max_topk=max_topk,
                max_query_chars=max_query_chars,
                max_queries=max_queries,
                max_batch=max_batch,
                batch_wait_ms=batch_wait_ms,
                max_body_bytes=int(max_body_mb * 2**20),
                request_timeout_s=request_timeout_s,
                idle_timeout_s=idle_timeout_s,
                token_env=token_env,
            )
            read_token(token_env)  # fail before loading a large index
        except ValueError as err:
            raise typer.BadParameter(str(err)) from err
        warning = exposure_warning(host, token_env)  # before a long index load, where it is seen
        if warning:
            logging.getLogger("masksearch_rl.retrieval.serve").warning(warning)
        if not index.is_dir():
            raise typer.BadParameter(f"{index} is not a directory", param_hint="--index")
        from masksearch_rl.retrieval.index import load_index, read_manifest

        try:
            config.index_kind = read_manifest(index)["kind"]
        except (OSError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint="--index") from err
        workers = workers or default_workers()
        if workers > 1:
            code = serve_workers(index, config, host=host, port=port, workers=workers,
                                 threads_per_worker=threads_per_worker)
            raise typer.Exit(code)
        sparse = config.index_kind in ("bm25", "hybrid")
        retriever = load_index(index, **({"n_threads": threads_per_worker} if threads_per_worker and sparse else {}))
        run_server(retriever, config, host=host, port=port)
