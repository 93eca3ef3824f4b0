"""Results files, the paper's Table 2 (Markdown, CSV, JSON) and PNG plots.

``results.json`` of one run::

    {"method": "RAMP(RL)+RL", "model": "...", "config": {...}, "order": [...],
     "datasets": {"hotpotqa": {DatasetSummary fields}, ...},
     "average": {...} | null, "average_search_r1": {...} | null, "average_run": {...}}

Table 2 layout: one row per run (method), one column per benchmark in the paper's order (HotpotQA in-domain,
then FanoutQA, Musique, 2Wiki, Bamboogle, FreshQA; any others after them), then Avg. -- the mean over the paper's
six benchmarks, "–" for a run without all six (see :mod:`masksearch_rl.eval.metrics`) -- and, when a run has NQ,
TriviaQA or PopQA, the Search-R1 average. Averages are recomputed from ``datasets``, so results files of any age
give the same table. Values are percentages with two decimals, as in the paper. The main table is token recall
(the paper's metric); the same layout follows for EM, F1, cover-EM, the judge (when run) and the mean number of
searches and turns.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from masksearch_rl.eval.loaders import BENCHMARKS, PAPER_BENCHMARKS, SEARCH_R1_BENCHMARKS
from masksearch_rl.eval.metrics import ANSWER_METRICS, AVERAGES, DatasetSummary, averages, macro_average
from masksearch_rl.jsonl import atomic_path
from masksearch_rl.records import EvalResults

TABLE_METRICS = (*ANSWER_METRICS, "judge", "searches", "turns")
METRIC_TITLES = {
    "recall": "Token-level recall (%)",
    "em": "Exact match (%)",
    "f1": "F1 (%)",
    "cover_em": "Cover-EM (%)",
    "judge": "Model judge (% judged correct)",
    "searches": "Searches per question",
    "turns": "Turns per question",
}
PERCENT_METRICS = (*ANSWER_METRICS, "judge")
# The average columns after the benchmarks: (key in metrics.AVERAGES, Markdown header, CSV column).
AVERAGE_COLUMNS = (("average", "Avg.", "avg"), ("average_search_r1", "Avg. NQ/TriviaQA/PopQA", "avg_search_r1"))


def results_dict(
    method: str, summaries: Mapping[str, DatasetSummary], config: Mapping[str, Any] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The JSON-ready results of one run."""
    return {
        "method": method,
        "model": model,
        "config": dict(config or {}),
        "order": list(summaries),
        "datasets": {name: s.to_dict() for name, s in summaries.items()},
        **averages(summaries),
    }


def load_results(path: str | os.PathLike) -> EvalResults:
    """Read a ``results.json`` (or a run directory holding one), checking the fields the tables need."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read results ({err})") from err
    for key in ("method", "datasets"):
        if key not in data:
            raise ValueError(f"{path}: results file has no field {key!r}")
    return data


def column_order(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Benchmarks of all runs: the paper's order first, then the rest in first-seen order."""
    seen: list[str] = []
    for run in runs:
        for name in run["datasets"]:
            if name not in seen:
                seen.append(name)
    return [d for d in PAPER_BENCHMARKS if d in seen] + [d for d in seen if d not in PAPER_BENCHMARKS]


def average_columns(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """The :data:`AVERAGE_COLUMNS` shown: Avg. always, the Search-R1 average when a run has one of its sets."""
    search_r1 = any(d in SEARCH_R1_BENCHMARKS for run in runs for d in run["datasets"])
    return [c for c in AVERAGE_COLUMNS if c[0] == "average" or search_r1]


def _title(dataset: str) -> str:
    bench = BENCHMARKS.get(dataset)
    return bench.title if bench else dataset


def _value(run: Mapping[str, Any], dataset: str, metric: str) -> float | None:
    source = run["datasets"].get(dataset)
    value = source.get(metric) if source else None
    return None if value is None else float(value)


def _averages(run: Mapping[str, Any], metric: str, shown: Sequence[tuple[str, str, str]]) -> list[float | None]:
    values = []
    for key, _, _ in shown:
        average = macro_average(run["datasets"], AVERAGES[key])
        values.append(None if average is None or average.get(metric) is None else float(average[metric]))
    return values


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" if metric in PERCENT_METRICS else f"{value:.2f}"


def table_rows(runs: Sequence[Mapping[str, Any]], metric: str, columns: Sequence[str]) -> list[list[str]]:
    """Rows of one metric's table: method, then one cell per column, then the :func:`average_columns`."""
    shown = average_columns(runs)
    rows = []
    for run in runs:
        values = [_value(run, d, metric) for d in columns] + _averages(run, metric, shown)
        rows.append([str(run["method"]), *(_fmt(v, metric) for v in values)])
    return rows


def _has_metric(runs: Sequence[Mapping[str, Any]], metric: str) -> bool:
    return any(v.get(metric) is not None for run in runs for v in run["datasets"].values())


def markdown_table(runs: Sequence[Mapping[str, Any]], metric: str = "recall") -> str:
    columns = column_order(runs)
    headers = ["Method", *(_title(d) + ("†" if BENCHMARKS.get(d) and BENCHMARKS[d].in_domain else "") for d in columns),
               *(header for _, header, _ in average_columns(runs))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---", *["---:"] * (len(headers) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs, metric, columns)]
    return "\n".join(lines)


def markdown_report(runs: Sequence[Mapping[str, Any]]) -> str:
    """Every metric's table, token recall first; † marks the in-domain benchmark."""
    columns = column_order(runs)
    counts = ", ".join(
        f"{_title(d)} {max(int(run['datasets'][d]['n']) for run in runs if d in run['datasets'])}" for d in columns
    )
    parts = [
        "# Evaluation results",
        "",
        (
            "Layout of MaskSearch's Table 2: † in-domain, the rest out-of-domain; Avg. is the mean over the paper's "
            "six benchmarks (HotpotQA, FanoutQA, Musique, 2Wiki, Bamboogle, FreshQA), – for a run without all six; "
            f"the NQ/TriviaQA/PopQA average likewise needs all three. Questions per benchmark: {counts}."
        ),
    ]
    partly_judged = [f"{run['method']} {d} ({v['judged']}/{v['n']})" for run in runs
                     for d, v in run["datasets"].items() if v.get("judge") is None and v.get("judged")]
    if partly_judged:
        parts += ["", "Judge left out where only some questions were judged (a judge added on a resumed run): "
                  + ", ".join(partly_judged) + "."]
    for metric in TABLE_METRICS:
        if metric == "judge" and not _has_metric(runs, "judge"):
            continue
        parts += ["", f"## {METRIC_TITLES[metric]}", "", markdown_table(runs, metric)]
    return "\n".join(parts) + "\n"


def write_csv(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One row per (method, metric): method, metric, <benchmark>..., avg[, avg_search_r1] (raw fractions, not
    percentages; empty where missing)."""
    columns = column_order(runs)
    shown = average_columns(runs)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "metric", *columns, *(name for _, _, name in shown)])
        for metric in TABLE_METRICS:
            if metric == "judge" and not _has_metric(runs, "judge"):
                continue
            for run in runs:
                values = [_value(run, d, metric) for d in columns] + _averages(run, metric, shown)
                writer.writerow([run["method"], metric, *("" if v is None else f"{v:.6f}" for v in values)])


PLOT_PANELS = {"answers.png": (*PERCENT_METRICS,), "search.png": ("searches", "turns")}


def plot_results(runs: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Grouped bar charts (one bar per run, per benchmark and average; none where a run has no value):
    ``answers.png`` has a panel per answer metric, ``search.png`` the searches and turns per question. Returns the
    PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = column_order(runs)
    shown = average_columns(runs)
    labels = [_title(d) for d in columns] + [header for _, header, _ in shown]
    written = []
    for file_name, metrics in PLOT_PANELS.items():
        metrics = [m for m in metrics if m != "judge" or _has_metric(runs, "judge")]
        fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 1.2 * len(labels)), 2.6 * len(metrics)),
                                 squeeze=False)
        width = 0.8 / max(1, len(runs))
        for ax, metric in zip(axes[:, 0], metrics):
            scale = 100.0 if metric in PERCENT_METRICS else 1.0
            for i, run in enumerate(runs):
                values = [float("nan") if v is None else v * scale
                          for v in [*(_value(run, d, metric) for d in columns), *_averages(run, metric, shown)]]
                positions = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(labels))]
                ax.bar(positions, values, width, label=str(run["method"]))
            ax.set_xticks(range(len(labels)), labels)
            ax.set_title(METRIC_TITLES[metric], fontsize="medium")
            ax.grid(axis="y", alpha=0.3)
        if len(runs) > 1:
            axes[0, 0].legend(fontsize="small")
        fig.tight_layout()
        path = out / file_name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(runs: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Any]:
    """``table.md``, ``table.csv``, ``table.json`` (all runs) and ``plots/*.png`` under ``out_dir``."""
    if not runs:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"markdown": out / "table.md", "csv": out / "table.csv", "json": out / "table.json"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown_report(runs), encoding="utf-8")
    write_csv(runs, paths["csv"])
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"columns": column_order(runs), "runs": list(runs)}, indent=2), encoding="utf-8")
    paths["plots"] = plot_results(runs, out / "plots") if plots else []
    return {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()}
