"""Passages hidden from search: a RAMP item's own source passage, so that pasting the masked text into the search
box does not hand back the answer (BM25's top hit for a masked passage is, almost always, that passage).

:class:`SearchExclusion` travels with a request (the RL row's ``tools_kwargs``, the retrieval server's ``exclude``
field) and every backend applies the same rule, :meth:`SearchExclusion.excludes`. A hit is hidden when

- its id is one of ``ids`` (in our index a RAMP item's id is its source passage's id); or
- its text, normalized (whitespace collapsed, casefolded), contains one of the normalized ``texts``: the source
  itself, an exact duplicate stored under another id, or a web page that quotes all of it; or
- a piece of its text of at least :data:`MIN_QUOTE_CHARS` normalized characters lies inside one of the ``texts``.
  Pieces are the text split at ellipses and dash or dot separators (web snippets join excerpts and dates with
  "..." or " — "): a shorter passage or a snippet quoting the source reveals the masked spans as well.

Web search results have no ids of ours, so for them the two text clauses do the work. Backends retrieve more than
``topk`` (:meth:`SearchExclusion.fetch_k`) so that ``topk`` hits usually remain after hiding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masksearch_rl.retrieval.types import Hit

MIN_QUOTE_CHARS = 50  # a shorter snippet piece inside the source is too common a phrase to call a quote
FETCH_MARGIN = 5  # extra hits fetched beyond topk + len(ids): room for duplicates of the source under other ids
_PIECE_SEPARATORS = re.compile(r"\.\.\.|…|\s[—–·]\s")
KEYS = ("ids", "texts")


def normalize(text: str) -> str:
    """Whitespace collapsed and casefolded: the form in which hit texts and hidden texts are compared."""
    return " ".join(text.split()).casefold()


class ExclusionError(ValueError):
    """A malformed exclusion. ``field`` is the offending key path inside it (``texts.2``; "" for the whole value),
    ``path`` the same under the request field's name (``exclude.texts.2``), ``type`` a pydantic-style code."""

    def __init__(self, field: str, msg: str, type: str):
        self.field, self.msg, self.type = field, msg, type
        self.path = ".".join(filter(None, ("exclude", field)))
        super().__init__(f"{self.path}: {msg}")


@dataclass(frozen=True)
class SearchExclusion:
    """Ids and texts whose passages a search must not return (see the module docstring for the rule)."""

    ids: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    _ids: frozenset[str] = field(init=False, repr=False, compare=False)
    _texts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "texts", tuple(str(t) for t in self.texts))
        normalized = tuple(normalize(t) for t in self.texts)
        if not all(normalized):
            # A blank text lies inside every hit: it would hide everything.
            raise ExclusionError("texts", "String should have at least 1 non-whitespace character", "string_too_short")
        object.__setattr__(self, "_ids", frozenset(self.ids))
        object.__setattr__(self, "_texts", normalized)

    @classmethod
    def from_json(cls, value: Any) -> SearchExclusion | None:
        """``{"ids": [str, ...], "texts": [str, ...]}`` (either key optional) -> an exclusion; None for None or one
        that hides nothing. Lists may be any sequence (parquet rows read through pandas give numpy arrays).
        Raises :class:`ExclusionError` naming the field."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ExclusionError("", "Input should be a valid dictionary", "dict_type")
        for key in value:
            if key not in KEYS:
                raise ExclusionError(str(key), "Extra inputs are not permitted", "extra_forbidden")
        lists = {}
        for key in KEYS:
            items = value.get(key)
            if items is None:
                items = ()
            if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
                raise ExclusionError(key, "Input should be a valid list", "list_type")
            items = list(items)
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise ExclusionError(f"{key}.{i}", "Input should be a valid string", "string_type")
                if key == "texts" and not item.strip():
                    raise ExclusionError(f"{key}.{i}", "String should have at least 1 non-whitespace character",
                                         "string_too_short")
            lists[key] = tuple(items)
        exclusion = cls(**lists)
        return exclusion if exclusion.ids or exclusion.texts else None

    def to_json(self) -> dict[str, list[str]]:
        """The JSON form (request field, RL row): both keys, always, so parquet rows share one schema."""
        return {"ids": list(self.ids), "texts": list(self.texts)}

    def excludes(self, hit: Hit) -> bool:
        """Whether ``hit`` is hidden: the one rule every backend applies (module docstring)."""
        if hit.id in self._ids:
            return True
        text = normalize(hit.text)
        if any(hidden in text for hidden in self._texts):
            return True
        pieces = (" ".join(piece.split()) for piece in _PIECE_SEPARATORS.split(text))
        return any(len(piece) >= MIN_QUOTE_CHARS and piece in hidden for piece in pieces for hidden in self._texts)

    def fetch_k(self, topk: int) -> int:
        """How many hits to retrieve so that ``topk`` usually remain once the hidden ones are dropped."""
        return topk + len(self._ids) + FETCH_MARGIN

    def keep(self, hits: list[Hit], topk: int) -> list[Hit]:
        """The first ``topk`` hits that are not hidden, in their order."""
        return [hit for hit in hits if not self.excludes(hit)][:topk]


def search_hiding(
    search: Callable[[list[str], int], list[list[Hit]]], queries: list[str], topk: int,
    exclusion: SearchExclusion | None,
) -> list[list[Hit]]:
    """``search(queries, topk)`` (a synchronous retriever's) without the passages ``exclusion`` hides."""
    if exclusion is None:
        return search(queries, topk)
    return [exclusion.keep(hits, topk) for hits in search(queries, exclusion.fetch_k(topk))]
