"""A RAMP item's source passage as the index stores it, and the exclusion that hides it from search.

Why hide it: BM25's top hit for a masked passage is, almost always, that very passage, so one search of the pasted
text returns the answer and RL can learn "paste and copy" instead of planning searches. With hiding on (``ramp export
--hide-source``, the oracle's ``hide_source``) the item's id and its unmasked text go with every search of its
episode (:class:`~masksearch_rl.retrieval.exclusion.SearchExclusion`), which also drops exact duplicates of the
passage stored under other ids.
"""

from __future__ import annotations

from typing import Any

from masksearch_rl.retrieval.exclusion import SearchExclusion


def source_text(item: dict[str, Any]) -> str:
    """The item's unmasked passage as the index stores it (a hit's ``text``).

    ``ramp generate`` may put the subject in front of a passage that never names it (``masksearch_rl.ramp.items
    .item_text``: ``"<title before any ' ('>: <text>"``); the index has the text without it, so it is taken off here.
    Should a passage itself begin that way, the text returned is a suffix of the indexed one, which the exclusion
    rule (a hit containing a hidden text) still hides.
    """
    passage = str(item.get("passage") or "").strip()
    subject = str(item.get("title") or "").split(" (")[0].strip()
    prefix = f"{subject}: "
    return passage[len(prefix):] if subject and passage.startswith(prefix) else passage


def source_exclusion(item: dict[str, Any]) -> SearchExclusion:
    """Hides the item's source passage: its id (``passage_id`` when the item has one, as items of several maskings of
    one passage do; else the item's id, which ``ramp generate`` sets to its passage's) and its unmasked text."""
    text = source_text(item)
    passage_id = item.get("passage_id", item["id"])
    return SearchExclusion(ids=(str(passage_id),), texts=(text,) if text.strip() else ())
