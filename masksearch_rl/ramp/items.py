"""What one passage becomes: a RAMP item, or the reason it was dropped.

The per-passage steps, pure functions of the passage and the run's :class:`~masksearch_rl.ramp.pipeline.RampConfig`
(so they are safe in worker processes): read the record -> the item's text (:func:`item_text`) -> the checks that
need no extractor (:func:`precheck`) -> validate the extractor's span proposals (:func:`prepare`) -> choose the
masks with a generator seeded from ``(seed, passage id)`` and build the item (:func:`build_item`).

Both engines run exactly these steps: the asyncio job runner of :mod:`masksearch_rl.ramp.pipeline` (one process,
offline extraction in a process pool) and the Ray Data job of :mod:`masksearch_rl.ramp.ray_job`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from envs.prompts import MASK_TOKEN
from masksearch_rl.corpus.passage import Passage, split_contents
from masksearch_rl.ramp.extractors import Extraction, OfflineExtractor, detect_language
from masksearch_rl.ramp.masking import (
    Candidate,
    has_mask_token,
    mask_text,
    restore_text,
    select_masks,
    validate_candidates,
)

if TYPE_CHECKING:
    from masksearch_rl.ramp.pipeline import RampConfig


@dataclass
class Prepared:
    """A passage after extraction and validation, waiting for mask selection."""

    passage: Passage
    text: str  # the item's passage (the title may have been put in front)
    source: str
    candidates: list[Candidate] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)
    drop: str | None = None
    parse_error: str | None = None
    result: dict | str | None = None  # the item or drop reason, when it was already built (in a worker)


def passage_from_record(record: dict) -> tuple[Passage, str | None]:
    """A passage JSONL record (``id`` + ``contents`` and/or ``title``/``text``) -> (Passage, its source)."""
    contents = record.get("contents")
    title, text = split_contents(contents) if isinstance(contents, str) else ("", "")
    if isinstance(record.get("text"), str):
        text = record["text"]
    if isinstance(record.get("title"), str):
        title = record["title"]
    entities = record.get("entities") if isinstance(record.get("entities"), list) else []
    source = record.get("source") if isinstance(record.get("source"), str) else None
    return Passage(id=str(record["id"]), title=title, text=text, entities=entities), source


def item_text(passage: Passage, prepend_title: bool) -> str:
    """The passage as the item shows it. Like the paper, name the subject when the passage never does, so a
    paragraph about "it" can still be searched for."""
    text = passage.text.strip()
    base = passage.title.split(" (")[0].strip()
    if prepend_title and base and base not in text:
        return f"{base}: {text}"
    return text


def prepare(passage: Passage, source: str, extraction: Extraction | None, config: RampConfig, text: str) -> Prepared:
    """Validate the extractor's proposals; mark the passage dropped when nothing can be masked."""
    prepared = Prepared(passage=passage, text=text, source=source)
    if extraction is None:
        return prepared
    if extraction.parse_error is not None:
        prepared.drop, prepared.parse_error = "unparseable_reply", extraction.parse_error
        return prepared
    prepared.candidates, prepared.rejects = validate_candidates(
        text, extraction.spans, passage.title, config.masking.max_span_chars
    )
    if not prepared.candidates:
        prepared.drop = "no_valid_span"
    return prepared


def precheck(passage: Passage, config: RampConfig) -> tuple[str, str | None]:
    """(item text, drop reason or None) for checks that need no extractor."""
    text = item_text(passage, config.prepend_title)
    if len(passage.text.split()) < config.min_words:
        return text, "too_short"
    if has_mask_token(text):
        return text, "contains_mask_token"
    return text, None


def prepare_offline(passage: Passage, source: str, config: RampConfig) -> Prepared:
    text, drop = precheck(passage, config)
    if drop:
        return Prepared(passage=passage, text=text, source=source, drop=drop)
    extractor = OfflineExtractor(use_annotations=config.use_annotations)
    return prepare(passage, source, extractor.extract_sync(passage, text), config, text)


def passage_rng(seed: int, passage_id: str) -> random.Random:
    """A generator that depends only on the run seed and the passage id (string seeding is stable across runs)."""
    return random.Random(f"{seed}\x1f{passage_id}")


def build_item(prepared: Prepared, config: RampConfig, scores: list[float] | None = None) -> dict | str:
    """The RAMP item for a prepared passage, or the reason it was dropped."""
    if prepared.drop:
        return prepared.drop
    rng = passage_rng(config.seed, prepared.passage.id)
    text = prepared.text
    chosen = select_masks(text, prepared.candidates, config.masking, rng, scores, detect_language(text))
    if not chosen:
        return "no_valid_span"
    masked = mask_text(text, chosen)
    masks = [c.text for c in chosen]
    # The invariants the format promises; a failure here is a bug, not bad input.
    if masked.count(MASK_TOKEN) != len(masks) or restore_text(masked, masks) != text or masked.startswith(MASK_TOKEN):
        raise RuntimeError(f"passage {prepared.passage.id!r}: masking broke an invariant (masks {masks!r})")
    item = {
        "id": prepared.passage.id,
        "title": prepared.passage.title,
        "passage": text,
        "query": masked,
        "instruction": config.masking.instruction,
        "masks": masks,
        "num_masks": len(masks),
        "entities": [c.text for c in prepared.candidates],
        "mask_types": [c.type for c in chosen],
        "source": prepared.source,
        "extractor": config.extractor,
        "selection": "ppl" if scores is not None else f"sample:{config.masking.weighting}",
        "seed": config.seed,
    }
    if scores is not None:
        by_start = {c.start: s for c, s in zip(prepared.candidates, scores)}
        item["mask_scores"] = [round(by_start[c.start], 4) for c in chosen]
    return item
