"""Scoring of eval predictions and their aggregation per benchmark.

Per item, the answer metrics come from :mod:`reward.answer_match` (the RL reward's own implementation: SQuAD
normalisation, EM, F1, token recall, cover-EM, maximum over the gold aliases), so reported numbers and training
rewards can never drift apart; nothing is re-implemented here. An item without an ``<answer>`` scores 0 on every
metric. The optional model judge is :mod:`reward.judge` (its failures are counted and fall back to EM, as in the
reward).

Aggregates are plain means over the items of each benchmark; the "average" row is the macro average over the
benchmarks (each benchmark weighs the same, as in the paper's Avg. column), plus the micro totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reward.answer_match import METRICS, MatchScores, score_answer

# Reported per benchmark, in this order: the paper's metric (token recall) first.
ANSWER_METRICS = ("recall", "em", "f1", "cover_em")
COUNT_METRICS = ("searches", "turns")
assert set(ANSWER_METRICS) == set(METRICS)


def score_prediction(answer: str | None, gold: Sequence[str]) -> MatchScores:
    """The four answer-match metrics of one prediction (0 everywhere when the policy gave no answer)."""
    if not answer:
        return MatchScores()
    return score_answer(answer, list(gold))


@dataclass
class DatasetSummary:
    """Means over one benchmark's items. ``judge`` is None when no judge was run."""

    dataset: str
    n: int
    recall: float
    em: float
    f1: float
    cover_em: float
    searches: float
    turns: float
    answered: float  # share of items with an <answer>
    judge: float | None = None
    judge_failures: int = 0
    errors: int = 0  # episodes that failed (policy endpoint down ...): scored 0, counted here

    def metric(self, name: str) -> float | None:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(dataset: str, records: Iterable[Mapping[str, Any]]) -> DatasetSummary:
    """Means of the per-item scores written by the runner (``scores``, ``num_searches``, ``num_turns``...)."""
    rows = list(records)
    if not rows:
        raise ValueError(f"no predictions for {dataset}")
    n = len(rows)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n

    judged = [r["scores"]["judge"] for r in rows if r["scores"].get("judge") is not None]
    return DatasetSummary(
        dataset=dataset,
        n=n,
        **{m: mean(float(r["scores"][m]) for r in rows) for m in ANSWER_METRICS},
        searches=mean(float(r.get("num_searches", 0)) for r in rows),
        turns=mean(float(r.get("num_turns", 0)) for r in rows),
        answered=mean(1.0 if r.get("answer") else 0.0 for r in rows),
        judge=(sum(judged) / len(judged)) if judged else None,
        judge_failures=sum(1 for r in rows if r.get("judge_error")),
        errors=sum(1 for r in rows if r.get("error")),
    )


def summarize_all(records: Iterable[Mapping[str, Any]], order: Sequence[str] = ()) -> dict[str, DatasetSummary]:
    """One summary per benchmark, in ``order`` first (e.g. the paper's column order), then by name."""
    by_dataset: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_dataset.setdefault(record["dataset"], []).append(record)
    names = [d for d in order if d in by_dataset] + sorted(d for d in by_dataset if d not in order)
    return {name: summarize(name, by_dataset[name]) for name in names}


def macro_average(summaries: Mapping[str, DatasetSummary]) -> dict[str, Any]:
    """Each metric's mean over the benchmarks (the Avg. column) and the item count."""
    values = list(summaries.values())
    if not values:
        return {}
    average: dict[str, Any] = {"n": sum(s.n for s in values)}
    for name in (*ANSWER_METRICS, *COUNT_METRICS, "answered"):
        average[name] = sum(getattr(s, name) for s in values) / len(values)
    judged = [s.judge for s in values if s.judge is not None]
    average["judge"] = sum(judged) / len(judged) if len(judged) == len(values) else None
    return average
