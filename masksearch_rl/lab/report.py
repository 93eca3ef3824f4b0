"""The lab's evidence: ``learning.json`` (every curve of every seed), ``learning.md`` (the table, the copy
diagnostics, the bar) and PNG curves (mean over seeds with a 95% confidence band).

``learning.json``::

    {"command": ..., "config": {...}, "data": {...}, "policy": {...},
     "arms": {ARM: {"task": "ramp" | "qa", "seeds": {SEED: {"steps": [...], "val_acc": [...], "format_rate": [...],
                                                           "searches": [...], "response_length": [...],
                                                           "em": [...], "f1": [...],
                                                           "heldout": {"ramp": {...}, "qa": {...}}}}}}}

``val_acc`` and its siblings are measured on the arm's own held-out set (``task``); ``heldout`` holds both sets'
curves, so transfer (a RAMP arm's QA accuracy) can be read too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import atomic_path
from masksearch_rl.lab.config import ARM_TASK
from masksearch_rl.records import LabLearning

REQUIRED = ("steps", "val_acc", "format_rate", "searches", "response_length")
TASK_TITLE = {"ramp": "held-out RAMP items", "qa": "held-out questions"}
# The bar (issue 13): dapo ends above sft on held-out RAMP accuracy in every seed, by >= this on average.
BAR_MARGIN = 0.05


def seed_record(arm: str, arm_curves: dict[str, dict[str, list]]) -> dict[str, Any]:
    """One seed's entry: the arm's own held-out curves, plus both sets under ``heldout``."""
    own = arm_curves[ARM_TASK[arm]]
    return {**own, "heldout": arm_curves}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; 0 for a single value)."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return float("nan"), float("nan")
    mean = sum(clean) / len(clean)
    if len(clean) < 2:
        return mean, 0.0
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1))
    return mean, float(t.ppf(0.975, len(clean) - 1)) * sd / math.sqrt(len(clean))


def _final(series: dict[str, list], key: str) -> float:
    values = series.get(key) or []
    return float(values[-1]) if values else float("nan")


def _best(series: dict[str, list], key: str) -> float:
    values = [v for v in series.get(key) or [] if not math.isnan(v)]
    return max(values) if values else float("nan")


def bar_check(arms: dict[str, Any]) -> dict[str, Any] | None:
    """``dapo`` vs ``sft`` on held-out RAMP accuracy, seed by seed (final evaluation)."""
    if "dapo" not in arms or "sft" not in arms:
        return None
    sft = {seed: _final(s, "val_acc") for seed, s in arms["sft"]["seeds"].items()}
    gains = {seed: round(_final(s, "val_acc") - sft.get(seed, float("nan")), 4)
             for seed, s in arms["dapo"]["seeds"].items()}
    mean_gain = sum(gains.values()) / len(gains)
    return {"gain_per_seed": gains, "mean_gain": round(mean_gain, 4), "margin": BAR_MARGIN,
            "met": all(g > 0 for g in gains.values()) and mean_gain >= BAR_MARGIN}


def write_results(results_dir: Path, learning: LabLearning) -> list[Path]:
    """``learning.json``, the PNG curves and ``learning.md`` under ``results_dir``; returns the files written."""
    results_dir.mkdir(parents=True, exist_ok=True)
    learning: LabLearning = {**learning, "bar": bar_check(learning["arms"])}
    written = [results_dir / "learning.json"]
    with atomic_path(written[0]) as tmp:
        tmp.write_text(json.dumps(learning, indent=2, default=str))
    written += plot_curves(learning["arms"], results_dir)
    markdown = results_dir / "learning.md"
    with atomic_path(markdown) as tmp:
        tmp.write_text(render_markdown(learning, [p.name for p in written if p.suffix == ".png"]))
    return [*written, markdown]


def plot_curves(arms: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per held-out set and metric: each arm's mean over seeds with a 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in ("ramp", "qa"):
        for key, label in (("val_acc", "answer accuracy"), ("format_rate", "well-formed episodes"),
                           ("searches", "searches per episode"), ("response_length", "response tokens")):
            fig, ax = plt.subplots(figsize=(6, 3.6))
            drawn = False
            for arm, record in arms.items():
                runs = [seed["heldout"][task] for seed in record["seeds"].values() if task in seed["heldout"]]
                if not runs or not runs[0]["steps"]:
                    continue
                steps = runs[0]["steps"]
                runs = [run for run in runs if run["steps"] == steps]
                stats = [mean_ci([run[key][i] for run in runs]) for i in range(len(steps))]
                means = [m for m, _ in stats]
                style = {"marker": "o", "markersize": 3}
                if len(steps) == 1:  # an evaluation-only arm: a horizontal reference line
                    ax.axhline(means[0], linestyle="--", linewidth=1, label=arm, color="grey")
                else:
                    ax.plot(steps, means, label=arm, **style)
                    ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], alpha=0.2)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_title(f"{label} on {TASK_TITLE[task]} (mean, 95% CI over seeds)", fontsize=9)
            ax.set_xlabel("RL step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"learning_{task}_{key}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {half:.3f}" if half else f"{mean:.3f}"


def render_markdown(learning: LabLearning, plots: list[str]) -> str:
    """The readable summary of ``learning.json``."""
    arms, config = learning["arms"], learning["config"]
    lines = [
        "# Learning lab: does it learn?",
        "",
        f"Produced by `{learning['command']}` ({learning.get('date', '')}); every number below is in "
        "[learning.json](learning.json). Seeds: " + ", ".join(str(s) for s in config["seeds"]) +
        f"; {config['rl_steps']} RL steps per arm, greedy validation every {config['eval_every']} steps on "
        f"{learning['data']['ramp_items']['val']} held-out RAMP items and {learning['data']['qa_questions']['val']} "
        "held-out questions (entities no training stage saw). Mean ± 95% CI over seeds (Student's t).",
        "",
        "| arm | judged on | final accuracy | best accuracy | final EM | final format rate | searches | response tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, record in arms.items():
        seeds = list(record["seeds"].values())
        cells = [_fmt(*mean_ci([_final(s, "val_acc") for s in seeds])),
                 _fmt(*mean_ci([_best(s, "val_acc") for s in seeds])),
                 _fmt(*mean_ci([_final(s, "em") for s in seeds])),
                 _fmt(*mean_ci([_final(s, "format_rate") for s in seeds])),
                 _fmt(*mean_ci([_final(s, "searches") for s in seeds])),
                 _fmt(*mean_ci([_final(s, "response_length") for s in seeds]))]
        lines.append(f"| `{arm}` | {TASK_TITLE[record['task']]} | " + " | ".join(cells) + " |")
    transfer = [(arm, record) for arm, record in arms.items() if record["task"] == "ramp"]
    if transfer:
        lines += ["", "Transfer without QA training (final accuracy of each RAMP arm on the held-out questions):", "",
                  "| arm | held-out questions, final | held-out questions, best |", "|---|---|---|"]
        for arm, record in transfer:
            runs = [s["heldout"]["qa"] for s in record["seeds"].values()]
            lines.append(f"| `{arm}` | {_fmt(*mean_ci([_final(r, 'val_acc') for r in runs]))} | "
                         f"{_fmt(*mean_ci([_best(r, 'val_acc') for r in runs]))} |")
    bar = learning.get("bar")
    if bar:
        verdict = "**met**" if bar["met"] else "**not met**"
        lines += ["", f"The bar (dapo ends above sft in every seed, by >= {bar['margin']} on average): {verdict}. "
                  f"Gain per seed: {bar['gain_per_seed']}; mean {bar['mean_gain']:+.3f}."]
    diagnostics = learning.get("policy", {}).get("diagnostics")
    if diagnostics:
        ramp, qa = diagnostics["ramp"], diagnostics["qa"]
        lines += ["", "## The SFT policy (copy diagnostics, greedy, held-out)", "",
                  "| measure | value |", "|---|---|",
                  f"| RAMP answer accuracy (full episodes) | {ramp['acc']:.3f} |",
                  f"| RAMP accuracy by number of masks | {ramp['acc_by_num_masks']} |",
                  f"| well-formed episodes | {ramp['format']:.3f} |",
                  f"| first query is the oracle's (the text's opening words) | {ramp['query_is_oracle']:.3f} |",
                  f"| first query names the subject | {ramp['query_names_subject']:.3f} |",
                  f"| accuracy with the oracle's search and results forced in | {ramp['forced_acc']:.3f} |",
                  f"| QA answer accuracy (full episodes) | {qa['acc']:.3f} |",
                  f"| QA: first query is the question | {qa['query_is_oracle']:.3f} |"]
        build = learning.get("policy", {}).get("build")
        if build:
            lines += ["", f"Policy build: {build}"]
    if plots:
        lines += ["", "## Curves", ""] + [f"![{name}]({name})" for name in plots]
    notes = learning.get("notes")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
