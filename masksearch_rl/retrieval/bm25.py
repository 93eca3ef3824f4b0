"""BM25 over a passage collection: a streaming indexer, block-compressed postings and a compiled top-k kernel.

Why our own index (it used to be bm25s'): bm25s tokenises the whole corpus into memory and stores a float32 weight
and an int32 row per posting (8 bytes), so at 1M passages a build took 2.4 GB and the index 969 MB, twice Lucene's
time and three times its size. Here the build streams the corpus in chunks, writes each chunk's postings to a
temporary run, and merges the runs term range by term range, so memory stays bounded whatever the corpus size. The
postings of a term are stored in blocks of 128: the first row of the block, then the row gaps and the term
frequencies bit-packed at the width the block needs (~2 bytes a posting instead of 8). Weights are computed at
query time from the term frequency and the passage length, as Lucene does.

Scoring is Lucene's BM25: ``idf(t) * tf / (tf + k1 * (1 - b + b * len / avglen))`` with
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``; a query term given twice counts twice. Defaults: k1 1.5, b 0.75, the
English stopword list Lucene uses (33 words) and the Snowball English stemmer. The ``pyserini`` preset is
Anserini's defaults (k1 0.9, b 0.4, Porter stemmer, Lucene's tokenisation of numbers, initials and possessives,
passage lengths rounded as Lucene's one-byte norms round them), for results close to a pyserini index of the same
corpus.

Search touches only the passages in the query's posting lists, rarest term first; once the k-th best partial score
beats all that the remaining terms can add (MaxScore), their long, low-weight lists are only looked up for the
candidates left. Results: hits with score > 0, best first, equal scores by lower row. The compiled parts (the block
encoder, the search kernel, numba's threads and cache) are :mod:`masksearch_rl.retrieval.bm25_kernels`; this module
is the analyzer, the streaming build and the retriever around them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masksearch_rl.retrieval.bm25_kernels import (
    PARALLEL_LOCK,
    decode_block,
    encoder,
    resolve_threads,
    topk_kernels,
)
from masksearch_rl.retrieval.docstore import DocStore
from masksearch_rl.retrieval.types import Hit

logger = logging.getLogger(__name__)

BLOCK = 128  # postings per block
# Lucene's English stop words (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET; the same 33 words as bm25s' "en").
LUCENE_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split()
)
TOKEN_PATTERNS = {
    "words": r"\w\w+",  # words of two or more characters (bm25s' and scikit-learn's default)
    "lucene": r"\w+(?:[.,'’]\w+)*",  # keeps 2,345,002 / 3.5 / u.s / o'neil whole, as Lucene's StandardTokenizer
}
PRESETS = {"pyserini": {"k1": 0.9, "b": 0.4, "stemmer": "porter", "stopwords": "en", "tokens": "lucene",
                        "lengths": "lucene"}}
LUCENE_EXACT_LENGTHS = 24  # Lucene's norm byte: lengths below this are exact, above it 4 significant bits


@dataclass
class Bm25Options:
    """Build-time settings (stored in the manifest; changing them needs a rebuild). ``preset`` only records which
    preset (see ``PRESETS``) the other fields came from."""

    k1: float = 1.5
    b: float = 0.75
    stemmer: str = "english"  # PyStemmer algorithm (english, porter, ...); "" disables stemming
    stopwords: str = "en"  # "en": Lucene's 33 English stop words; "" disables stopword removal
    tokens: str = "words"  # a key of TOKEN_PATTERNS
    lengths: str = "exact"  # "lucene": passage lengths rounded down as Lucene stores them in its one-byte norms
    preset: str = ""

    def __post_init__(self) -> None:
        if self.k1 < 0:
            raise ValueError(f"bm25 option k1 must be >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"bm25 option b must be in [0, 1], got {self.b}")
        if self.stopwords not in ("en", ""):
            raise ValueError(f"bm25 option stopwords must be 'en' or '', got {self.stopwords!r}")
        if self.tokens not in TOKEN_PATTERNS:
            raise ValueError(f"bm25 option tokens must be one of {', '.join(TOKEN_PATTERNS)}, got {self.tokens!r}")
        if self.lengths not in ("exact", "lucene"):
            raise ValueError(f"bm25 option lengths must be 'exact' or 'lucene', got {self.lengths!r}")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown bm25 preset {self.preset!r} (known: {', '.join(PRESETS)})")

    @classmethod
    def with_preset(cls, preset: str = "", **options) -> Bm25Options:
        """Options of ``preset`` (if any), overridden by the ``options`` given."""
        if preset and preset not in PRESETS:
            raise ValueError(f"unknown bm25 preset {preset!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS.get(preset, {}), **options, "preset": preset})


def _ascii_word_table() -> bytes:
    """bytes.translate table: ASCII letters lower-cased, digits and ``_`` kept, everything else ASCII a space;
    bytes >= 128 (UTF-8 sequences) are only ever seen in texts that take the regex path."""
    table = bytearray(range(256))
    for code in range(128):
        char = chr(code)
        table[code] = ord(char.lower()) if char.isalnum() or char == "_" else 32
    return bytes(table)


_ASCII_WORDS = _ascii_word_table()


class Analyzer:
    """Text -> term ids: lower-case, split into tokens, drop stop words, stem; one cache entry per surface word.

    ``vocab`` maps terms (stems) to ids. With ``grow`` (indexing) unseen terms get new ids; without (queries)
    unknown words are dropped. Surface words are cached as UTF-8 bytes: an ASCII text in the ``words`` mode is
    split by ``bytes.translate`` + ``split`` (four times faster than the regex, same tokens), others by the regex.
    """

    def __init__(self, options: Bm25Options, vocab: dict[str, int] | None = None, grow: bool = False):
        self.pattern = re.compile(TOKEN_PATTERNS[options.tokens])
        self.fast_ascii = options.tokens == "words"
        self.min_chars = 2 if options.tokens == "words" else 1
        self.stopwords = LUCENE_STOPWORDS if options.stopwords else frozenset()
        self.possessive = options.tokens == "lucene"
        if options.stemmer:
            import Stemmer  # PyStemmer

            self.stem = Stemmer.Stemmer(options.stemmer).stemWord
        else:
            self.stem = None
        self.vocab = vocab if vocab is not None else {}
        self.grow = grow
        self.words: dict[bytes, int] = {}  # surface word -> term id; -1: dropped (stop word, too short, unknown)
        self.names: list[str] = list(self.vocab)  # term id -> term

    def words_of(self, text: str) -> list[bytes]:
        if self.fast_ascii and text.isascii():
            return text.encode().translate(_ASCII_WORDS).split()
        return [word.encode() for word in self.pattern.findall(text.lower())]

    def _resolve(self, raw: bytes) -> int:
        word = raw.decode()
        token = word[:-2] if self.possessive and word.endswith(("'s", "’s")) else word
        if len(token) < self.min_chars or token in self.stopwords:
            term_id = -1
        else:
            term = self.stem(token) if self.stem else token
            term_id = self.vocab.get(term, -1)
            if term_id < 0 and self.grow:
                term_id = self.vocab[term] = len(self.vocab)
                self.names.append(term)
        if self.grow or len(self.words) < 1_000_000:  # a query cache must not grow without bound
            self.words[raw] = term_id
        return term_id

    def raw_ids(self, text: str) -> list[int]:
        """One id per token of ``text``, -1 for dropped ones (the indexer filters them in bulk)."""
        words = self.words_of(text)
        ids = list(map(self.words.get, words))
        if None in ids:  # resolve each new word once (set operations run in C), then look up again
            for word in set(words).difference(self.words):
                self._resolve(word)
            ids = list(map(self.words.get, words))
            if None in ids:  # queries past the cache limit: unknown and uncached words are dropped
                ids = [-1 if i is None else i for i in ids]
        return ids

    def term_ids(self, text: str) -> list[int]:
        """The term ids of ``text`` in order (stop words and, for queries, unknown words dropped)."""
        ids = self.raw_ids(text)
        return [i for i in ids if i >= 0] if -1 in ids else ids


# ----------------------------------------------------------------------------------------------------- files
TERMS_FILE = "terms.txt"  # one term per line, line number = term id
ARRAYS = ("doc_len", "term_df", "term_block", "term_max", "block_base", "block_off", "block_bits", "payload")


def _chunks(texts: Iterable[str], size: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_bm25(texts: Iterable[str], out_dir: Path, options: Bm25Options, show_progress: bool = True,
               workers: int | None = None, batch_docs: int = 25_000, merge_postings: int = 2_000_000) -> None:
    """Index ``texts`` (streamed, in docstore row order) into ``out_dir``; memory stays bounded.

    Pass 1 tokenises ``batch_docs`` passages at a time, in ``workers`` processes (default: one per core, at most 4;
    a corpus of one batch stays in this process), into sorted runs of (term, row, tf) on disk. Each worker returns
    the terms of its batch as strings with batch-local ids, which this process maps to the global vocabulary (in
    corpus order of first occurrence, so builds are reproducible). Pass 2 merges the runs ``merge_postings``
    postings at a time, in term order, into the compressed blocks.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    doc_len = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".runs-") as tmp:
        with _BatchTokenizer(options, workers) as tokenizer:  # its worker processes end before the merge
            runs, base, df = [], 0, np.zeros(0, dtype=np.int64)
            progress = tqdm(desc="BM25 index", unit="psg", disable=not show_progress)
            for terms, batch_terms, rows, tfs, lengths in tokenizer.map(_chunks(texts, batch_docs)):
                global_ids = np.fromiter((vocab.setdefault(term, len(vocab)) for term in terms), dtype=np.int64,
                                         count=len(terms))
                keys = global_ids[batch_terms] * len(lengths) + rows
                order = np.argsort(keys)  # global term order differs from the batch's
                run = _Run(Path(tmp) / f"run{len(runs)}")  # sorted by term, then row
                run_terms = global_ids[batch_terms[order]]
                run.write(run_terms, rows[order].astype(np.int64) + base, tfs[order])
                counts = np.bincount(run_terms, minlength=len(vocab))
                df = np.concatenate([df, np.zeros(len(counts) - len(df), dtype=np.int64)]) + counts
                runs.append(run)
                doc_len.append(lengths)
                base += len(lengths)
                progress.update(len(lengths))
            progress.close()
        doc_len = np.concatenate(doc_len) if doc_len else np.zeros(0, dtype=np.uint32)
        logger.info("tokenised %d passages in %.1fs (%d workers): %d terms, %d postings", len(doc_len),
                    time.perf_counter() - started, tokenizer.workers, len(df), int(df.sum()))
        started = time.perf_counter()
        _merge_runs(runs, df, doc_len, options, out_dir, merge_postings)
        logger.info("merged %d runs in %.1fs", len(runs), time.perf_counter() - started)
    with open(out_dir / TERMS_FILE, "w", encoding="utf-8") as handle:
        for term in vocab:  # dicts keep insertion order: line i is term id i
            handle.write(term.replace("\n", " ") + "\n")


_worker_analyzer: Analyzer | None = None


def _init_worker(options: Bm25Options) -> None:
    global _worker_analyzer
    _worker_analyzer = Analyzer(options, grow=True)


def _tokenize_batch(texts: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch's postings: ``(terms, batch_terms, rows, tfs, lengths)`` where ``terms[batch_terms[i]]`` is the
    term of posting ``i``, sorted by batch term then row; ``lengths`` are the passages' token counts."""
    analyzer = _worker_analyzer
    tokens, flat = array("q"), array("q")
    for text in texts:
        ids = analyzer.raw_ids(text)
        tokens.append(len(ids))
        flat.extend(ids)
    rows = np.repeat(np.arange(len(texts), dtype=np.int64), np.frombuffer(tokens, dtype=np.int64))
    terms = np.frombuffer(flat, dtype=np.int64)
    kept = terms >= 0
    rows, terms = rows[kept], terms[kept]
    lengths = np.bincount(rows, minlength=len(texts)).astype(np.uint32)
    used, local = np.unique(terms, return_inverse=True)  # the worker's term ids -> this batch's
    keys = local.astype(np.int64) * len(texts) + rows
    keys.sort()
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    tfs = np.minimum(np.diff(np.append(starts, len(keys))), 2**16 - 1).astype(np.uint16)
    keys = keys[starts]
    names = analyzer.names
    return ([names[i] for i in used.tolist()], (keys // len(texts)).astype(np.int64),
            (keys % len(texts)).astype(np.int32), tfs, lengths)


class _BatchTokenizer:
    """``map(batches)`` -> :func:`_tokenize_batch` of each, in order: in worker processes (at most two batches
    each in flight, so memory stays bounded), or in this process for a corpus of one batch or ``workers=1``."""

    def __init__(self, options: Bm25Options, workers: int | None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.options = options
        self.workers = max(1, workers or min(4, cores))
        self.pool = None

    def map(self, batches: Iterable[list[str]]):
        from collections import deque

        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        second = next(batches, None)
        if second is None or self.workers == 1:  # small corpus: no process start-up
            _init_worker(self.options)
            for batch in _chain(first, second, batches):
                yield _tokenize_batch(batch)
            return
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(self.workers, _init_worker, (self.options,))
        pending = deque()
        for batch in _chain(first, second, batches):
            pending.append(self.pool.apply_async(_tokenize_batch, (batch,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> _BatchTokenizer:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()


def _chain(first, second, rest):
    yield first
    if second is not None:
        yield second
        yield from rest


class _Run:
    """One chunk's postings on disk, sorted by (term, row): three flat files read back slice by slice.

    Why files read with ``np.fromfile`` rather than memory maps: pages of a mapped file count in the process's
    resident set once read, and the merge reads every run whole.
    """

    FIELDS = (("terms", np.int32), ("rows", np.int32), ("tfs", np.uint16))

    def __init__(self, stem: Path):
        self.stem = stem

    def write(self, terms: np.ndarray, rows: np.ndarray, tfs: np.ndarray) -> None:
        for (name, dtype), values in zip(self.FIELDS, (terms, rows, np.minimum(tfs, 2**16 - 1))):
            values.astype(dtype).tofile(f"{self.stem}.{name}")

    def term_range(self, first: int, last: int) -> tuple[int, int]:
        terms = np.memmap(f"{self.stem}.terms", dtype=np.int32, mode="r")  # binary search: a few pages only
        lo, hi = np.searchsorted(terms, [first, last])
        del terms
        return int(lo), int(hi)

    def read(self, name: str, lo: int, hi: int) -> np.ndarray:
        dtype = dict(self.FIELDS)[name]
        return np.fromfile(f"{self.stem}.{name}", dtype=dtype, count=hi - lo, offset=lo * np.dtype(dtype).itemsize)


def lucene_lengths(doc_len: np.ndarray) -> np.ndarray:
    """Passage lengths as Lucene's BM25 sees them: it stores each in one byte (``SmallFloat.intToByte4``), exact
    below 24 and, above, 24 plus the excess rounded down to its 4 most significant bits (so 100 reads as 96)."""
    lengths = np.asarray(doc_len, dtype=np.int64)
    excess = np.maximum(lengths - LUCENE_EXACT_LENGTHS, 0)
    bits = np.zeros_like(excess)
    positive = excess > 0
    bits[positive] = np.frexp(excess[positive].astype(np.float64))[1]  # bit length of each excess
    shift = np.maximum(bits - 4, 0)
    rounded = LUCENE_EXACT_LENGTHS + ((excess >> shift) << shift)
    return np.where(lengths < LUCENE_EXACT_LENGTHS, lengths, rounded)


def _norms(doc_len: np.ndarray, options: Bm25Options) -> np.ndarray:
    """``k1 * (1 - b + b * len / avglen)`` per passage (float32): the length part of every BM25 weight. The
    average is of the exact lengths in both modes (Lucene's: total term count / passages)."""
    avg = float(doc_len.mean()) if len(doc_len) and doc_len.mean() > 0 else 1.0
    lengths = lucene_lengths(doc_len) if options.lengths == "lucene" else doc_len
    return (options.k1 * (1 - options.b + options.b * lengths.astype(np.float64) / avg)).astype(np.float32)


def _idf(df: np.ndarray, num_docs: int) -> np.ndarray:
    return np.log1p((num_docs - df + 0.5) / (df + 0.5)).astype(np.float32)


def _merge_runs(runs: list[_Run], df: np.ndarray, doc_len: np.ndarray, options: Bm25Options, out_dir: Path,
                merge_postings: int) -> None:
    """Merge the sorted runs into the block files, a bounded range of terms at a time."""
    num_terms = len(df)
    blocks_per_term = (df + BLOCK - 1) // BLOCK
    term_block = np.zeros(num_terms + 1, dtype=np.int64)
    np.cumsum(blocks_per_term, out=term_block[1:])
    num_blocks = int(term_block[-1])
    norms = _norms(doc_len, options)
    idf = _idf(df, len(doc_len))
    term_max = np.zeros(num_terms, dtype=np.float32)
    block_base = np.zeros(num_blocks, dtype=np.uint32)
    block_off = np.zeros(num_blocks + 1, dtype=np.int64)
    block_bits = np.zeros((num_blocks, 2), dtype=np.uint8)  # gap width, tf width
    ends = np.cumsum(df)
    encode = encoder()
    words_written = 0
    with open(out_dir / "payload.bin", "wb") as payload:
        first = 0
        while first < num_terms:
            # Terms [first, last) hold about merge_postings postings (at least one term).
            start_postings = int(ends[first - 1]) if first else 0
            last = int(np.searchsorted(ends, start_postings + merge_postings, side="right"))
            last = min(max(last, first + 1), num_terms)
            parts: dict[str, list[np.ndarray]] = {"terms": [], "rows": [], "tfs": []}
            for run in runs:
                lo, hi = run.term_range(first, last)
                for name in parts:
                    parts[name].append(run.read(name, lo, hi))
            order = np.argsort(np.concatenate(parts["terms"]), kind="stable")  # within a term, rows stay in order
            rows = np.concatenate(parts["rows"])[order]
            tfs = np.concatenate(parts["tfs"])[order]
            del parts, order
            weights = tfs / (tfs + norms[rows])  # max per term: the upper bound MaxScore needs
            counts = df[first:last]
            nonempty = counts > 0
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            if nonempty.any():
                term_max[first:last][nonempty] = np.maximum.reduceat(weights, starts[nonempty]) \
                    * idf[first:last][nonempty]
            words = np.zeros(len(rows) * 2 // 1 + 4 * (int(term_block[last] - term_block[first])) + 16,
                             dtype=np.uint32)
            used = encode(rows.astype(np.int64), tfs.astype(np.int64), counts.astype(np.int64),
                          int(term_block[first]), block_base, block_off, block_bits, words, words_written)
            payload.write(words[:used].tobytes())
            words_written += used
            first = last
        block_off[-1] = words_written
        payload.write(np.zeros(2, dtype=np.uint32).tobytes())  # spare words: the decoder reads one word ahead
    arrays = {"doc_len": doc_len, "term_df": df.astype(np.uint32), "term_block": term_block, "term_max": term_max,
              "block_base": block_base, "block_off": block_off, "block_bits": block_bits}
    for name, values in arrays.items():
        np.save(out_dir / f"{name}.npy", values)


def read_terms(index_dir: Path) -> dict[str, int]:
    """The vocabulary: term -> id (line number of ``terms.txt``)."""
    with open(Path(index_dir) / TERMS_FILE, encoding="utf-8") as handle:
        terms = handle.read().split("\n")
    if terms and terms[-1] == "":
        terms.pop()
    return {term: i for i, term in enumerate(terms)}


class Bm25Retriever:
    """A BM25 index directory, memory-mapped, answering batches of queries.

    Thread-safe: ``search`` holds a lock, because the query analyzer caches words in a plain dict, the kernel's
    scratch buffers are shared and numba's thread count is set per call. One batch already uses ``n_threads``
    cores, so serialising batches costs nothing. Memory besides the mapped files: 9 bytes per passage per thread of
    scratch space (only pages that queries reach become resident), 4 per passage for the length norms, and the
    vocabulary dict.
    """

    kind = "bm25"

    def __init__(self, index_dir: str | Path, docstore: DocStore, options: Bm25Options, n_threads: int = -1,
                 mmap: bool = True):
        index_dir = Path(index_dir)
        self.docstore = docstore
        self.options = options
        self.n_threads = resolve_threads(n_threads)
        mode = "r" if mmap else None
        arrays = {name: np.load(index_dir / f"{name}.npy", mmap_mode=mode) for name in ARRAYS if name != "payload"}
        arrays["payload"] = np.memmap(index_dir / "payload.bin", dtype=np.uint32, mode="r") \
            if (index_dir / "payload.bin").stat().st_size else np.zeros(1, dtype=np.uint32)
        if not mmap:
            arrays["payload"] = np.array(arrays["payload"])
        self._arrays = arrays
        self._num_docs = len(arrays["doc_len"])
        self._norms = _norms(np.asarray(arrays["doc_len"]), options)
        self._idf = _idf(np.asarray(arrays["term_df"], dtype=np.float64), self._num_docs)
        self._vocab = read_terms(index_dir)
        self._analyzer = Analyzer(options, self._vocab, grow=False)
        self._lock = threading.Lock()
        if self._num_docs != len(docstore):
            raise ValueError(f"{index_dir}: BM25 index has {self._num_docs} passages but the docstore has "
                             f"{len(docstore)}")
        slices = self.n_threads
        self._acc = np.zeros((slices, self._num_docs), dtype=np.float32)
        self._seen = np.zeros((slices, self._num_docs), dtype=np.uint8)
        self._touched = np.empty((slices, self._num_docs + 1), dtype=np.int32)
        self._warm_up()

    def __len__(self) -> int:
        return self._num_docs

    def _query_ids(self, queries: list[str]) -> list[list[int]]:
        """Query term ids; unknown words and stop words are dropped."""
        return [self._analyzer.term_ids(query) for query in queries]

    def search_rows(self, queries: list[str], topk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, scores)`` per query, best first; equal scores in row order.

        Passages scoring 0 share no term with the query and are left out, so a query made only of stop words or
        unknown words gets no hits rather than ``topk`` arbitrary ones.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
        out = [empty] * len(queries)
        if not queries:
            return out
        k = min(topk, len(self))
        with self._lock:
            query_ids = self._query_ids(list(queries))
            todo = [i for i, ids in enumerate(query_ids) if ids]
            if not todo:
                return out
            rows, scores, counts = self._run_kernel([query_ids[i] for i in todo], k)
        for j, (i, n) in enumerate(zip(todo, counts.tolist())):
            out[i] = (rows[j, :n], scores[j, :n])
        return out

    def _run_kernel(self, query_ids: list[list[int]], k: int,
                    kernel: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel (:func:`~masksearch_rl.retrieval.bm25_kernels.topk_batch`) on a batch; ``(rows, scores,
        counts)`` with hits ``[i, :counts[i]]``.

        ``kernel`` is "auto" (serial for one query, else parallel over ``n_threads`` slices), "serial" or
        "parallel". Callers hold the lock (the scratch buffers are shared).
        """
        import numba

        a = self._arrays
        lengths = np.fromiter(map(len, query_ids), dtype=np.int64, count=len(query_ids))
        query_ptr = np.zeros(len(query_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=query_ptr[1:])
        flat = np.fromiter((t for ids in query_ids for t in ids), dtype=np.int64, count=int(query_ptr[-1]))
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= len(self._idf)):  # the kernel does not check
            raise ValueError(f"query term id outside the index vocabulary (0..{len(self._idf) - 1})")
        rows = np.empty((len(query_ids), k), dtype=np.int64)
        scores = np.empty((len(query_ids), k), dtype=np.float32)
        counts = np.zeros(len(query_ids), dtype=np.int64)
        if kernel == "auto":
            kernel = "serial" if len(query_ids) <= 1 or self.n_threads == 1 else "parallel"
        slices = 1 if kernel == "serial" else max(1, min(self.n_threads, len(query_ids)))
        parallel, serial = topk_kernels()
        args = (a["payload"], a["block_base"], a["block_off"], a["block_bits"], a["term_block"], a["term_df"],
                self._idf, a["term_max"], self._norms, flat, query_ptr, k, self._acc[:slices], self._seen[:slices],
                self._touched[:slices], rows, scores, counts)
        if kernel == "serial":
            serial(*args)
        else:
            with PARALLEL_LOCK:
                previous = numba.get_num_threads()  # per calling thread in numba
                numba.set_num_threads(slices)
                try:
                    parallel(*args)
                finally:
                    numba.set_num_threads(previous)
        return rows, scores, counts

    def _warm_up(self) -> None:
        """Compile both kernels for this index's array types (or load them from numba's cache) at load time."""
        started = time.perf_counter()
        with self._lock:
            for kernel in ("serial", "parallel"):
                self._run_kernel([], 1, kernel=kernel)
        logger.info("BM25 kernels ready in %.2fs", time.perf_counter() - started)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [to_hits(self.docstore, rows, scores) for rows, scores in self.search_rows(queries, topk)]


def to_hits(docstore: DocStore, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Turn index rows into :class:`Hit` objects by reading the passages from the docstore."""
    hits = []
    for row, score in zip(rows.tolist(), scores.tolist()):
        doc = docstore.get(row)
        hits.append(Hit(id=doc["id"], contents=doc["contents"], score=float(score)))
    return hits


def reference_scores(index_dir: Path, options: Bm25Options, query_ids: list[int]) -> np.ndarray:
    """BM25 score of every passage for one query, computed plainly from the postings (tests' oracle)."""
    index_dir = Path(index_dir)
    arrays = {name: np.load(index_dir / f"{name}.npy") for name in ARRAYS if name != "payload"}
    payload = np.fromfile(index_dir / "payload.bin", dtype=np.uint32)
    doc_len = arrays["doc_len"]
    norms = _norms(doc_len, options).astype(np.float64)
    idf = _idf(arrays["term_df"].astype(np.float64), len(doc_len)).astype(np.float64)
    scores = np.zeros(len(doc_len), dtype=np.float64)
    for term in query_ids:
        first, end = arrays["term_block"][term], arrays["term_block"][term + 1]
        df = int(arrays["term_df"][term])
        for block in range(first, end):
            n = min(BLOCK, df - (block - first) * BLOCK)
            rows, tfs = decode_block(block, n, payload, arrays["block_base"], arrays["block_off"], arrays["block_bits"])
            scores[rows] += idf[term] * tfs / (tfs + norms[rows])
    return scores
