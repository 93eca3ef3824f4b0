"""Scoring of eval predictions and their aggregation per benchmark.

Per item, the answer metrics come from :mod:`reward.answer_match` (the RL reward's own implementation: SQuAD
normalisation, EM, F1, token recall, cover-EM, maximum over the gold aliases), so reported numbers and training
rewards can never drift apart; nothing is re-implemented here. An item without an ``<answer>`` scores 0 on every
metric. The optional model judge is :mod:`reward.judge` (its failures are counted and fall back to EM, as in the
reward).

Aggregates are plain means over the items of each benchmark. Averages over benchmarks are macro averages (each
benchmark weighs the same) over a *fixed* set, so two runs' averages always mean the same thing: Avg. is the paper's
six benchmarks and exists only when a run has all six; the Search-R1 sets (NQ, TriviaQA, PopQA) get their own.
The mean over whatever a run happens to have is kept too, under a name that says so (``average_run``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from masksearch_rl.eval.loaders import PAPER_BENCHMARKS, SEARCH_R1_BENCHMARKS
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
    """Means over one benchmark's items. ``judge`` is None unless every item was judged (``judged`` counts those
    that were: a run resumed with a judge added has old items without one, and a mean over the rest would pass
    for the benchmark's)."""

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
    judged: int = 0
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
        judge=(sum(judged) / n) if judged and len(judged) == n else None,
        judged=len(judged),
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


# results.json key -> the benchmarks it averages (all of them required); None: whatever the run has.
AVERAGES: dict[str, tuple[str, ...] | None] = {
    "average": PAPER_BENCHMARKS,  # the paper's Avg. column
    "average_search_r1": SEARCH_R1_BENCHMARKS,
    "average_run": None,  # not comparable between runs with different benchmarks
}


def macro_average(
    datasets: Mapping[str, DatasetSummary | Mapping[str, Any]], over: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """Each metric's mean over the benchmarks ``over`` and their item count; None when the run lacks one of them
    (or has no benchmark at all). ``over`` None: every benchmark of the run. ``datasets`` are summaries or their
    dicts (as in results.json)."""
    names = list(datasets) if over is None else list(over)
    if not names or any(name not in datasets for name in names):
        return None
    values = [_as_dict(datasets[name]) for name in names]
    average: dict[str, Any] = {"n": sum(int(v["n"]) for v in values)}
    for metric in (*ANSWER_METRICS, *COUNT_METRICS, "answered"):
        average[metric] = sum(float(v[metric]) for v in values) / len(values)
    judged = [v.get("judge") for v in values]
    average["judge"] = None if None in judged else sum(judged) / len(judged)
    return average


def averages(datasets: Mapping[str, DatasetSummary | Mapping[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Every :data:`AVERAGES` entry of a run."""
    return {key: macro_average(datasets, over) for key, over in AVERAGES.items()}


def _as_dict(summary: DatasetSummary | Mapping[str, Any]) -> Mapping[str, Any]:
    return summary.to_dict() if isinstance(summary, DatasetSummary) else summary
