"""The passage record every corpus reader yields and every index stores.

Format (FlashRAG / Search-R1 convention): ``{"id": str, "contents": "\"Title\"\\ntext"}`` plus an optional
``title``. Keeping the title inside ``contents`` means a retrieval server returns it without a second lookup,
and downstream formatting (``Doc i (Title: ...) text``) can split it back out with :func:`split_contents`.
Optional ``entities`` (``[{"text", "type"}]``) carry span annotations a generator knows (the synthetic world),
which the offline RAMP extractor uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from masksearch_rl.records import PassageRecord


@dataclass
class Passage:
    id: str
    title: str
    text: str
    entities: list[dict[str, str]] = field(default_factory=list)

    @property
    def contents(self) -> str:
        return format_contents(self.title, self.text)

    def to_json(self) -> PassageRecord:
        record: PassageRecord = {"id": self.id, "contents": self.contents, "title": self.title}
        if self.entities:
            record["entities"] = self.entities
        return record


def format_contents(title: str, text: str) -> str:
    """``"Title"\\ntext`` — the title line quoted, as FlashRAG's wiki corpora store it."""
    return f'"{title}"\n{text}' if title else text


def split_contents(contents: str) -> tuple[str, str]:
    """Inverse of :func:`format_contents`: ``(title, text)``; title is "" when the first line is not quoted."""
    first, sep, rest = contents.partition("\n")
    if sep and len(first) >= 2 and first.startswith('"') and first.endswith('"'):
        return first[1:-1], rest
    return "", contents
