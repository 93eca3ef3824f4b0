"""Cut articles into retrieval-sized passages (about ``chunk_words`` words each).

Why: retrievers and RAMP masking work on short passages (the ~100-word units of the DPR/FlashRAG Wikipedia
corpora), while our sources give whole articles. Paragraphs are packed greedily; when the next paragraph does not
fit, the chunk ends at the paragraph boundary if it is at least half full, otherwise it is topped up sentence by
sentence. A sentence is only cut (into near-equal parts) when it alone is longer than a chunk. A "word" is a
whitespace-separated token, so no word is ever cut, and joining the words of an article's chunks in order gives
back the article's words exactly.

Sizes: a chunk holds at most ``chunk_words`` words, except that a chunk still shorter than ``chunk_words // 4``
may take the next piece anyway, and a short last chunk is merged into the one before it; neither ever exceeds
:func:`max_chunk_words` (1.5 × ``chunk_words``). So every chunk but possibly the last has at least
``chunk_words // 4`` words.

Ids: chunk ``i`` (from 0) of an article is ``f"{key}-{i}"``, where ``key`` is the article's id when the source
has one (KILT ``wikipedia_id``, WikiExtractor ``id``, FlashRAG ``id``) and its title otherwise. The same input
and ``chunk_words`` always give the same ids. A whole article kept unchunked is chunk 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from masksearch_rl.corpus.passage import Passage


@dataclass
class Article:
    """One source document before chunking: a title and its paragraphs (headings already removed)."""

    title: str
    paragraphs: list[str]
    id: str = ""
    entities: list[dict[str, str]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """What chunk ids are built from: the source id if there is one, else the title."""
        return self.id or self.title


def max_chunk_words(chunk_words: int) -> int:
    """The hard upper bound on a chunk's size for a target of ``chunk_words``."""
    return chunk_words + chunk_words // 2


def chunk_id(key: str, index: int) -> str:
    return f"{key}-{index}"


# A candidate sentence end: ., ! or ? (maybe followed by closing quotes/brackets), then whitespace.
_CANDIDATE_END = re.compile(r"[.!?][\"'”’»)\]]*\s+")
# Words ending in a period that rarely end a sentence: initials ("J.") and common abbreviations.
_ABBREVIATION = re.compile(r"(?<![\w.])(?:[A-Z]|Mr|Mrs|Ms|Dr|Prof|St|Mt|Jr|Sr|Gen|Col|Lt|Capt|vs|No|e\.g|i\.e|ca|c)\.$")
_OPENING_PUNCTUATION = "\"'“‘«([¿¡"


def split_sentences(paragraph: str) -> list[str]:
    """Cut a paragraph into sentences at whitespace (a light heuristic; good enough to pick chunk boundaries).

    A boundary follows a word ending in ., ! or ? that is not an initial or a common abbreviation, when the next
    word does not start in lower case (so caseless scripts count as a new sentence).
    """
    sentences: list[str] = []
    start = 0
    for match in _CANDIDATE_END.finditer(paragraph):
        following = paragraph[match.end() : match.end() + 4].lstrip(_OPENING_PUNCTUATION)
        before = max(start, match.start() - 8)  # enough to see the longest abbreviation
        if following and not following[0].islower() and not _ABBREVIATION.search(paragraph, before, match.start() + 1):
            sentences.append(paragraph[start : match.end()].strip())
            start = match.end()
    rest = paragraph[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def _split_evenly(words: list[str], limit: int) -> list[list[str]]:
    """Cut an over-long run of words into the fewest near-equal parts of at most ``limit`` words."""
    parts = -(-len(words) // limit)
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(words[start:end])
        start = end
    return pieces


def chunk_paragraphs(paragraphs: Iterable[str], chunk_words: int = 100) -> list[list[str]]:
    """Pack paragraphs into chunks of words (see the module docstring for the rules and bounds)."""
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be at least 1, got {chunk_words}")
    small = chunk_words // 4
    hard_max = max_chunk_words(chunk_words)
    chunks: list[list[str]] = []
    current: list[str] = []

    def fits(count: int) -> bool:
        size = len(current)
        return size + count <= chunk_words or (0 < size < small and size + count <= hard_max)

    def close() -> None:
        nonlocal current
        if current:
            chunks.append(current)
            current = []

    for paragraph in paragraphs:
        words = paragraph.split()
        if not words:
            continue
        if fits(len(words)):
            current.extend(words)
            continue
        if len(current) >= chunk_words // 2:
            close()  # full enough: prefer ending the chunk at this paragraph boundary
            if fits(len(words)):
                current.extend(words)
                continue
        for sentence in split_sentences(paragraph):
            for piece in _split_evenly(sentence.split(), chunk_words):
                if not fits(len(piece)):
                    close()
                current.extend(piece)
    close()
    if len(chunks) >= 2 and len(chunks[-1]) < small and len(chunks[-2]) + len(chunks[-1]) <= hard_max:
        chunks[-2].extend(chunks.pop())
    return chunks


def _entities_in(entities: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """Keep the entity annotations whose surface text occurs in this chunk."""
    return [entity for entity in entities if entity.get("text") and entity["text"] in text]


def chunk_article(article: Article, chunk_words: int = 100) -> list[Passage]:
    """Passages ``<key>-0``, ``<key>-1``, ... of about ``chunk_words`` words, each carrying the article title."""
    passages = []
    for index, words in enumerate(chunk_paragraphs(article.paragraphs, chunk_words)):
        text = " ".join(words)
        passages.append(
            Passage(chunk_id(article.key, index), article.title, text, _entities_in(article.entities, text))
        )
    return passages


def whole_article(article: Article) -> Passage:
    """The article as a single passage ``<key>-0`` (no chunking); paragraphs stay on their own lines."""
    text = "\n".join(p.strip() for p in article.paragraphs if p.strip())
    return Passage(chunk_id(article.key, 0), article.title, text, list(article.entities))


def split_article(article: Article, chunk_words: int | None = 100) -> list[Passage]:
    """Chunk the article, or keep it whole when ``chunk_words`` is None."""
    if chunk_words is None:
        return [whole_article(article)]
    return chunk_article(article, chunk_words)


def rechunk_passage(passage: Passage, chunk_words: int | None = None) -> list[Passage]:
    """Keep an existing passage as-is (same id) unless it is longer than :func:`max_chunk_words`.

    Why: corpora that are already passage-sized (FlashRAG / Search-R1 ``psgs_w100``) must keep their ids; only
    over-long records (whole documents) are cut, into ``<id>-0``, ``<id>-1``, ... with lines as paragraphs.
    ``chunk_words=None`` never cuts.
    """
    if chunk_words is None or len(passage.text.split()) <= max_chunk_words(chunk_words):
        return [passage]
    article = Article(passage.title, passage.text.split("\n"), id=passage.id, entities=passage.entities)
    return chunk_article(article, chunk_words)
