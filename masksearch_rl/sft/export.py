"""Trajectory records -> SFT parquet (``train.parquet``, ``val.parquet``) for verl's MultiTurnSFTDataset.

Input: JSONL records as written by ``cot build`` and ``selfevolve`` (``id``, ``keep``, ``messages``, ``response``,
``data_source``). Only ``keep: true`` records are exported. Duplicates are dropped, first occurrence kept (pass the
oldest file first): the same id twice, or the same trajectory text for two ids. Rows: ``messages`` (chat turns;
information turns are not ``assistant``, so the dataset gives them loss mask 0), ``data_source``, ``id``.
The split is seeded per id (``masksearch_rl.ramp.export.split_ids``): adding data later moves few rows.

Length limit (``tokenizer`` + ``max_tokens``): verl's SFT dataset cuts a sequence longer than ``data.max_length`` at
the right (our recipes' ``truncation: right``), which removes the ``<answer>`` turn and still trains on the rest: a
trajectory that searches and never answers. With both set, records whose chat-template token length (the tokens
verl's ``MultiTurnSFTDataset`` builds, with the training model's tokenizer) exceeds ``max_tokens`` are dropped and
counted (``too_long``) instead. Set ``max_tokens`` to the recipe's ``data.max_length``.

Curriculum (``curriculum``: a :class:`~masksearch_rl.curriculum.sampler.CurriculumConfig`, ``staged`` or ``mixed``):
the paper trains Stage I SFT "with curriculum learning" by mask count, so the train rows can follow the RL sampler's
schedule (:func:`~masksearch_rl.curriculum.sampler.data_order`). ``train.parquet`` is then written in schedule order
with ``num_masks`` and ``curriculum_stage`` columns, ``staged`` also writes one ``stage_<i>_k<k>/train.parquet`` per
stage (verl's SFT trainer shuffles within a file, so a staged curriculum there is one SFT run per stage file, each
continuing from the last), and ``curriculum.json`` records the schedule. A record's mask count is its ``num_masks``,
else the number of its RAMP ``gold`` spans; a curriculum needs one on every kept record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masksearch_rl.jsonl import BadLines, atomic_path, iter_jsonl
from masksearch_rl.ramp.export import split_ids
from masksearch_rl.records import CotTrace, OracleTrajectory, SftRow

if TYPE_CHECKING:
    from masksearch_rl.curriculum.sampler import CurriculumConfig

ROLES = ("system", "user", "assistant", "tool")


def trajectory_key(record: CotTrace | OracleTrajectory) -> str:
    """A content hash of what the model is trained on (its messages), for dedupe across files and iterations."""
    return hashlib.sha256(json.dumps(record["messages"], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_messages(messages: Any) -> str | None:
    """Why ``messages`` cannot be an SFT example, or None when it can."""
    if not isinstance(messages, list) or len(messages) < 3:
        return "messages must be a list of at least 3 turns"
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return f"bad turn {str(turn)[:80]!r}"
    if messages[-1]["role"] != "assistant":
        return "the last turn must be the assistant's"
    return None


def iter_kept(
    paths: Iterable[str | Path], bad: BadLines, stats: dict[str, int]
) -> Iterator[CotTrace | OracleTrajectory]:
    """Kept, valid, unique trajectories of ``paths`` in order (first occurrence wins)."""
    seen_ids: set[str] = set()
    seen_content: set[str] = set()
    for path in paths:
        for lineno, record in iter_jsonl(path, bad=bad, required=("id", "messages")):
            stats["records"] += 1
            if not record.get("keep"):
                stats["not_kept"] += 1
                continue
            problem = check_messages(record["messages"])
            if problem:
                bad.add(path, lineno, problem)
                continue
            key, content = str(record["id"]), trajectory_key(record)
            if key in seen_ids or content in seen_content:
                stats["duplicates"] += 1
                continue
            seen_ids.add(key)
            seen_content.add(content)
            yield record


def record_num_masks(record: CotTrace | OracleTrajectory) -> int | None:
    """The trajectory's masked-span count: ``num_masks``, else one per gold span of a RAMP record; None for QA."""
    value = record.get("num_masks")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    gold = record.get("gold")
    if record.get("kind") == "ramp" and isinstance(gold, list) and gold:
        return len(gold)
    return None


def token_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of ``messages`` rendered with ``tokenizer``'s chat template, as verl's MultiTurnSFTDataset counts them
    (it checks that its per-turn tokens equal this whole-conversation rendering)."""
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def export_sft(
    inputs: list[str | Path], out_dir: str | Path, val_fraction: float = 0.02, seed: int = 0,
    tokenizer: Any = None, max_tokens: int | None = None, curriculum: CurriculumConfig | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/train.parquet`` and ``out_dir/val.parquet`` (each atomically); returns counts.

    ``tokenizer`` (an HF tokenizer, or its name or directory) and ``max_tokens`` go together: records longer than
    ``max_tokens`` chat-template tokens are dropped and counted as ``too_long`` (see the module docstring).
    ``curriculum`` orders (``mixed``) or stages (``staged``) the train rows by mask count (module docstring).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if (tokenizer is None) != (max_tokens is None):
        raise ValueError("tokenizer and max_tokens go together: give both to drop over-long trajectories, or neither")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    bad = BadLines()
    stats = {"records": 0, "not_kept": 0, "duplicates": 0}
    length: dict[str, int] = {"too_long": 0, "longest_kept": 0}
    rows: list[SftRow] = []
    for record in iter_kept(inputs, bad, stats):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if tokenizer is not None:
            n = token_length(tokenizer, messages)
            if n > max_tokens:
                length["too_long"] += 1
                continue
            length["longest_kept"] = max(length["longest_kept"], n)
        rows.append({"messages": messages, "data_source": str(record.get("data_source", "unknown")),
                     "id": str(record["id"]), "num_masks": record_num_masks(record)})
    if not rows:
        raise ValueError(f"no kept trajectories in {[str(p) for p in inputs]}"
                         + (f" within {max_tokens} tokens ({length['too_long']} too long)" if max_tokens else ""))
    val_ids = split_ids((row["id"] for row in rows), val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {split: [row for row in rows if (row["id"] in val_ids) == (split == "val")] for split in ("train", "val")}
    columns = ["messages", "data_source", "id"]
    schedule = None
    for old in out.glob("stage_*_k*"):  # stage files of an earlier export: the new one writes its own, or none
        shutil.rmtree(old, ignore_errors=True)
    (out / "curriculum.json").unlink(missing_ok=True)  # likewise its schedule
    if curriculum is not None:
        splits["train"], schedule = _curriculum_rows(splits["train"], curriculum, out)
        columns += ["num_masks", "curriculum_stage"]
    counts = {}
    for split, part in splits.items():
        counts[split] = len(part)
        _write_rows(out / f"{split}.parquet", part, columns if split == "train" else columns[:3])
    limit = {"max_tokens": max_tokens, **length} if max_tokens is not None else {}
    extra = {"curriculum": schedule} if schedule is not None else {}
    return {**counts, **stats, **limit, **extra, "bad_lines": bad.summary(), "out_dir": str(out)}


def _write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame([{c: row[c] for c in columns} for row in rows], columns=columns).to_parquet(tmp, index=False)


def _curriculum_rows(
    rows: list[dict[str, Any]], config: CurriculumConfig, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The train rows in the curriculum's order; for ``staged`` also one file per stage; the schedule is written to
    ``curriculum.json`` and returned."""
    from masksearch_rl.curriculum.sampler import data_order

    missing = [row["id"] for row in rows if row["num_masks"] is None]
    if missing:
        raise ValueError(f"a curriculum orders trajectories by mask count, but {len(missing)} kept record(s) have "
                         f"none (QA records, or no num_masks/gold), e.g. id {missing[0]!r}")
    order = data_order([row["num_masks"] for row in rows], config)
    ordered = [{**rows[i], "curriculum_stage": stage} for i, stage in zip(order.indices, order.stages)]
    schedule = {**order.describe(), "train_file": "train.parquet", "stage_files": {}}
    if config.mode == "staged":
        for stage, k in enumerate(order.stage_masks):
            part = [row for row in ordered if row["curriculum_stage"] == stage]
            name = f"stage_{stage + 1}_k{k}/train.parquet"
            _write_rows(out / name, part, ["messages", "data_source", "id", "num_masks", "curriculum_stage"])
            schedule["stage_files"][f"num_masks={k}"] = name
    with atomic_path(out / "curriculum.json") as tmp:
        tmp.write_text(json.dumps(schedule, indent=2) + "\n", encoding="utf-8")
    return ordered, schedule
