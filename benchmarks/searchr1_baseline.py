"""A Search-R1-style retrieval server over OUR index, used as the benchmark baseline.

It reproduces the serving architecture of Search-R1's ``retrieval_server.py`` (read, not copied): a synchronous
FastAPI endpoint (run in Starlette's thread pool) that answers a request by looping over its queries and searching
them one at a time. The index, the docstore and the response shape are ours, so a side-by-side run isolates the
serving design (per-query loop vs. micro-batching across concurrent requests).

    python benchmarks/searchr1_baseline.py --index runs/bench/index-100000 --port 8001
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI
from pydantic import BaseModel


class QueryRequest(BaseModel):
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


def create_baseline_app(retriever, default_topk: int = 3) -> FastAPI:
    app = FastAPI(title="Search-R1-style baseline")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "num_passages": len(retriever)}

    @app.post("/retrieve")
    def retrieve(request: QueryRequest) -> dict:
        topk = request.topk or default_topk
        results = []
        for query in request.queries:  # one query at a time, as Search-R1's BM25 path does
            hits = retriever.search([query], topk)[0]
            if request.return_scores:
                results.append([{"document": {"id": h.id, "contents": h.contents}, "score": float(h.score)} for h in hits])
            else:
                results.append([{"id": h.id, "contents": h.contents} for h in hits])
        return {"result": results}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()

    import uvicorn

    from masksearch_rl.retrieval.index import load_index

    uvicorn.run(create_baseline_app(load_index(args.index)), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
