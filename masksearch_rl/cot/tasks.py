"""Inputs of trajectory construction: RAMP items and QA questions, read as one :class:`Task` type.

RAMP items follow DESIGN.md (``id, query, masks, num_masks``); QA records are HotpotQA-style
``{"question", "answer"}`` (``answer`` a string or a list of aliases; the id is ``id``, else ``idx``, else a hash of
the question). A file may mix both; each line is read by its fields. Bad lines are skipped and counted (BadLines).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from envs.prompts import RAMP_INSTRUCTION, qa_messages, ramp_messages, ramp_user_text
from masksearch_rl.jsonl import BadLines, iter_jsonl


@dataclass(frozen=True)
class Task:
    id: str
    kind: str  # "ramp" or "qa"
    text: str  # what the agents are told (the RAMP user text, or the question)
    prompt: tuple[dict[str, str], ...]  # the policy's prompt (system + user), as in RL and eval
    golds: tuple[tuple[str, ...], ...]  # aliases per blank: one blank per mask for RAMP, one for QA
    data_source: str
    title: str | None = None
    masked_passage: str | None = None  # RAMP: the item's query, with which a passage-form answer is read

    @property
    def num_masks(self) -> int | None:
        return len(self.golds) if self.kind == "ramp" else None

    @property
    def gold_answer(self) -> str:
        return " | ".join(g[0] for g in self.golds)


def task_from_record(record: dict[str, Any], qa_source: str = "qa") -> Task:
    """One input record -> Task; raises ValueError naming the field when the record is neither kind."""
    if "masks" in record:
        masks = record.get("masks")
        if not isinstance(masks, list) or not masks or not all(isinstance(m, str) and m.strip() for m in masks):
            raise ValueError("field 'masks' must be a non-empty list of strings")
        if record.get("num_masks", len(masks)) != len(masks):
            raise ValueError("field 'num_masks' differs from len(masks)")
        if not isinstance(record.get("query"), str) or "id" not in record:
            raise ValueError("RAMP item needs string 'query' and 'id'")
        instruction = record.get("instruction") or RAMP_INSTRUCTION
        return Task(
            id=str(record["id"]), kind="ramp", text=ramp_user_text(record["query"], instruction),
            prompt=tuple(ramp_messages(record["query"], instruction)), golds=tuple((m,) for m in masks),
            data_source="ramp", title=record.get("title"), masked_passage=record["query"],
        )
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("record has neither 'masks' (RAMP) nor a string 'question' (QA)")
    aliases = [answer] if isinstance(answer, str) else answer
    if not isinstance(aliases, list) or not aliases or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError("field 'answer' must be a string or a non-empty list of strings")
    key = record.get("id", record.get("idx"))
    if key is None:
        key = hashlib.sha256(question.strip().encode()).hexdigest()[:16]
    return Task(
        id=str(key), kind="qa", text=question.strip(), prompt=tuple(qa_messages(question)),
        golds=(tuple(aliases),), data_source=str(record.get("data_source") or qa_source),
    )


def iter_tasks(path: str | Path, bad: BadLines, qa_source: str | None = None) -> Iterator[Task]:
    """Tasks of a JSONL file in order; bad lines and repeated ids go to ``bad``."""
    source = qa_source or Path(path).stem.split("_")[0] or "qa"
    seen: set[str] = set()
    for lineno, record in iter_jsonl(path, bad=bad):
        try:
            task = task_from_record(record, source)
        except ValueError as err:
            bad.add(path, lineno, str(err))
            continue
        if task.id in seen:
            bad.add(path, lineno, f"duplicate id {task.id!r}")
            continue
        seen.add(task.id)
        yield task


def task_to_json(task: Task) -> dict[str, Any]:
    """A Task as plain JSON (for the Ray engine's input shards); :func:`task_from_json` reads it back."""
    return asdict(task)


def task_from_json(data: dict[str, Any]) -> Task:
    return Task(**{**data, "prompt": tuple(dict(m) for m in data["prompt"]),
                   "golds": tuple(tuple(g) for g in data["golds"])})
