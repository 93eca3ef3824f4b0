"""Build and load index directories: one place that knows the on-disk layout.

Layout of an index directory::

    manifest.json       kind, options, num_passages, corpus, build time, library versions (written last)
    docs.zst            passages in index row order  } docstore (masksearch_rl.retrieval.docstore)
    doc_offsets.npy     where each row starts         }
    docs.dict           zstd dictionary               }
    bm25/               postings and vocabulary (masksearch_rl.retrieval.bm25; kind bm25 or hybrid)
    dense/faiss.index   faiss index (kind dense or hybrid)

Why a manifest: loading needs the build options (tokeniser, model, prefixes, index type) to query the index the
way it was built, and a reader can tell a finished index from a stray directory. Why atomic builds: an index build
can take hours; it happens in a temporary sibling directory that replaces ``out_dir`` in one rename, so a crash or
kill leaves the previous index (or nothing), never a half-written one that loads. The corpus is read once, as a
stream: each passage goes to the docstore and to the BM25 indexer as it is read.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from masksearch_rl.jsonl import BadLines, atomic_path
from masksearch_rl.retrieval import bm25, dense, hybrid
from masksearch_rl.retrieval.docstore import DocStore, DocStoreWriter
from masksearch_rl.retrieval.types import Retriever

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: own BM25 postings and a zstd docstore (1: bm25s files, docs.jsonl)
KINDS = ("bm25", "dense", "hybrid")
BM25_DIR = "bm25"
DENSE_DIR = "dense"

# Settings that only change how an existing index is queried, so load_index may override them.
LOAD_OVERRIDES = {
    "bm25": {"n_threads", "mmap"},
    "dense": {"nprobe", "ef_search", "device", "batch_size", "model"},
    "hybrid": {"rrf_k", "bm25_weight", "dense_weight", "fusion_depth"},
}


# Which option groups (and backend parts) each kind of index has.
PARTS = {"bm25": ("bm25",), "dense": ("dense",), "hybrid": ("bm25", "dense", "hybrid")}
_OPTION_CLASSES = {"bm25": bm25.Bm25Options, "dense": dense.DenseOptions, "hybrid": hybrid.HybridOptions}


def _split_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Route flat keyword options to the option dataclasses the kind uses; unknown keys are an error."""
    names = {part: {f.name for f in fields(_OPTION_CLASSES[part])} for part in PARTS[kind]}
    allowed = set().union(*names.values())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) for a {kind} index: {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    parts = {}
    for part in PARTS[kind]:
        values = {k: v for k, v in options.items() if k in names[part]}
        parts[part] = bm25.Bm25Options.with_preset(**values) if part == "bm25" else _OPTION_CLASSES[part](**values)
    return parts


def _read_passages(corpus_path: Path, bad: BadLines, show_progress: bool) -> Iterator[dict]:
    """Valid passages of a JSONL corpus in file order; bad lines are counted in ``bad`` and skipped.

    Lines are read as bytes and parsed with orjson (the corpus is read once per build; ``json.loads`` on decoded
    text was a tenth of a 1M-passage build). A line that is not UTF-8 is invalid JSON to orjson, and counted so.
    """
    from tqdm.auto import tqdm

    with open(corpus_path, "rb") as handle:
        lines = tqdm(enumerate(handle, start=1), desc="read corpus", unit="psg", disable=not show_progress)
        for lineno, line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                if line.strip():
                    bad.add(corpus_path, lineno, f"invalid JSON ({err})")
                continue
            if not isinstance(record, dict):
                bad.add(corpus_path, lineno, f"expected a JSON object, got {type(record).__name__}")
                continue
            missing = [key for key in ("id", "contents") if key not in record]
            if missing:
                bad.add(corpus_path, lineno, f"missing field(s) {', '.join(repr(k) for k in missing)}")
                continue
            passage_id, contents = record["id"], record["contents"]
            if isinstance(passage_id, bool) or not isinstance(passage_id, (str, int)) or passage_id == "":
                bad.add(corpus_path, lineno, "field 'id' must be a non-empty string or an integer")
            elif not isinstance(contents, str):
                bad.add(corpus_path, lineno, f"field 'contents' must be a string, got {type(contents).__name__}")
            else:
                yield {"id": str(passage_id), "contents": contents}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("masksearch-rl", "bm25s", "PyStemmer", "numba", "faiss-cpu", "sentence-transformers", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def build_index(corpus_path: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "bm25", *,
                show_progress: bool = True, workers: int | None = None, **options: Any) -> Path:
    """Build a ``kind`` index of a passages JSONL (``{"id", "contents"}`` lines) into ``out_dir``, atomically.

    ``options`` are the fields of :class:`~masksearch_rl.retrieval.bm25.Bm25Options`,
    :class:`~masksearch_rl.retrieval.dense.DenseOptions` and (hybrid)
    :class:`~masksearch_rl.retrieval.hybrid.HybridOptions`, as flat keywords (``k1=1.2, index_type="hnsw"``).
    An existing index at ``out_dir`` is replaced only once the new one is complete. ``workers``: BM25
    tokenising processes (default: one per core, at most 4).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    corpus_path = Path(corpus_path)
    if not corpus_path.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus_path}")
    parts = _split_options(kind, options)  # validate before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file() and (out_dir.is_file() or any(out_dir.iterdir())):
        # The swap replaces out_dir whole: never let a typo wipe a directory that is not an index.
        raise ValueError(f"{out_dir} exists and is not an index directory; refusing to replace it")
    started = time.perf_counter()
    bad = BadLines()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        store = DocStoreWriter(tmp)

        def texts() -> Iterator[str]:  # one pass over the corpus: each passage to the docstore and the indexer
            for passage in _read_passages(corpus_path, bad, show_progress and "bm25" not in parts):
                store.add(passage["id"], passage["contents"])
                yield passage["contents"]

        if "bm25" in parts:
            bm25.build_bm25(texts(), tmp / BM25_DIR, parts["bm25"], show_progress=show_progress, workers=workers)
        else:
            for _ in texts():
                pass
        count = store.close()
        if count == 0:
            raise ValueError(f"{corpus_path}: no valid passages ({bad.total} bad lines; first: {bad.examples[:3]})")
        if bad.total:
            logger.warning("%s: skipped %d bad lines %s", corpus_path, bad.total, dict(bad.counts))
        if "dense" in parts:
            docstore = DocStore(tmp)
            try:
                texts_again = (doc["contents"] for doc in docstore)
                dense.build_dense(texts_again, count, tmp / DENSE_DIR, parts["dense"], show_progress=show_progress)
            finally:
                docstore.close()
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "options": {name: asdict(value) for name, value in parts.items()},
            "num_passages": count,
            "corpus": {"path": str(corpus_path.resolve()), "bytes": corpus_path.stat().st_size,
                       "bad_lines": bad.summary()},
            "build_seconds": round(time.perf_counter() - started, 3),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("built %s index of %d passages in %.1fs at %s", kind, count, manifest["build_seconds"], out_dir)
    return out_dir


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index directory; a clear error if the directory is not a finished index."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index directory not found: {index_dir}")
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{index_dir} is not an index: no {MANIFEST_FILE} (build it with `masksearch-rl index build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: invalid manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: invalid manifest (expected a JSON object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; rebuild")
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"{path}: field 'kind' must be one of {', '.join(KINDS)}, got {manifest.get('kind')!r}")
    if not isinstance(manifest.get("num_passages"), int) or not isinstance(manifest.get("options"), dict):
        raise ValueError(f"{path}: invalid manifest (missing 'num_passages' or 'options')")
    return manifest


def load_index(index_dir: str | os.PathLike, **overrides: Any) -> Retriever:
    """Open an index directory for search; ``overrides`` change query-time settings (see ``LOAD_OVERRIDES``).

    The returned retriever's ``search`` is thread-safe and takes whole batches of queries.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    kind = manifest["kind"]
    allowed = set().union(*(LOAD_OVERRIDES[part] for part in PARTS[kind]))
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"cannot override {', '.join(unknown)} when loading a {kind} index "
                         f"(allowed: {', '.join(sorted(allowed))})")
    stored = manifest["options"]
    try:
        docstore = DocStore(index_dir)
    except FileNotFoundError as err:
        raise ValueError(f"{index_dir}: docstore missing ({err.filename})") from err
    if len(docstore) != manifest["num_passages"]:
        expected = manifest["num_passages"]
        raise ValueError(f"{index_dir}: docstore has {len(docstore)} passages, manifest says {expected}")

    def pick(name: str) -> dict[str, Any]:
        return {k: v for k, v in overrides.items() if k in LOAD_OVERRIDES[name]}

    sparse = dense_retriever = None
    if kind in ("bm25", "hybrid"):
        load = pick("bm25")
        sparse = bm25.Bm25Retriever(index_dir / BM25_DIR, docstore, bm25.Bm25Options(**stored["bm25"]),
                                    n_threads=load.get("n_threads", -1), mmap=load.get("mmap", True))
    if kind in ("dense", "hybrid"):
        options = dense.DenseOptions(**{**stored["dense"], **pick("dense")})
        dense_retriever = dense.DenseRetriever(index_dir / DENSE_DIR, docstore, options)
    if kind == "bm25":
        return sparse
    if kind == "dense":
        return dense_retriever
    options = hybrid.HybridOptions(**{**stored["hybrid"], **pick("hybrid")})
    return hybrid.HybridRetriever(sparse, dense_retriever, docstore, options)
