"""Benchmarks -> verl RL parquet, so ``trainer.test_freq`` validation reports the same benchmarks as ``eval run``.

Rows follow DESIGN.md's RL row format with the prompt built by :func:`envs.prompts.qa_messages` (the text
``eval run`` sends), ``data_source`` = the benchmark name, and the aliases as ``ground_truth.target``. verl then
reports ``val-core/<benchmark>/reward/mean@1`` and, from our reward's extra keys, ``val-aux/<benchmark>/recall/
mean@1`` (also ``em``, ``f1``, ``cover_em``, ``num_searches``) for each benchmark. The reward scores answers
with the same :mod:`reward.answer_match` as the harness; only the format gate differs (the reward gives 0 to a
malformed response, the harness scores any ``<answer>`` it finds), see docs/eval.md.

Files: ``<out_dir>/<benchmark>/<split>.parquet`` for each benchmark (``hotpotqa/train.parquet`` is what the
Stage II recipes read) and ``<out_dir>/benchmarks_<split>.parquet`` with all of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from envs.prompts import TAG_AGENT_NAME, TOOL_AGENT_NAME, qa_messages
from masksearch_rl.eval.loaders import QAItem
from masksearch_rl.jsonl import atomic_path
from masksearch_rl.records import RLRow

COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")


def item_to_row(item: QAItem, index: int, split: str, agent_name: str = TAG_AGENT_NAME,
                tool_name: str = "search") -> RLRow:
    """One verl RL row for a QA item (see the module docstring)."""
    return {
        "data_source": item.dataset,
        "prompt": qa_messages(item.question, tool_variant=agent_name == TOOL_AGENT_NAME),
        "ability": "qa",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(item.answers)}},
        "extra_info": {
            "index": index,
            "id": item.id,
            "split": split,
            # The judge reads the question from here (reward.masksearch_reward._question).
            "question": item.question,
            # Parquet cannot store an empty struct, and verl's tool loop reads tools_kwargs[tool_name].
            "tools_kwargs": {tool_name: {"create_kwargs": {"item_id": item.key}}},
        },
        "agent_name": agent_name,
    }


def export_parquet(
    items_by_dataset: Mapping[str, Sequence[QAItem]],
    out_dir: str | os.PathLike,
    split: str = "val",
    agent_name: str = TAG_AGENT_NAME,
    tool_name: str = "search",
) -> dict[str, Any]:
    """Write one parquet per benchmark and a combined one (each replaced atomically); return paths and counts,
    with the ``data.val_files=[...]`` override that selects them."""
    import pandas as pd

    if not items_by_dataset:
        raise ValueError("nothing to export: no benchmarks given")
    out = Path(out_dir)
    all_rows: list[RLRow] = []
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    for dataset, items in items_by_dataset.items():
        rows = [item_to_row(item, i, split, agent_name, tool_name) for i, item in enumerate(items)]
        if not rows:
            raise ValueError(f"nothing to export for {dataset}: no items")
        target = out / dataset / f"{split}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(tmp, index=False)
        files[dataset], counts[dataset] = str(target), len(rows)
        all_rows += rows
    combined = out / f"benchmarks_{split}.parquet"
    with atomic_path(combined) as tmp:
        pd.DataFrame(all_rows, columns=list(COLUMNS)).to_parquet(tmp, index=False)
    absolute = [str(Path(f).resolve()) for f in files.values()]
    return {
        "split": split,
        "counts": counts,
        "files": files,
        "combined": str(combined),
        "override": "data.val_files=[" + ",".join(absolute) + "]",
    }
