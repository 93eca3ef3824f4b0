"""BM25 over a passage collection, with bm25s (sparse precomputed scores, numba-compiled batched retrieval).

Why bm25s: it precomputes every (term, passage) BM25 weight into a CSC matrix at build time, so a query is a sum of
a few posting lists plus a top-k selection. We keep bm25s for tokenising, building and storing the index, but query it
with our own compiled kernel (:func:`_bm25_topk_batch`): bm25s scores every query into a dense array of all N
passages and scans all N for the top k, ~1.5-3 ms a query at N = 1M however short the query's posting lists are.
Our kernel touches only the passages in the query's posting lists, and skips most of the long low-weight lists
once they can no longer change the top k (MaxScore), so a query costs about what its rarer terms' postings cost;
its results are bm25s' own, bit for bit.

Memory: tokenising a big corpus into Python lists of ints costs ~8 bytes a token plus a list per passage; we keep
the token ids in one flat ``int32`` array instead (4 bytes a token) and hand bm25s a lazy view over it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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


def _bm25_topk_batch(data, indices, indptr, term_max, query_ids, query_ptr, k, acc, seen, touched, out_rows,
                       out_scores, out_counts):  # pragma: no cover - runs compiled (see _bm25_kernels)
    """Exact top-``k`` passages of each query in a batch, doing work in proportion to the query's posting lists.

    ``data/indices/indptr`` are bm25s' CSC score matrix (column = term, rows ascending within a column). Query ``q``
    is the term ids ``query_ids[query_ptr[q]:query_ptr[q + 1]]``; a repeated term counts again, as in bm25s.
    ``term_max[t]`` caches the largest weight of term ``t`` (NaN until first needed; +inf if it has a negative one).

    The batch is cut into ``acc.shape[0]`` interleaved slices, one per thread; slice ``s`` reuses row ``s`` of the
    scratch arrays, all zero between queries: ``acc`` (float32 partial scores), ``seen`` (0 = passage not reached,
    else how many query terms it matched so far, capped at 3) and ``touched`` (the passages reached, in order).

    Per query, term at a time, highest possible contribution first, into the scratch arrays (sparse):

    - Once the k-th best partial score beats all the remaining terms can add (MaxScore), no passage not reached yet
      can make the top k: the remaining, usually long and low-weight, posting lists are then only looked up for the
      candidates, and candidates that can no longer reach the k-th score are dropped after each term.
    - If the passages reached would pass an eighth of the collection first, bookkeeping costs more than it saves:
      the query is scored into the whole ``acc`` row (dense, bm25s' way) and all of it is scanned.

    Scores equal bm25s' bit for bit: dense scoring adds the weights in query order, as bm25s does; a sparse sum in
    another order can differ only for passages matching 3 or more query terms, which are re-added in query order
    if they come near the k-th score. Only scores > 0 are hits. Hits go best first into ``out_rows[q]`` /
    ``out_scores[q]``, their number into ``out_counts[q]``; equal scores rank by lower row.
    """

    def worse(score_a, row_a, score_b, row_b):
        return score_a < score_b or (score_a == score_b and row_a > row_b)

    def sift_down(heap_scores, heap_rows, score, row, size):
        """Put (score, row) at the root of a min-heap (worst first) of ``size`` entries and restore the order."""
        pos = 0
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and worse(heap_scores[child + 1], heap_rows[child + 1], heap_scores[child],
                                          heap_rows[child]):
                child += 1
            if not worse(heap_scores[child], heap_rows[child], score, row):
                break
            heap_scores[pos] = heap_scores[child]
            heap_rows[pos] = heap_rows[child]
            pos = child
        heap_scores[pos] = score
        heap_rows[pos] = row

    def offer(heap_scores, heap_rows, size, score, row):
        """Keep the ``k`` best (score, row) pairs offered so far; returns the heap's new size."""
        if size < k:
            pos = size
            while pos > 0:
                parent = (pos - 1) >> 1
                if not worse(score, row, heap_scores[parent], heap_rows[parent]):
                    break
                heap_scores[pos] = heap_scores[parent]
                heap_rows[pos] = heap_rows[parent]
                pos = parent
            heap_scores[pos] = score
            heap_rows[pos] = row
            return size + 1
        if worse(heap_scores[0], heap_rows[0], score, row):
            sift_down(heap_scores, heap_rows, score, row, size)
        return size

    def kth_best(heap_scores, heap_rows, reached, count, scores):
        """The k-th best score among ``reached[:count]`` (call with count >= k)."""
        size = 0
        for i in range(count):
            doc = reached[i]
            score = scores[doc]
            if size < k or worse(heap_scores[0], heap_rows[0], score, doc):  # most are rejected here, inline
                size = offer(heap_scores, heap_rows, size, score, doc)
        return heap_scores[0]

    def find(term, row, lo):
        """First position >= ``lo`` in the posting list of ``term`` whose row is >= ``row`` (galloping search)."""
        end = indptr[term + 1]
        hi = lo
        step = 1
        while hi < end and indices[hi] < row:
            lo = hi + 1
            hi += step
            step *= 2
        hi = min(hi, end)
        while lo < hi:
            mid = (lo + hi) >> 1
            if indices[mid] < row:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def upper_bound(term):
        bound = term_max[term]
        if np.isnan(bound):
            bound = np.float32(0.0)
            for j in range(indptr[term], indptr[term + 1]):
                if data[j] < 0:
                    bound = np.float32(np.inf)  # the pruning bounds assume weights >= 0: no pruning with this term
                    break
                bound = max(bound, data[j])
            term_max[term] = bound
        return bound

    def exact_score(first, last, row):
        """bm25s' float32 score of ``row``: the query's weights added in query order."""
        total = np.float32(0.0)
        for t in range(first, last):
            term = query_ids[t]
            pos = find(term, row, indptr[term])
            if pos < indptr[term + 1] and indices[pos] == row:
                total += data[pos]
        return total

    def keep_candidates(reached, count, scores, flags, headroom, theta, margin):
        """Drop (and reset) passages whose partial score plus ``headroom`` stays below ``theta``; keeps order."""
        kept = 0
        for i in range(count):
            doc = reached[i]
            if (scores[doc] + headroom) * (1 + margin) >= theta * (1 - margin):
                reached[kept] = doc
                kept += 1
            else:
                scores[doc] = 0
                flags[doc] = 0
        return kept

    def dense_top(scores, heap_scores, heap_rows):
        """Top k of a whole score row, scanned 64 at a time (a block with nothing above the k-th is skipped);
        zeroes the row. Rows ascend, so an equal score never displaces a kept one: ``>`` is the tie rule."""
        size = 0
        floor = np.float32(0.0)
        n_docs = scores.shape[0]
        for base in range(0, n_docs, 64):
            stop = min(base + 64, n_docs)
            hit = False
            for i in range(base, stop):  # branch-free, vectorised
                hit |= scores[i] > floor
            if not hit:
                continue
            for i in range(base, stop):
                if scores[i] > floor:
                    size = offer(heap_scores, heap_rows, size, scores[i], i)
                    if size == k:
                        floor = heap_scores[0]
        scores[:] = 0
        return size

    def sort_reached(reached, count, flags):
        """Put ``reached[:count]`` in row order: sorted if few, else read back from the flags in one scan."""
        if count <= flags.shape[0] // 256:
            reached[:count].sort()
            return
        count = 0
        for base in range(0, flags.shape[0], 64):
            stop = min(base + 64, flags.shape[0])
            hit = False
            for i in range(base, stop):  # branch-free, vectorised
                hit |= flags[i] != 0
            if hit:
                for i in range(base, stop):
                    if flags[i] != 0:
                        reached[count] = i
                        count += 1

    n_queries = query_ptr.shape[0] - 1
    n_slices = acc.shape[0]
    dense_from = acc.shape[1] // 256
    for s in prange(n_slices):
        scores, flags, reached = acc[s], seen[s], touched[s]
        for q in range(s, n_queries, n_slices):
            first, last = query_ptr[q], query_ptr[q + 1]
            heap_scores, heap_rows = out_scores[q], out_rows[q]
            # Float error allowance of the pruning tests (relative), so that rounding never drops a true hit.
            margin = 1e-4 + 1e-6 * (last - first)

            # Distinct terms, how often each occurs and its bound, highest bound first (stable sort).
            terms = np.empty(last - first, dtype=np.int64)
            repeats = np.empty(last - first, dtype=np.int64)
            bounds = np.empty(last - first, dtype=np.float64)
            n_terms = 0
            for t in range(first, last):
                found = -1
                for u in range(n_terms):
                    if terms[u] == query_ids[t]:
                        found = u
                        break
                if found >= 0:
                    repeats[found] += 1
                else:
                    terms[n_terms] = query_ids[t]
                    repeats[n_terms] = 1
                    n_terms += 1
            in_query_order = n_terms == last - first  # no repeats, and (checked below) no reordering
            for u in range(n_terms):
                bounds[u] = repeats[u] * upper_bound(terms[u])
            for u in range(1, n_terms):
                term, repeat, bound = terms[u], repeats[u], bounds[u]
                v = u
                while v > 0 and bounds[v - 1] < bound:
                    terms[v], repeats[v], bounds[v] = terms[v - 1], repeats[v - 1], bounds[v - 1]
                    v -= 1
                if v != u:
                    in_query_order = False
                terms[v], repeats[v], bounds[v] = term, repeat, bound
            # rest[u]: the most terms u.. can add to any passage; left[u]: their postings.
            rest = np.zeros(n_terms + 1, dtype=np.float64)
            left = np.zeros(n_terms + 1, dtype=np.int64)
            for u in range(n_terms - 1, -1, -1):
                rest[u] = rest[u + 1] + bounds[u]
                left[u] = left[u + 1] + indptr[terms[u] + 1] - indptr[terms[u]]

            can_prune = rest[0] < np.inf  # the bounds hold for weights >= 0 only

            # Union: every passage in the posting lists becomes a candidate.
            n_reached = 0
            u = 0
            theta = 0.0
            pruning = dense = False
            size = 0  # of the top-k heap
            while u < n_terms:
                term, repeat = terms[u], repeats[u]
                start, end = indptr[term], indptr[term + 1]
                too_many = n_reached + end - start > dense_from
                if can_prune and u > 0 and n_reached >= k and (too_many or 2 * left[u] > n_reached):  # worth a check
                    theta = kth_best(heap_scores, heap_rows, reached, n_reached, scores)
                    if theta * (1 - margin) > rest[u] * (1 + margin):
                        pruning = True
                        break
                weight = np.float32(repeat)
                if u == n_terms - 1:
                    # The last term: a passage it reaches first has its final score right away, so it goes
                    # straight to the heap, without bookkeeping; passages reached before just get the weight.
                    for j in range(start, end):
                        doc = indices[j]
                        matched = flags[doc]
                        if matched > 0:
                            scores[doc] += weight * data[j]
                            flags[doc] = min(matched + repeat, 3)
                        else:
                            score = data[j]
                            for _ in range(repeat - 1):  # as bm25s adds a repeated term: one at a time
                                score += data[j]
                            if score > 0 and (size < k or worse(heap_scores[0], heap_rows[0], score, doc)):
                                size = offer(heap_scores, heap_rows, size, score, doc)
                    u += 1
                    break
                if too_many:
                    dense = True
                    break
                for j in range(start, end):
                    doc = indices[j]
                    matched = flags[doc]
                    reached[n_reached] = doc  # branch-free append, kept (counted) only the first time
                    n_reached += matched == 0
                    flags[doc] = min(matched + repeat, 3)
                    scores[doc] += weight * data[j]
                u += 1

            if dense:
                for i in range(n_reached):
                    doc = reached[i]
                    scores[doc] = 0
                    flags[doc] = 0
                for t in range(first, last):  # bm25s' order: its float sums exactly
                    term = query_ids[t]
                    for j in range(indptr[term], indptr[term + 1]):
                        scores[indices[j]] += data[j]
                size = dense_top(scores, heap_scores, heap_rows)
            else:
                # Candidates: no new passages; the remaining terms only for passages that can still make it.
                if pruning:
                    n_reached = keep_candidates(reached, n_reached, scores, flags, rest[u], theta, margin)
                in_row_order = u == 1  # the union of a single posting list is in row order
                while u < n_terms:
                    term, repeat = terms[u], repeats[u]
                    weight = np.float32(repeat)
                    start, end = indptr[term], indptr[term + 1]
                    if end - start > 32 * n_reached:  # few candidates: look each one up
                        if not in_row_order:  # once: dropping candidates keeps the order
                            sort_reached(reached, n_reached, flags)
                            in_row_order = True
                        pos = start
                        for i in range(n_reached):
                            doc = reached[i]
                            pos = find(term, doc, pos)
                            if pos == end:
                                break
                            if indices[pos] == doc:
                                scores[doc] += weight * data[pos]
                                flags[doc] = min(flags[doc] + repeat, 3)
                    else:  # many: walk the list, adding (branch-free) to candidates only
                        for j in range(start, end):
                            doc = indices[j]
                            matched = flags[doc]
                            candidate = matched > 0
                            scores[doc] += weight * data[j] * candidate
                            flags[doc] = min(matched + repeat * candidate, 3)
                    u += 1
                    if u < n_terms and n_reached > k:
                        theta = max(theta, kth_best(heap_scores, heap_rows, reached, n_reached, scores))
                        n_reached = keep_candidates(reached, n_reached, scores, flags, rest[u], theta, margin)

                # Selection; resets the scratch entries used. Sums in another order than bm25s' can differ in the
                # last bits only for passages matching 3 or more query terms: those are set aside (at the front of
                # ``reached``, behind the read position) and redone in query order if they may make the top k.
                n_redo = 0
                for i in range(n_reached):
                    doc = reached[i]
                    score = scores[doc]
                    if not in_query_order and flags[doc] >= 3 and score > 0:
                        reached[n_redo] = doc
                        n_redo += 1
                        continue
                    scores[doc] = 0
                    flags[doc] = 0
                    if score > 0 and (size < k or worse(heap_scores[0], heap_rows[0], score, doc)):
                        size = offer(heap_scores, heap_rows, size, score, doc)
                if n_redo > 0:
                    bar = 0.0  # below it a passage cannot make the top k, whatever its last bits
                    if size == k:
                        bar = heap_scores[0]
                    if n_redo > k:
                        redo_scores = np.empty(k, dtype=np.float32)
                        redo_rows = np.empty(k, dtype=np.int64)
                        bar = max(bar, kth_best(redo_scores, redo_rows, reached, n_redo, scores))
                    bar *= 1 - margin
                    for i in range(n_redo):
                        doc = reached[i]
                        score = scores[doc]
                        scores[doc] = 0
                        flags[doc] = 0
                        if score >= bar:
                            score = exact_score(first, last, doc)
                            if size < k or worse(heap_scores[0], heap_rows[0], score, doc):
                                size = offer(heap_scores, heap_rows, size, score, doc)
            out_counts[q] = size
            # Heap sort in place: move the worst entry to the end, repeatedly, leaving the best first.
            for end in range(size - 1, 0, -1):
                last_score, last_row = heap_scores[end], heap_rows[end]
                heap_scores[end] = heap_scores[0]
                heap_rows[end] = heap_rows[0]
                sift_down(heap_scores, heap_rows, last_score, last_row, end)


# The kernel's loop over slices names ``prange``; numba reads module globals when it compiles, and _bm25_kernels
# binds this to numba.prange first. Importing numba here instead would add ~1 s to every import of this module.
prange = range
_kernels = None
# numba's "workqueue" threading layer (used when neither TBB nor OpenMP is available) aborts the process if two
# threads run parallel code at once; retrievers of different indexes in one process share this lock.
_parallel_lock = threading.Lock()


def _bm25_kernels():
    """``(parallel, serial)`` compiled versions of :func:`_bm25_topk_batch`, built on first use.

    Compiled lazily so that importing this module does not import numba. Both are cached on disk (compile cost is
    paid once per installation) and release the GIL. The serial one serves single-query calls, which gain nothing
    from numba's thread pool.
    """
    global _kernels, prange
    if _kernels is None:
        import numba

        prange = numba.prange

        try:
            parallel = numba.njit(parallel=True, nogil=True, cache=True)(_bm25_topk_batch)
            serial = numba.njit(nogil=True, cache=True)(_bm25_topk_batch)
        except RuntimeError as err:  # no writable cache location: compile per process instead
            logger.info("numba cache unavailable for the BM25 kernel: %s", err)
            parallel = numba.njit(parallel=True, nogil=True)(_bm25_topk_batch)
            serial = numba.njit(nogil=True)(_bm25_topk_batch)
        _kernels = (parallel, serial)
    return _kernels


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

    Thread-safe: ``search`` holds a lock, because the query tokenizer caches stems in plain dicts, the kernel's
    scratch buffers are shared and numba's thread count is set per call. One batch already uses ``n_threads`` cores,
    so serialising batches costs nothing.

    Search runs on our kernel (:func:`_bm25_topk_batch`) and returns exactly bm25s' results (same rows and
    float32 scores; equal scores in row order). Memory: besides the memory-mapped index, 9 bytes per passage per
    thread of scratch space (float32 scores, a count byte, an int32 "touched" list; only pages that queries reach
    become resident) and 4 bytes per vocabulary term.
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
        # bm25l and bm25+ give every passage a base score for each query term it lacks, so a query's hits are not
        # confined to its posting lists: those methods (and the numpy backend, without numba) keep bm25s' own search.
        self.own_kernel = self.backend == "numba" and self._bm25.nonoccurrence_array is None
        if self.own_kernel:
            slices, num_docs = self.n_threads, len(self)
            self._acc = np.zeros((slices, num_docs), dtype=np.float32)
            self._seen = np.zeros((slices, num_docs), dtype=np.uint8)
            self._touched = np.empty((slices, num_docs + 1), dtype=np.int32)  # +1: the kernel's branch-free append
            self._term_max = np.full(len(self._bm25.scores["indptr"]) - 1, np.nan, dtype=np.float32)
            self._warm_up()

    def __len__(self) -> int:
        return int(self._bm25.scores["num_docs"])

    def _query_ids(self, queries: list[str]) -> list[list[int]]:
        """Query token ids in the index vocabulary; unknown words and stopwords are dropped, never added."""
        return list(self._tokenizer.streaming_tokenize(queries, update_vocab=False, allow_empty=False))

    def search_rows(self, queries: list[str], topk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, scores)`` per query, best first; equal scores in row order.

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
            if self.own_kernel:
                found = self._search_kernel([query_ids[i] for i in todo], k)
            else:
                found = self._search_bm25s([query_ids[i] for i in todo], k)
        for i, hits in zip(todo, found):
            out[i] = hits
        return out

    def _search_kernel(self, query_ids: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Our kernel: cost follows the queries' posting lists, not the collection size."""
        rows, scores, counts = self._run_kernel(query_ids, k)
        return [(rows[i, :n], scores[i, :n]) for i, n in enumerate(counts.tolist())]

    def _search_bm25s(self, query_ids: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """bm25s' own retrieval (every passage scored): numpy backend, bm25l and bm25+."""
        rows, scores = self._bm25.retrieve(query_ids, k=k, sorted=True, show_progress=False,
                                           n_threads=self.n_threads)
        found = []
        for row_list, score_list in zip(rows, scores):
            keep = score_list > 0
            found.append((np.asarray(row_list[keep], dtype=np.int64), np.asarray(score_list[keep], dtype=np.float32)))
        return found

    def _run_kernel(self, query_ids: list[list[int]], k: int,
                    kernel: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run :func:`_bm25_topk_batch` on a batch; ``(rows, scores, counts)`` with hits ``[i, :counts[i]]``.

        ``kernel`` is "auto" (serial for one query, else parallel over ``n_threads`` slices), "serial" or
        "parallel". Callers hold the lock (the scratch buffers are shared).
        """
        import numba

        index = self._bm25.scores
        lengths = np.fromiter(map(len, query_ids), dtype=np.int64, count=len(query_ids))
        query_ptr = np.zeros(len(query_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=query_ptr[1:])
        flat = np.fromiter((t for ids in query_ids for t in ids), dtype=np.int32, count=int(query_ptr[-1]))
        num_terms = len(index["indptr"]) - 1
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= num_terms):  # the kernel does not bounds-check
            raise ValueError(f"query token id outside the index vocabulary (0..{num_terms - 1})")
        rows = np.empty((len(query_ids), k), dtype=np.int64)
        scores = np.empty((len(query_ids), k), dtype=np.float32)
        counts = np.zeros(len(query_ids), dtype=np.int64)
        if kernel == "auto":
            kernel = "serial" if len(query_ids) <= 1 or self.n_threads == 1 else "parallel"
        slices = 1 if kernel == "serial" else max(1, min(self.n_threads, len(query_ids)))
        parallel, serial = _bm25_kernels()
        args = (index["data"], index["indices"], index["indptr"], self._term_max, flat, query_ptr, k,
                self._acc[:slices], self._seen[:slices], self._touched[:slices], rows, scores, counts)
        if kernel == "serial":
            serial(*args)
        else:
            with _parallel_lock:
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

