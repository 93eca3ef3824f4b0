"""Hybrid retrieval: reciprocal-rank fusion (RRF) of BM25 and dense results over one docstore.

Why RRF: BM25 scores and cosine similarities live on unrelated scales, so adding them needs per-corpus tuning;
RRF only uses ranks (``sum_i w_i / (k + rank_i)``), is robust across corpora, and catches both exact-name matches
(BM25's strength, e.g. rare entity names in RAMP queries) and paraphrases (dense's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from masksearch_rl.retrieval.bm25 import Bm25Retriever, to_hits
from masksearch_rl.retrieval.dense import DenseRetriever
from masksearch_rl.retrieval.docstore import DocStore
from masksearch_rl.retrieval.types import Hit


@dataclass
class HybridOptions:
    rrf_k: float = 60.0  # larger k flattens the gap between top and lower ranks
    bm25_weight: float = 1.0
    dense_weight: float = 1.0
    fusion_depth: int = 100  # each retriever contributes its top max(topk, fusion_depth)

    def __post_init__(self) -> None:
        if self.rrf_k < 0:
            raise ValueError(f"hybrid option rrf_k must be >= 0, got {self.rrf_k}")
        if self.bm25_weight < 0 or self.dense_weight < 0 or self.bm25_weight + self.dense_weight == 0:
            raise ValueError("hybrid options bm25_weight and dense_weight must be >= 0 and not both 0")
        if self.fusion_depth < 1:
            raise ValueError(f"hybrid option fusion_depth must be >= 1, got {self.fusion_depth}")


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], weights: Sequence[float], k: float,
                           topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked row lists (best first) into ``(rows, scores)``: score = sum of ``weight / (k + rank)``, rank from 1.

    Ties are broken by row number so results are deterministic.
    """
    fused: dict[int, float] = {}
    for rows, weight in zip(rankings, weights):
        if weight == 0:
            continue
        for rank, row in enumerate(rows.tolist(), start=1):
            fused[row] = fused.get(row, 0.0) + weight / (k + rank)
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:topk]
    rows = np.fromiter((row for row, _ in best), dtype=np.int64, count=len(best))
    scores = np.fromiter((score for _, score in best), dtype=np.float64, count=len(best))
    return rows, scores


class HybridRetriever:
    """BM25 + dense over the same docstore rows, fused with RRF. Thread-safe (both parts are)."""

    kind = "hybrid"

    def __init__(self, bm25: Bm25Retriever, dense: DenseRetriever, docstore: DocStore, options: HybridOptions):
        if len(bm25) != len(dense):
            raise ValueError(f"hybrid parts disagree: BM25 has {len(bm25)} passages, dense {len(dense)}")
        self.bm25 = bm25
        self.dense = dense
        self.docstore = docstore
        self.options = options

    def __len__(self) -> int:
        return len(self.bm25)

    def search_rows(self, queries: list[str], topk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        depth = max(topk, self.options.fusion_depth)
        weights = (self.options.bm25_weight, self.options.dense_weight)
        sparse = self.bm25.search_rows(queries, depth) if weights[0] else [(np.empty(0, np.int64),)] * len(queries)
        dense = self.dense.search_rows(queries, depth) if weights[1] else [(np.empty(0, np.int64),)] * len(queries)
        return [
            reciprocal_rank_fusion((s[0], d[0]), weights, self.options.rrf_k, topk) for s, d in zip(sparse, dense)
        ]

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [to_hits(self.docstore, rows, scores) for rows, scores in self.search_rows(queries, topk)]
