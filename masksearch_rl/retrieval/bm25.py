"""BM25 over a passage collection, with bm25s (sparse precomputed scores, numba-compiled batched retrieval).

Why bm25s: it precomputes every (term, passage) BM25 weight into a CSC matrix at build time, so a query is a sum of
a few posting lists plus a top-k selection; its numba backend runs a whole batch of queries in one compiled,
multi-threaded call. The retrieval server sends batches, so batched retrieval is the path we optimise.

Memory: tokenising a big corpus into Python lists of ints costs ~8 bytes a token plus a list per passage; we keep
the token ids in one flat ``int32`` array instead (4 bytes a token) and hand bm25s a lazy view over it.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from masksearch_rl.retrieval.docstore import DocStore
from masksearch_rl.retrieval.types import Hit

logger = logging.getLogger(__name__)


@dataclass
class Bm25Options:
    """Build-time settings (stored in the manifest; changing them needs a rebuild)."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"  # bm25s scoring variant: robertson, lucene, atire, bm25l, bm25+
    stemmer: str = "english"  # PyStemmer language; "" disables stemming
    stopwords: str = "en"  # bm25s stopword list name; "" disables stopword removal

    def __post_init__(self) -> None:
        if self.k1 < 0:
            raise ValueError(f"bm25 option k1 must be >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"bm25 option b must be in [0, 1], got {self.b}")
        if self.method not in ("robertson", "lucene", "atire", "bm25l", "bm25+"):
            raise ValueError(f"bm25 option method must be robertson|lucene|atire|bm25l|bm25+, got {self.method!r}")


def _make_stemmer(language: str):
    if not language:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(language)


def _make_tokenizer(options: Bm25Options):
    import bm25s

    return bm25s.tokenization.Tokenizer(
        lower=True, stopwords=options.stopwords or None, stemmer=_make_stemmer(options.stemmer)
    )


class _FlatTokenIds(Sequence):
    """Token ids of every passage in one ``int32`` array + offsets; iterating yields one list at a time."""

    def __init__(self) -> None:
        self._ids = array("i")
        self._offsets = array("q", [0])

    def append(self, ids: list[int]) -> None:
        self._ids.extend(ids)
        self._offsets.append(len(self._ids))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        return self._ids[self._offsets[row] : self._offsets[row + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        ids, offsets = self._ids, self._offsets
        for row in range(len(offsets) - 1):
            yield ids[offsets[row] : offsets[row + 1]].tolist()

    @property
    def nbytes(self) -> int:
        return self._ids.itemsize * len(self._ids) + self._offsets.itemsize * len(self._offsets)


def build_bm25(texts: Iterable[str], out_dir: Path, options: Bm25Options, total: int | None = None,
               show_progress: bool = True) -> None:
    """Tokenise ``texts`` (streamed, in docstore row order) and save a bm25s index into ``out_dir``."""
    import bm25s
    from bm25s.tokenization import Tokenized
    from tqdm.auto import tqdm

    tokenizer = _make_tokenizer(options)
    token_ids = _FlatTokenIds()
    stream = tokenizer.streaming_tokenize(texts, update_vocab=True, allow_empty=True)
    for ids in tqdm(stream, total=total, desc="BM25 tokenise", unit="psg", disable=not show_progress):
        token_ids.append(ids)
    logger.info("tokenised %d passages: %.1f MB of token ids, %d terms", len(token_ids), token_ids.nbytes / 2**20,
                len(tokenizer.get_vocab_dict()))
    retriever = bm25s.BM25(k1=options.k1, b=options.b, method=options.method, backend=_backend())
    if retriever.backend == "numba" and hasattr(retriever, "activate_numba_csc"):
        # bm25s 0.3 does not switch this on by itself: a counting-sort CSC builder, linear time and without the
        # 16 bytes per (term, passage) entry that the numpy argsort builder allocates. Cached like the kernels.
        retriever.activate_numba_csc()
        _enable_cache(retriever._np_csc)
    retriever.index(Tokenized(ids=token_ids, vocab=tokenizer.get_vocab_dict()), show_progress=show_progress)
    retriever.save(out_dir)


def _backend() -> str:
    """numba when installed (compiled, parallel batched retrieval), else bm25s' numpy backend."""
    try:
        import numba  # noqa: F401
    except ImportError:
        logger.warning("numba is not installed: BM25 falls back to the (much slower) numpy backend")
        return "numpy"
    _cache_numba_kernels()
    return "numba"


_kernels_cached = False


def _cache_numba_kernels() -> None:
    """Turn on numba's on-disk cache for bm25s' retrieval kernels (bm25s compiles them without it).

    Why: compiling the parallel batched kernel takes 10-25 s on 2 cores, paid by every new process (server start,
    each test run). With the cache it is paid once per installation; numba re-validates the cache against the
    bm25s source files, so an upgrade recompiles.
    """
    global _kernels_cached
    if _kernels_cached:
        return
    from bm25s.numba import retrieve_utils

    for name in ("_retrieve_internal_jitted_parallel", "_retrieve_internal_jitted_serial"):  # bm25s 0.3 names
        if hasattr(retrieve_utils, name):
            _enable_cache(getattr(retrieve_utils, name))
    _kernels_cached = True


def _enable_cache(dispatcher) -> None:
    try:
        dispatcher.enable_caching()
    except (AttributeError, RuntimeError) as err:  # no writable cache location: compile per process instead
        logger.info("numba cache unavailable for %s: %s", getattr(dispatcher, "__name__", dispatcher), err)


def _resolve_threads(n_threads: int) -> int:
    """-1 means the cores this process may use (its CPU affinity, not the machine's count), within numba's pool."""
    import numba

    if n_threads == -1:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1 or -1 (all cores), got {n_threads}")
    return min(n_threads, numba.config.NUMBA_NUM_THREADS)


class Bm25Retriever:
    """Loads a saved bm25s index memory-mapped and answers batches of queries.

    Thread-safe: ``search`` holds a lock, because the query tokenizer caches stems in plain dicts and numba's
    thread count is set per call. One batch already uses ``n_threads`` cores, so serialising batches costs nothing.
    """

    kind = "bm25"

    def __init__(self, index_dir: str | Path, docstore: DocStore, options: Bm25Options, n_threads: int = -1,
                 mmap: bool = True):
        import bm25s

        self.docstore = docstore
        self.options = options
        self.backend = _backend()
        self.n_threads = _resolve_threads(n_threads) if self.backend == "numba" else 0
        self._bm25 = bm25s.BM25.load(index_dir, mmap=mmap, backend=self.backend)
        self._vocab: dict[str, int] = self._bm25.vocab_dict
        # Reused for every query: the stemmer and the word->stem cache are built once, not per batch.
        self._tokenizer = _make_tokenizer(options)
        # With a stemmer the index vocabulary maps stems to ids, without one words to ids; either way queries are
        # tokenised with update_vocab=False, which only adds to the tokenizer's own word caches.
        if options.stemmer:
            self._tokenizer.stem_to_sid = self._vocab
        else:
            self._tokenizer.word_to_id = self._vocab
        self._lock = threading.Lock()
        if len(self) != len(docstore):
            raise ValueError(f"{index_dir}: BM25 index has {len(self)} passages but the docstore has {len(docstore)}")

    def __len__(self) -> int:
        return int(self._bm25.scores["num_docs"])

    def _query_ids(self, queries: list[str]) -> list[list[int]]:
        """Query token ids in the index vocabulary; unknown words and stopwords are dropped, never added."""
        return list(self._tokenizer.streaming_tokenize(queries, update_vocab=False, allow_empty=False))

    def search_rows(self, queries: list[str], topk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, scores)`` per query, best first.

        Passages scoring 0 share no term with the query and are left out, so a query made only of stopwords or
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
            rows, scores = self._bm25.retrieve(
                [query_ids[i] for i in todo], k=k, sorted=True, show_progress=False, n_threads=self.n_threads
            )
        for i, row_list, score_list in zip(todo, rows, scores):
            keep = score_list > 0
            out[i] = (np.asarray(row_list[keep], dtype=np.int64), np.asarray(score_list[keep], dtype=np.float32))
        return out

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [to_hits(self.docstore, rows, scores) for rows, scores in self.search_rows(queries, topk)]


def to_hits(docstore: DocStore, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Turn index rows into :class:`Hit` objects by reading the passages from the docstore."""
    hits = []
    for row, score in zip(rows.tolist(), scores.tolist()):
        doc = docstore.get(row)
        hits.append(Hit(id=doc["id"], contents=doc["contents"], score=float(score)))
    return hits

