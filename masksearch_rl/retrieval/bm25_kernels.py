"""The compiled parts of the BM25 index (:mod:`masksearch_rl.retrieval.bm25`): the block encoder the build runs, the
top-k search kernel, and numba's compilation, threads and cache around them.

Postings are stored in blocks of 128: the first row of the block, then the row gaps and the term frequencies
bit-packed at the width the block needs (:func:`encode_blocks`; :func:`decode_block` reads one back plainly, the
tests' oracle). :func:`topk_batch` is the search: it touches only the passages in the query's posting lists, rarest
term first; once the k-th best partial score beats all that the remaining terms can add (MaxScore), their long,
low-weight lists are only looked up for the candidates left.

The functions here are plain Python until :func:`encoder` / :func:`topk_kernels` compile them (numba, imported on
first use: importing it costs about a second, which every import of the retrieval package would otherwise pay).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

logger = logging.getLogger(__name__)


def encode_blocks(rows, tfs, counts, first_block, block_base, block_off, block_bits, words,
                   offset):  # pragma: no cover - runs compiled (see encoder)
    """Write the postings of consecutive terms (``counts[i]`` each, rows ascending) as blocks into ``words``.

    Block layout (32-bit words, from ``block_off[b]``): the row gaps (first one 0: the block's first row is
    ``block_base[b]``) at ``block_bits[b, 0]`` bits each, then ``tf - 1`` at ``block_bits[b, 1]`` bits each.
    Returns the number of words written.
    """
    pos = 0
    block = first_block
    used = 0
    for term in range(counts.shape[0]):
        end = pos + counts[term]
        while pos < end:
            n = min(128, end - pos)
            gap_max = 0
            tf_max = 0
            for i in range(1, n):
                gap_max = max(gap_max, rows[pos + i] - rows[pos + i - 1])
            for i in range(n):
                tf_max = max(tf_max, tfs[pos + i] - 1)
            gap_bits = 0
            while (1 << gap_bits) <= gap_max:
                gap_bits += 1
            tf_bits = 0
            while (1 << tf_bits) <= tf_max:
                tf_bits += 1
            block_base[block] = rows[pos]
            block_off[block] = offset + used
            block_bits[block, 0] = gap_bits
            block_bits[block, 1] = tf_bits
            for field in range(2):
                width = gap_bits if field == 0 else tf_bits
                bit = 0
                for i in range(n):
                    if field == 0:
                        value = 0 if i == 0 else rows[pos + i] - rows[pos + i - 1]
                    else:
                        value = tfs[pos + i] - 1
                    if width > 0:
                        word = used + (bit >> 5)
                        shift = bit & 31
                        words[word] |= np.uint32((value << shift) & 0xFFFFFFFF)
                        if shift + width > 32:
                            words[word + 1] |= np.uint32(value >> (32 - shift))
                    bit += width
                used += (bit + 31) >> 5
            pos += n
            block += 1
    return used


def decode_block(block, n, payload, block_base, block_off, block_bits) -> tuple[np.ndarray, np.ndarray]:
    """Rows and tfs of one block, plainly in numpy (tests' oracle; the kernel decodes inline)."""
    words = np.asarray(payload, dtype=np.uint64)
    out = []
    base = int(block_off[block])
    for width in (int(block_bits[block, 0]), int(block_bits[block, 1])):
        bits = np.arange(n, dtype=np.int64) * width
        low = words[base + (bits >> 5)]
        high = words[np.minimum(base + (bits >> 5) + 1, len(words) - 1)]
        values = (((high << np.uint64(32)) | low) >> (bits & 31).astype(np.uint64)) & np.uint64((1 << width) - 1)
        out.append(values.astype(np.int64))
        base += (n * width + 31) >> 5
    gaps, tfs = out
    return int(block_base[block]) + np.cumsum(gaps), tfs + 1


def topk_batch(payload, block_base, block_off, block_bits, term_block, term_df, idf, term_max, norms,
                     query_ids, query_ptr, k, acc, seen, touched, out_rows, out_scores,
                     out_counts):  # pragma: no cover - runs compiled (see topk_kernels)
    """Top-``k`` passages of each query in a batch, doing work in proportion to the query's posting lists.

    Query ``q`` is the term ids ``query_ids[query_ptr[q]:query_ptr[q + 1]]`` (a repeated term counts again). The
    batch is cut into ``acc.shape[0]`` interleaved slices, one per thread; slice ``s`` reuses row ``s`` of the
    scratch arrays, all zero between queries: ``acc`` (partial scores), ``seen`` (1 = passage reached) and
    ``touched`` (the passages reached, in order).

    Per query, term at a time, highest possible contribution first: every passage of a term's postings is added to
    (sparse accumulation). Once the k-th best partial score beats all that the remaining terms can add (MaxScore),
    no passage not reached yet can make the top k: the remaining, usually long and low-weight, posting lists are
    then only looked up for the candidates, and candidates that can no longer reach the k-th score are dropped after
    each term. Hits (score > 0) go best first into ``out_rows[q]`` / ``out_scores[q]``, their number into
    ``out_counts[q]``; equal scores rank by lower row.
    """

    def worse(score_a, row_a, score_b, row_b):
        return score_a < score_b or (score_a == score_b and row_a > row_b)

    def sift_down(heap_scores, heap_rows, score, row, size):
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
        """Keep the ``k`` best (score, row) pairs offered so far in a min-heap; returns its new size."""
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

    def decode(block, n, rows_out, tfs_out):
        """Rows and tfs of block ``block`` (``n`` postings) into ``rows_out[:n]`` / ``tfs_out[:n]``. Reads two words
        at a time (values are at most 32 bits wide); the payload ends with a spare word for the last read."""
        base = block_off[block]
        for field in range(2):
            width = np.int64(block_bits[block, field])
            mask = (np.int64(1) << width) - 1
            bit = np.int64(0)
            if field == 0:
                row = np.int64(block_base[block])
                for i in range(n):
                    word = base + (bit >> 5)
                    row += ((np.int64(payload[word]) | (np.int64(payload[word + 1]) << 32)) >> (bit & 31)) & mask
                    rows_out[i] = row
                    bit += width
            else:
                for i in range(n):
                    word = base + (bit >> 5)
                    tfs_out[i] = (((np.int64(payload[word]) | (np.int64(payload[word + 1]) << 32)) >> (bit & 31))
                                  & mask) + 1
                    bit += width
            base += (n * width + 31) >> 5

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

    def kth_best(heap_scores, heap_rows, reached, count, scores):
        """The k-th best score among ``reached[:count]`` (call with count >= k)."""
        size = 0
        for i in range(count):
            doc = reached[i]
            score = scores[doc]
            if size < k or worse(heap_scores[0], heap_rows[0], score, doc):
                size = offer(heap_scores, heap_rows, size, score, doc)
        return heap_scores[0]

    n_queries = query_ptr.shape[0] - 1
    n_slices = acc.shape[0]
    for s in prange(n_slices):
        scores, flags, reached = acc[s], seen[s], touched[s]
        block_rows = np.empty(128, dtype=np.int64)
        block_tfs = np.empty(128, dtype=np.int64)
        for q in range(s, n_queries, n_slices):
            first, last = query_ptr[q], query_ptr[q + 1]
            heap_scores, heap_rows = out_scores[q], out_rows[q]
            margin = 1e-4 + 1e-6 * (last - first)  # float error allowance of the pruning tests (relative)

            # Distinct terms with their repeat counts, highest bound first.
            terms = np.empty(last - first, dtype=np.int64)
            repeats = np.empty(last - first, dtype=np.int64)
            bounds = np.empty(last - first, dtype=np.float64)
            n_terms = 0
            for t in range(first, last):
                term = query_ids[t]
                found = -1
                for u in range(n_terms):
                    if terms[u] == term:
                        found = u
                if found >= 0:
                    repeats[found] += 1
                else:
                    terms[n_terms] = term
                    repeats[n_terms] = 1
                    n_terms += 1
            for u in range(n_terms):
                bounds[u] = term_max[terms[u]] * repeats[u]
            order = np.argsort(-bounds[:n_terms], kind="mergesort")
            terms = terms[:n_terms][order]
            repeats = repeats[:n_terms][order]
            bounds = bounds[:n_terms][order]
            rest = np.zeros(n_terms + 1, dtype=np.float64)  # what terms u.. can still add at most
            for u in range(n_terms - 1, -1, -1):
                rest[u] = rest[u + 1] + bounds[u]

            n_reached = 0
            theta = 0.0
            best = np.float32(0.0)  # the best partial score so far (open mode)
            candidates_only = False
            sorted_candidates = False
            for u in range(n_terms):
                term, weight_idf = terms[u], idf[terms[u]] * repeats[u]
                first_block, end_block = term_block[term], term_block[term + 1]
                df = term_df[term]
                if not candidates_only and n_reached >= k and theta * (1 - margin) > rest[u] * (1 + margin):
                    candidates_only = True
                    kept = 0  # drop candidates that cannot reach theta any more
                    for i in range(n_reached):
                        doc = reached[i]
                        if (scores[doc] + rest[u]) * (1 + margin) >= theta * (1 - margin):
                            reached[kept] = doc
                            kept += 1
                        else:
                            scores[doc] = 0
                            flags[doc] = 0
                    n_reached = kept
                if not candidates_only:
                    for block in range(first_block, end_block):
                        n = min(128, df - (block - first_block) * 128)
                        decode(block, n, block_rows, block_tfs)
                        for i in range(n):
                            doc = block_rows[i]
                            tf = np.float32(block_tfs[i])
                            score = scores[doc] + np.float32(weight_idf * (tf / (tf + norms[doc])))
                            scores[doc] = score
                            best = max(best, score)
                            if flags[doc] == 0:
                                flags[doc] = 1
                                reached[n_reached] = doc
                                n_reached += 1
                elif n_reached > 0 and df <= 32 * n_reached:  # many candidates: walk the list, add to them only
                    for block in range(first_block, end_block):
                        n = min(128, df - (block - first_block) * 128)
                        decode(block, n, block_rows, block_tfs)
                        for i in range(n):
                            doc = block_rows[i]
                            if flags[doc] != 0:
                                tf = np.float32(block_tfs[i])
                                scores[doc] += np.float32(weight_idf * (tf / (tf + norms[doc])))
                elif n_reached > 0:  # few candidates: look each one up in the list
                    if not sorted_candidates:  # dropping candidates later keeps the row order
                        sort_reached(reached, n_reached, flags)
                        sorted_candidates = True
                    block = first_block
                    decoded = -1
                    n = 0
                    pos = 0
                    for i in range(n_reached):
                        doc = reached[i]
                        # Galloping over the blocks' first rows to the block that may hold ``doc``.
                        step = 1
                        while block + step < end_block and block_base[block + step] <= doc:
                            block += step
                            step *= 2
                        while block + 1 < end_block and block_base[block + 1] <= doc:
                            block += 1
                        if block_base[block] > doc:
                            continue
                        if block != decoded:
                            n = min(128, df - (block - first_block) * 128)
                            decode(block, n, block_rows, block_tfs)
                            decoded = block
                            pos = 0
                        while pos < n and block_rows[pos] < doc:
                            pos += 1
                        if pos < n and block_rows[pos] == doc:
                            tf = np.float32(block_tfs[pos])
                            scores[doc] += np.float32(weight_idf * (tf / (tf + norms[doc])))
                # The k-th best score is worth finding (a pass over every passage reached) only when the best
                # one already beats what the remaining terms can add: only then can pruning start.
                hopeful = candidates_only or best * (1 + margin) > rest[u + 1] * (1 - margin)
                if n_reached >= k and u + 1 < n_terms and hopeful:
                    theta = max(theta, kth_best(heap_scores, heap_rows, reached, n_reached, scores))
                    if candidates_only:
                        kept = 0
                        for i in range(n_reached):
                            doc = reached[i]
                            if (scores[doc] + rest[u + 1]) * (1 + margin) >= theta * (1 - margin):
                                reached[kept] = doc
                                kept += 1
                            else:
                                scores[doc] = 0
                                flags[doc] = 0
                        n_reached = kept

            size = 0  # selection; resets the scratch entries used
            for i in range(n_reached):
                doc = reached[i]
                score = scores[doc]
                scores[doc] = 0
                flags[doc] = 0
                if score > 0 and (size < k or worse(heap_scores[0], heap_rows[0], score, doc)):
                    size = offer(heap_scores, heap_rows, size, score, doc)
            out_counts[q] = size
            for end in range(size - 1, 0, -1):  # heap sort in place: best first
                last_score, last_row = heap_scores[end], heap_rows[end]
                heap_scores[end] = heap_scores[0]
                heap_rows[end] = heap_rows[0]
                sift_down(heap_scores, heap_rows, last_score, last_row, end)


# The kernel's loop over slices names ``prange``; numba reads module globals when it compiles, and topk_kernels
# binds this to numba.prange first. Importing numba here instead would add ~1 s to every import of this module.
prange = range
_compiled: dict[str, object] = {}
# numba's "workqueue" threading layer (used when neither TBB nor OpenMP is available) aborts the process if two
# threads run parallel code at once; retrievers of different indexes in one process share this lock.
PARALLEL_LOCK = threading.Lock()


def _jit(name: str, function, **flags):
    """``function`` compiled by numba (cached on disk: the cost is paid once per installation)."""
    if name not in _compiled:
        import numba

        try:
            _compiled[name] = numba.njit(cache=True, **flags)(function)
        except RuntimeError as err:  # no writable cache location: compile per process instead
            logger.info("numba cache unavailable for %s: %s", name, err)
            _compiled[name] = numba.njit(**flags)(function)
    return _compiled[name]


def encoder():
    return _jit("encode", encode_blocks)


def topk_kernels():
    """``(parallel, serial)`` compiled versions of :func:`topk_batch`, built on first use; both release the
    GIL. The serial one serves single-query calls, which gain nothing from numba's thread pool."""
    global prange
    if "parallel" not in _compiled:
        import numba

        prange = numba.prange
    return (_jit("parallel", topk_batch, parallel=True, nogil=True),
            _jit("serial", topk_batch, nogil=True))


def resolve_threads(n_threads: int) -> int:
    """-1 means the cores this process may use (its CPU affinity, not the machine's count), within numba's pool."""
    import numba

    if n_threads == -1:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1 or -1 (all cores), got {n_threads}")
    return min(n_threads, numba.config.NUMBA_NUM_THREADS)
