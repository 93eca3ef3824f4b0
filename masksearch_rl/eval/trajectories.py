"""Sample-trajectory tables from verl's generation dumps (the RL side of "log sample trajectories to W&B").

What verl 0.9.1 logs by itself: with ``trainer.log_val_generations=N`` a W&B table ``val/generations`` holding, per
validation, N (input, output, score) triples -- the decoded prompt and response and the total reward, nothing
more. With ``trainer.validation_data_dir=<dir>`` it writes ``<dir>/<step>.jsonl``: one line per validation sample
with ``input``, ``output``, ``gts``, ``score``, ``step`` and every ``reward_extra_info`` key our reward returns
(``acc``, ``format``, ``em``, ``f1``, ``recall``, ``cover_em``, ``num_searches`` ...). ``trainer.rollout_data_dir``
does the same for training batches, but the V1 trainer writes only ``uid`` there, no reward components.

This module turns those dumps into the table we want -- prompt, searches, information, answer, reward components
-- by reading the tags out of the response text, and logs it to W&B (``masksearch-rl eval log-generations``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from envs.prompts import ANSWER_CLOSE, ANSWER_OPEN, INFO_CLOSE, INFO_OPEN, SEARCH_CLOSE, SEARCH_OPEN
from masksearch_rl.jsonl import BadLines, iter_jsonl

_SEARCH = re.compile(re.escape(SEARCH_OPEN) + r"(.*?)" + re.escape(SEARCH_CLOSE), re.DOTALL)
_INFO = re.compile(re.escape(INFO_OPEN) + r"(.*?)" + re.escape(INFO_CLOSE), re.DOTALL)
_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)

BASE_COLUMNS = ("step", "prompt", "searches", "information", "answer", "gold", "score")
# Reward components of reward.masksearch_reward, in the order shown (others follow, sorted).
COMPONENTS = ("acc", "format", "recall", "em", "f1", "cover_em", "judge", "num_searches", "format_code")


def parse_response(response: str) -> dict[str, Any]:
    """Searches, information blocks and the final answer of a tag-protocol response (regex only).

    Searches are read outside ``<information>`` blocks only (retrieved text could quote the tags).
    """
    information = [m.group(1).strip() for m in _INFO.finditer(response)]
    policy_text = _INFO.sub(" ", response)
    searches = [m.group(1).strip() for m in _SEARCH.finditer(policy_text)]
    answers = [m.group(1).strip() for m in _ANSWER.finditer(policy_text)]
    return {"searches": searches, "information": information, "answer": answers[-1] if answers else None}


def dump_files(dump_dir: str | Path) -> list[Path]:
    """``<step>.jsonl`` files of a verl dump directory, by step."""
    files = [p for p in Path(dump_dir).glob("*.jsonl") if p.stem.isdigit()]
    if not files:
        raise FileNotFoundError(f"{dump_dir}: no <step>.jsonl generation dumps (set trainer.validation_data_dir)")
    return sorted(files, key=lambda p: int(p.stem))


def trajectory_rows(records: Iterable[dict[str, Any]], limit: int | None = None) -> tuple[list[str], list[list[Any]]]:
    """Table columns and rows for dumped samples: base columns, then every reward component present."""
    records = list(records)[:limit] if limit is not None else list(records)
    present = {k for r in records for k in r} - {"input", "output", "gts", "score", "step", "uid", "reward"}
    components = [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))
    rows = []
    for r in records:
        parsed = parse_response(str(r.get("output", "")))
        rows.append([
            r.get("step"), r.get("input"), parsed["searches"], parsed["information"], parsed["answer"],
            _gold(r.get("gts")), r.get("score"), *(r.get(c) for c in components),
        ])
    return [*BASE_COLUMNS, *components], rows


def _gold(gts: Any) -> Any:
    if isinstance(gts, dict):
        return gts.get("masks") or gts.get("target")
    return gts


def read_dump(path: str | Path, bad: BadLines | None = None) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path, bad if bad is not None else BadLines(), required=("output",))]


def log_generation_dumps(dump_dir: str | Path, tracker: Any, per_step: int = 20,
                         steps: Sequence[int] | None = None) -> dict[str, int]:
    """Log one ``trajectories/step_<N>`` table per dump file (``per_step`` samples each) and the mean reward
    components (``trajectories/<component>``) at W&B step N; returns samples logged per step."""
    logged: dict[str, int] = {}
    bad = BadLines()
    for path in dump_files(dump_dir):
        step = int(path.stem)
        if steps is not None and step not in steps:
            continue
        records = read_dump(path, bad)
        if not records:
            continue
        columns, rows = trajectory_rows(records, per_step)
        numeric = {c for c in columns[len(BASE_COLUMNS):]} | {"score"}
        means = {
            key: sum(float(r[key]) for r in records if _number(r.get(key))) / max(1, sum(_number(r.get(key)) for r in records))
            for key in numeric if any(_number(r.get(key)) for r in records)
        }
        # One history row per training step: the table and the means together, at verl's step.
        tracker.log_table(f"trajectories/step_{step}", columns, rows, step=step, metrics={"trajectories": means})
        logged[str(step)] = len(rows)
    return logged


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
