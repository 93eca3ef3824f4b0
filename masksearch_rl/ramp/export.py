"""RAMP items -> verl RL parquet (train.parquet / val.parquet).

One row per passage (duplicates by id are dropped, the first kept). The split is seeded and decided per passage id:
ids are ranked by a hash of ``(seed, id)`` and the lowest ``round(n * val_fraction)`` go to validation, so the
validation size is exact and adding items later moves few existing ones. Rows follow DESIGN.md:
``data_source, prompt, ability, reward_model, extra_info, agent_name``.

``extra_info.tools_kwargs``: Parquet (pyarrow and Hugging Face ``datasets``, which verl loads it with) cannot store
an empty struct, and verl's tool loop calls ``tools_kwargs.get(tool_name, {})``, so the field must be a non-empty
mapping. We write ``{tool_name: {"create_kwargs": {"item_id": id}}}``; a tool's ``create(**kwargs)`` ignores it.
With ``hide_source`` every row's ``create_kwargs`` also carries ``"exclude": {"ids": [id], "texts": [source text]}``
(:func:`masksearch_rl.ramp.source.source_exclusion`): the agent loop and the search tool hide the item's own source
passage from every search of the episode. Either every row of an export has the key or none has (one schema).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.prompts import RAMP_INSTRUCTION, TAG_AGENT_NAME, TOOL_AGENT_NAME, ramp_messages
from masksearch_rl.jsonl import BadLines, atomic_path, iter_jsonl
from masksearch_rl.ramp.source import source_exclusion
from masksearch_rl.records import RampItem, RLRow

ITEM_FIELDS = ("id", "query", "masks", "num_masks")


@dataclass(frozen=True)
class ExportConfig:
    val_fraction: float = 0.05
    seed: int = 0
    data_source: str = "ramp"
    ability: str = "ramp"
    agent_name: str = TAG_AGENT_NAME
    tool_name: str = "search"
    hide_source: bool = False  # hide each item's source passage from its episode's searches (module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def split_ids(ids: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """The validation ids: the ``round(n * val_fraction)`` ids with the smallest ``sha256(seed, id)``."""
    ids = sorted(set(ids))
    n_val = round(len(ids) * val_fraction)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}\x1f{i}".encode()).hexdigest())
    return set(ranked[:n_val])


def item_to_row(item: RampItem, index: int, split: str, config: ExportConfig) -> RLRow:
    """One verl RL row for a RAMP item."""
    masks = [str(m) for m in item["masks"]]
    if item["num_masks"] != len(masks):
        raise ValueError(f"item {item['id']!r}: num_masks={item['num_masks']} but {len(masks)} masks")
    create_kwargs: dict[str, Any] = {"item_id": str(item["id"])}
    if config.hide_source:
        create_kwargs["exclude"] = source_exclusion(item).to_json()
    return {
        "data_source": config.data_source,
        "prompt": ramp_messages(
            item["query"],
            instruction=item.get("instruction") or RAMP_INSTRUCTION,
            tool_variant=config.agent_name == TOOL_AGENT_NAME,
        ),
        "ability": config.ability,
        # masked_passage: what the prompt shows, with which the reward reads an answer written as the whole passage
        "reward_model": {
            "style": "rule",
            "ground_truth": {"target": masks, "masks": masks, "masked_passage": str(item["query"])},
        },
        "extra_info": {
            "index": index,
            "id": str(item["id"]),
            "num_masks": int(item["num_masks"]),
            "split": split,
            "tools_kwargs": {config.tool_name: {"create_kwargs": create_kwargs}},
        },
        "agent_name": config.agent_name,
    }


def load_items(path: str | Path, bad: BadLines) -> tuple[list[RampItem], int]:
    """Items in file order, first occurrence of each id; returns (items, duplicates skipped)."""
    items, seen, duplicates = [], set(), 0
    for lineno, item in iter_jsonl(path, bad=bad, required=ITEM_FIELDS):
        if not isinstance(item["masks"], list) or item["num_masks"] != len(item["masks"]):
            bad.add(path, lineno, "field 'masks' is not a list of num_masks spans")
            continue
        key = str(item["id"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        items.append(item)
    return items, duplicates


def export_parquet(
    items_path: str | Path, out_dir: str | Path, config: ExportConfig | None = None, **options: Any
) -> dict[str, Any]:
    """Write ``train.parquet`` and ``val.parquet`` (each replaced atomically); returns counts.

    Pass an :class:`ExportConfig`, or its fields as keywords (``val_fraction=0.05, seed=0``)."""
    if config is not None and options:
        raise TypeError("pass either an ExportConfig or keyword options, not both")
    config = config or ExportConfig(**options)
    bad = BadLines()
    items, duplicates = load_items(items_path, bad)
    if not items:
        raise ValueError(f"{items_path}: no valid RAMP items to export")
    val_ids = split_ids((str(i["id"]) for i in items), config.val_fraction, config.seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for item in items:
        split = "val" if str(item["id"]) in val_ids else "train"
        splits[split].append(item_to_row(item, len(splits[split]), split, config))
    out_dir = Path(out_dir)
    for split, rows in splits.items():
        write_rows(rows, out_dir / f"{split}.parquet")
    return {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "duplicates_skipped": duplicates,
        "bad_lines": bad.summary(),
        "out_dir": str(out_dir),
    }


COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")


def write_rows(rows: list[RLRow], path: str | Path) -> Path:
    """RL rows (``item_to_row``'s, or any DESIGN.md row) -> one parquet file, replaced atomically."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(tmp, index=False)
    return path


def export_items(items: list[RampItem], path: str | Path, split: str, config: ExportConfig | None = None) -> Path:
    """``items`` as they are, in order, -> one RL parquet file (the caller chose the split)."""
    config = config or ExportConfig()
    return write_rows([item_to_row(item, index, split, config) for index, item in enumerate(items)], path)
