"""Read a verl run's per-step metrics (its ``file`` logger JSONL) and plot the curves a search-agent run is judged by.

verl's file logger writes one ``{"step": N, "data": {metric: value}}`` line per step. The plots: reward, format rate,
searches per episode and response length over steps — each drawn only if the run logged it.
"""

from __future__ import annotations

import math
from pathlib import Path

# (title, candidate metric keys in order of preference, y label)
PLOTS = (
    ("reward", ("critic/score/mean", "critic/rewards/mean"), "mean sequence score"),
    ("format_rate", ("reward/format/mean", "reward/format_ok/mean"), "well-formed responses (fraction)"),
    ("searches_per_episode", ("env/search_count/mean",), "searches per episode"),
    ("response_length", ("response_length/mean",), "tokens"),
)


def load_metrics(path: str | Path) -> list[dict]:
    """Steps in order, each ``{"step": N, **metrics}``; a line that does not parse is an error naming it."""
    from masksearch_rl.jsonl import read_jsonl

    records = read_jsonl(path, required=("step", "data"))
    return sorted(({"step": int(r["step"]), **r["data"]} for r in records), key=lambda s: s["step"])


def series(steps: list[dict], keys: tuple[str, ...]) -> tuple[str, list[int], list[float]] | None:
    """The first of ``keys`` any step logged, with its (step, value) points; None if none was logged."""
    for key in keys:
        points = [(s["step"], float(s[key])) for s in steps if _finite(s.get(key))]
        if points:
            return key, [p[0] for p in points], [p[1] for p in points]
    return None


def plot_metrics(steps: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per available curve in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys, ylabel in PLOTS:
        found = series(steps, keys)
        if found is None:
            continue
        key, xs, ys = found
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(xs, ys, marker="o")
        ax.set_title(f"{name.replace('_', ' ')} ({key})", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summarize(steps: list[dict]) -> dict[str, dict[str, float]]:
    """First and last value of each plotted curve, for the printed summary."""
    summary = {}
    for name, keys, _ in PLOTS:
        found = series(steps, keys)
        if found is not None:
            key, xs, ys = found
            summary[name] = {"metric": key, "first": ys[0], "last": ys[-1], "steps": len(xs)}
    return summary


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
