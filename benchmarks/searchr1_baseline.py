"""A Search-R1-style retrieval server over OUR index, used as the benchmark baseline.

It reproduces the serving architecture of Search-R1's ``retrieval_server.py`` (read, not copied): a synchronous
FastAPI endpoint (run in Starlette's thread pool) that answers a request by looping over its queries and searching
them one at a time. Search-R1's BM25 is pyserini (Lucene, per query); with no JVM here the stand-in is the plain
per-query path of bm25s (numpy backend) over the same passages (a bm25s index built once into ``<index>/bm25-standin``,
since our index keeps no bm25s files), the same docstore and response shape. It is a STAND-IN, far slower than
Search-R1's real server: ``benchmarks/searchr1_real.py`` runs that one.

``--engine ours`` swaps in our retriever while keeping the per-query loop: the ablation that separates what the
faster kernel gives from what micro-batching gives.

    python benchmarks/searchr1_baseline.py --index runs/bench/index-100000 --port 8001 [--engine ours]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bm25s
import Stemmer
from fastapi import FastAPI
from pydantic import BaseModel

from masksearch_rl.retrieval.docstore import DocStore
from masksearch_rl.retrieval.types import Hit


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


class NaiveBm25:
    """One query at a time through bm25s' public API (numpy backend): what a straightforward server does."""

    def __init__(self, index_dir: str):
        options = json.loads((Path(index_dir) / "manifest.json").read_text())["options"]["bm25"]
        self.stopwords = options["stopwords"] or None
        self.stemmer = Stemmer.Stemmer(options["stemmer"]) if options["stemmer"] else None
        self.docstore = DocStore(index_dir)
        saved = Path(index_dir) / "bm25-standin"
        if not (saved / "params.index.json").exists():  # our index keeps no bm25s files: build them once, beside it
            tokens = bm25s.tokenize([doc["contents"] for doc in self.docstore], stopwords=self.stopwords,
                                    stemmer=self.stemmer, show_progress=False)
            model = bm25s.BM25(k1=options["k1"], b=options["b"])
            model.index(tokens, show_progress=False)
            model.save(saved)
        self.bm25 = bm25s.BM25.load(saved, mmap=True, backend="numpy")

    def __len__(self) -> int:
        return len(self.docstore)

    def search(self, queries: list[str], topk: int):
        results = []
        for query in queries:
            words = bm25s.tokenize(
                [query], stopwords=self.stopwords, stemmer=self.stemmer, return_ids=False, show_progress=False
            )[0]
            tokens = [w for w in words if w in self.bm25.vocab_dict]
            if not tokens:
                results.append([])
                continue
            k = min(topk, len(self))
            rows, scores = self.bm25.retrieve([tokens], k=k, show_progress=False, n_threads=1)
            docs = self.docstore.get_many(rows[0])
            results.append([Hit(d["id"], d["contents"], float(s)) for d, s in zip(docs, scores[0]) if s > 0])
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--engine", choices=["naive", "ours"], default="naive")
    args = parser.parse_args()

    import uvicorn

    from masksearch_rl.retrieval.index import load_index

    retriever = NaiveBm25(args.index) if args.engine == "naive" else load_index(args.index)
    retriever.search(["warm up"], 1)
    uvicorn.run(create_baseline_app(retriever), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
