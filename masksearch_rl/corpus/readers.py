"""Streaming readers that turn the corpus formats people have on disk into :class:`Passage` records.

Why: the Wikipedia corpora used for search agents come in a few shapes (FlashRAG / Search-R1 passage JSONL, the
KILT knowledge source, WikiExtractor output, MaskSearch's one-file-per-article folders). Each reader here is a
generator holding one record (one article) at a time, so a 20 GB dump converts in bounded memory. Inputs may be a
single file or a directory tree (files read in sorted path order, hidden files skipped); ``.bz2``/``.gz`` files
are decompressed on the fly.

Bad input never stops a run: a record that is not valid JSON, not an object, lacks a field, has a field of the
wrong type, or has no text, and a line that is not UTF-8, is skipped alone and counted in
:class:`~masksearch_rl.jsonl.BadLines` with ``file:line`` and a reason; the lines after it are read. A missing path or
an unknown/undetectable format raises before anything is read, and a compressed file that ends early or is corrupt
raises :class:`~masksearch_rl.jsonl.InputError` where it is found: its partial content must not pass for the whole
(every file is read through :func:`masksearch_rl.jsonl.iter_lines`).

Format detection (``fmt="auto"``), from the first non-blank lines of the first files:
  * a line starting with ``<doc`` -> ``wikiextractor`` (``<doc>`` mode);
  * a JSON object with ``wikipedia_title`` or a list-valued ``text`` -> ``kilt``;
  * a JSON object with ``contents`` -> ``flashrag``;
  * a JSON object with ``url``, ``title`` and ``text`` -> ``wikiextractor`` (``--json`` mode);
  * a JSON object with ``title`` and ``text`` -> ``flashrag`` (the title/text variant);
  * for a directory whose first files match none of these -> ``masksearch-dir`` (plain-text articles);
  * for a single file matching none of these -> ``ValueError`` asking for an explicit format.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from masksearch_rl.corpus.chunking import Article, rechunk_passage, split_article
from masksearch_rl.corpus.passage import Passage, split_contents
from masksearch_rl.jsonl import BadLines, iter_jsonl, iter_lines

FORMATS = ("flashrag", "kilt", "wikiextractor", "masksearch-dir")
_SNIFF_LINES = 50  # non-blank lines looked at per file when detecting a format
_SNIFF_FILES = 5  # files looked at in a directory before deciding it is a per-article folder


@dataclass
class ReadStats:
    """Counts a reader fills in as it goes (for progress and the run summary)."""

    files: int = 0
    articles: int = 0  # good source records: articles, or passages for flashrag
    passages: int = 0


# --------------------------------------------------------------------------------------------------------------
# Files


def _input_files(path: Path) -> list[Path]:
    """The file itself, or every non-hidden file under a directory, in sorted path order."""
    if not path.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(Path(root) / name for name in names if not name.startswith("."))
    return sorted(files)


def _json_lines(path: Path, bad: BadLines, required: Iterable[str] = ()) -> Iterator[tuple[int, dict]]:
    """``(line, object)`` for each good JSON-object line (compressed or not; see iter_jsonl)."""
    return iter_jsonl(path, bad, required)


def _string_field(obj: dict, key: str) -> str | None:
    """The field as a string (numbers allowed, as ids often are); None if absent or of another type."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _wrong_type(key: str, expected: str) -> str:
    return f"field {key!r} must be {expected}"


# --------------------------------------------------------------------------------------------------------------
# FlashRAG / Search-R1 passages: {"id", "contents": "\"Title\"\ntext", "title"?}


def _flashrag_passage(obj: dict) -> Passage | str:
    """The record as a Passage, or the reason it is bad."""
    passage_id = _string_field(obj, "id")
    if passage_id is None:
        return _wrong_type("id", "a string or number")
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        return _wrong_type("title", "a string")
    if "contents" in obj:
        contents = obj["contents"]
        if not isinstance(contents, str):
            return _wrong_type("contents", "a string")
        first, newline, rest = contents.partition("\n")
        if title is None:
            title, text = split_contents(contents)
        elif newline and first.strip().strip('"') == title.strip():
            text = rest
        else:
            text = contents
    elif "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            return _wrong_type("text", "a string")
    else:
        return "missing field 'contents'"
    if not text.strip():
        return "empty text"
    entities = obj.get("entities")
    if not (isinstance(entities, list) and all(isinstance(e, dict) for e in entities)):
        entities = []
    return Passage(passage_id, title or "", text.strip(), entities)


def _flashrag_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Passage]]:
    for lineno, obj in _json_lines(path, bad, required=("id",)):
        passage = _flashrag_passage(obj)
        if isinstance(passage, str):
            bad.add(path, lineno, passage)
        else:
            yield lineno, passage


# --------------------------------------------------------------------------------------------------------------
# KILT knowledge source: {"wikipedia_id"?, "wikipedia_title", "text": [title, paragraph, ...]}

_KILT_BULLET = re.compile(r"^BULLET::::\s*[-*]?\s*")  # "BULLET::::- item" -> "item"; "BULLET::::1. x" -> "1. x"


def clean_kilt_paragraph(paragraph: str) -> str:
    """Drop ``Section::::`` heading lines (returns "") and ``BULLET::::`` list markers."""
    paragraph = paragraph.strip()
    if paragraph.startswith("Section::::"):
        return ""
    return _KILT_BULLET.sub("", paragraph).strip()


def _kilt_article(obj: dict) -> Article | str:
    paragraphs = obj["text"]
    if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
        return _wrong_type("text", "a list of strings")
    title = obj.get("wikipedia_title")
    if title is None:
        title = paragraphs[0] if paragraphs else ""  # paragraph 0 is the title
    if not isinstance(title, str):
        return _wrong_type("wikipedia_title", "a string")
    if not title.strip():
        return "missing field 'wikipedia_title'"
    article_id = _string_field(obj, "wikipedia_id") or _string_field(obj, "_id") or ""
    body = [clean for p in paragraphs[1:] if (clean := clean_kilt_paragraph(p))]
    if not body:
        return "empty text"
    return Article(title.strip(), body, id=article_id)


def _kilt_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Article]]:
    for lineno, obj in _json_lines(path, bad, required=("text",)):
        article = _kilt_article(obj)
        if isinstance(article, str):
            bad.add(path, lineno, article)
        else:
            yield lineno, article


# --------------------------------------------------------------------------------------------------------------
# WikiExtractor: --json lines {"id","url","title","text"} or <doc id=".." url=".." title="..">Title\n\ntext</doc>

_DOC_OPEN = re.compile(r"<doc\b([^>]*)>")
_DOC_ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')


def _wikiextractor_article(article_id: str, title: str, text_lines: list[str]) -> Article | str:
    """WikiExtractor HTML-escapes text by default, and its text may start with the title line: undo both."""
    paragraphs = [html.unescape(line.strip()) for line in text_lines if line.strip()]
    title = html.unescape(title).strip()
    if not title and paragraphs:
        title = paragraphs.pop(0)
    elif paragraphs and paragraphs[0] == title:
        paragraphs.pop(0)
    if not title:
        return "missing title"
    if not paragraphs:
        return "empty text"
    return Article(title, paragraphs, id=article_id)


def _wikiextractor_json_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Article]]:
    for lineno, obj in _json_lines(path, bad, required=("title", "text")):
        if not isinstance(obj["title"], str):
            bad.add(path, lineno, _wrong_type("title", "a string"))
        elif not isinstance(obj["text"], str):
            bad.add(path, lineno, _wrong_type("text", "a string"))
        else:
            article = _wikiextractor_article(_string_field(obj, "id") or "", obj["title"], obj["text"].split("\n"))
            if isinstance(article, str):
                bad.add(path, lineno, article)
            else:
                yield lineno, article


def _wikiextractor_doc_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Article]]:
    """Parse ``<doc ...>`` blocks line by line; an unclosed block (a truncated file) is counted, not yielded."""
    attributes: dict[str, str] | None = None  # None while outside a <doc>
    start = 0
    lines: list[str] = []
    in_stray_text = False
    for lineno, line in iter_lines(path, bad):
        stripped = line.strip()
        if stripped.startswith("<doc"):
            if attributes is not None:
                bad.add(path, start, f"<doc> not closed before the next <doc> at line {lineno}")
            match = _DOC_OPEN.match(stripped)
            attributes = dict(_DOC_ATTRIBUTE.findall(match.group(1))) if match else None
            if attributes is None:
                bad.add(path, lineno, "malformed <doc> tag")
            start, lines, in_stray_text = lineno, [], False
        elif stripped == "</doc>":
            if attributes is None:
                bad.add(path, lineno, "</doc> without an opening <doc>")
                continue
            article = _wikiextractor_article(attributes.get("id", ""), attributes.get("title", ""), lines)
            if isinstance(article, str):
                bad.add(path, start, article)
            else:
                yield start, article
            attributes, lines = None, []
        elif attributes is not None:
            lines.append(line)
        elif stripped and not in_stray_text:
            bad.add(path, lineno, "text outside <doc>...</doc>")
            in_stray_text = True  # count a run of stray lines once
    if attributes is not None:
        bad.add(path, start, "<doc> not closed at end of file")


def _wikiextractor_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Article]]:
    """Each file is in one of WikiExtractor's two modes; look at its first character to tell which."""
    kind = _sniff_file(path)
    if kind is not None and kind != "wikiextractor-doc":
        return _wikiextractor_json_records(path, bad)
    return _wikiextractor_doc_records(path, bad)


# --------------------------------------------------------------------------------------------------------------
# MaskSearch per-article folders: file name (minus .txt) = title, one paragraph per line


def _article_file_records(path: Path, bad: BadLines) -> Iterator[tuple[int, Article]]:
    title = path.name.removesuffix(".txt")
    skipped = bad.total
    paragraphs = [line.strip() for _, line in iter_lines(path, bad) if line.strip()]
    if not paragraphs:
        if bad.total == skipped:  # (lines that could not be decoded are counted already)
            bad.add(path, 1, "empty text")
        return
    yield 1, Article(title, paragraphs, id=title)


# --------------------------------------------------------------------------------------------------------------
# Detection and dispatch


def _sniff_file(path: Path) -> str | None:
    """Which format a file's first lines look like (``wikiextractor-doc``/``-json`` told apart), or None.
    (Unreadable lines are skipped quietly here: the real read counts them.)"""
    seen = 0
    try:
        for _, line in iter_lines(path, BadLines(log=False)):
            line = line.strip()
            if not line:
                continue
            if line.startswith("<doc"):
                return "wikiextractor-doc"
            kind = _json_kind(line)
            if kind:
                return kind
            seen += 1
            if seen >= _SNIFF_LINES:
                break
    except ValueError:  # InputError: a corrupt compressed file; reading it for real reports it
        return None
    return None


def _json_kind(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    if "wikipedia_title" in obj or isinstance(obj.get("text"), list):
        return "kilt"
    if "contents" in obj:
        return "flashrag"
    if {"url", "title", "text"} <= obj.keys():
        return "wikiextractor-json"
    if {"title", "text"} <= obj.keys():
        return "flashrag"
    return None


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS` for ``path`` (rules in the module docstring); raises if it cannot tell."""
    path = Path(path)
    files = _input_files(path)
    if not files:
        raise ValueError(f"no files under {path}")
    for file in files[:_SNIFF_FILES]:
        kind = _sniff_file(file)
        if kind:
            return "wikiextractor" if kind.startswith("wikiextractor") else kind
    if path.is_dir():
        return "masksearch-dir"
    raise ValueError(
        f"cannot detect the corpus format of {path}: its first lines are neither JSON records we know nor "
        f"WikiExtractor <doc> blocks; pass a format explicitly (one of {', '.join(FORMATS)})"
    )


_ARTICLE_RECORDS: dict[str, Callable[[Path, BadLines], Iterator[tuple[int, Article]]]] = {
    "kilt": _kilt_records,
    "wikiextractor": _wikiextractor_records,
    "masksearch-dir": _article_file_records,
}


def _read(fmt: str, path: Path, chunk_words: int | None, bad: BadLines, stats: ReadStats) -> Iterator[Passage]:
    files = _input_files(path)
    for file in files:
        stats.files += 1
        if fmt == "flashrag":
            for _, passage in _flashrag_records(file, bad):
                stats.articles += 1
                for piece in rechunk_passage(passage, chunk_words):
                    stats.passages += 1
                    yield piece
        else:
            for _, article in _ARTICLE_RECORDS[fmt](file, bad):
                stats.articles += 1
                for piece in split_article(article, chunk_words):
                    stats.passages += 1
                    yield piece


def read_corpus(
    path: str | os.PathLike,
    fmt: str = "auto",
    chunk_words: int | None = 100,
    bad: BadLines | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Passage]:
    """Stream passages from a corpus file or directory in format ``fmt`` (or detected when ``"auto"``).

    ``chunk_words``: target passage size for article formats (``None`` keeps each article whole); for
    ``flashrag`` it only cuts records longer than 1.5× this and ``None`` passes every record through.
    ``bad`` collects skipped records (a private one, still logged, when None). A missing path, an unknown
    format or a bad ``chunk_words`` raises here, before iteration starts.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    if chunk_words is not None and chunk_words < 1:
        raise ValueError(f"chunk_words must be at least 1 (or None for no chunking), got {chunk_words}")
    return _read(
        fmt, path, chunk_words, bad if bad is not None else BadLines(), stats if stats is not None else ReadStats()
    )


def read_flashrag(
    path: str | os.PathLike, chunk_words: int | None = None, bad: BadLines | None = None, stats: ReadStats | None = None
) -> Iterator[Passage]:
    """FlashRAG / Search-R1 passage JSONL, passed through (records over 1.5×``chunk_words`` words are cut)."""
    return read_corpus(path, "flashrag", chunk_words, bad, stats)


def read_kilt(
    path: str | os.PathLike, chunk_words: int | None = 100, bad: BadLines | None = None, stats: ReadStats | None = None
) -> Iterator[Passage]:
    """KILT knowledge-source JSONL; section headings dropped, bullet markers removed."""
    return read_corpus(path, "kilt", chunk_words, bad, stats)


def read_wikiextractor(
    path: str | os.PathLike, chunk_words: int | None = 100, bad: BadLines | None = None, stats: ReadStats | None = None
) -> Iterator[Passage]:
    """WikiExtractor output (``--json`` or ``<doc>`` mode, per file), a file or an ``AA/wiki_00`` tree."""
    return read_corpus(path, "wikiextractor", chunk_words, bad, stats)


def read_article_dir(
    path: str | os.PathLike, chunk_words: int | None = 100, bad: BadLines | None = None, stats: ReadStats | None = None
) -> Iterator[Passage]:
    """MaskSearch layout: one file per article, file name (minus ``.txt``) = title, one paragraph per line."""
    return read_corpus(path, "masksearch-dir", chunk_words, bad, stats)
