"""The synthetic world: determinism, unique names, verbatim annotations, resolvable multi-hop questions."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections import Counter

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from masksearch_rl.corpus.passage import split_contents
from masksearch_rl.synthetic import (
    build_world,
    generate_passages,
    generate_questions,
    iter_passages,
    render_entity,
    write_synthetic_corpus,
)
from masksearch_rl.synthetic import cli as synthetic_cli
from masksearch_rl.synthetic.render import MAX_WORDS, MIN_WORDS
from masksearch_rl.synthetic.world import CORE_WORD, GIVEN_NAMES, NAME_PATTERNS, NAME_SPACE, World

SPAN_TYPES = {"person", "place", "organisation", "work", "date", "year", "number", "term"}


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=7, num_passages=3000)


@pytest.fixture(scope="module")
def corpus(world) -> dict[str, dict]:
    return {p.id: p.to_json() for p in iter_passages(world)}


@pytest.fixture(scope="module")
def questions(world) -> list[dict]:
    return generate_questions(world, 400, seed=11)


def _dump(passages) -> list[str]:
    return [json.dumps(p.to_json(), ensure_ascii=False) for p in passages]


# --- determinism ---------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_output():
    assert _dump(generate_passages(500, seed=3)) == _dump(generate_passages(500, seed=3))
    w1, w2 = build_world(3, 500), build_world(3, 500)
    assert generate_questions(w1, 40, seed=1) == generate_questions(w2, 40, seed=1)


def test_output_does_not_depend_on_python_hash_randomisation():
    """Same seed, separate processes with different PYTHONHASHSEED: byte-identical (no set order leaks out)."""
    code = (
        "import json; from masksearch_rl.synthetic import build_world, iter_passages, generate_questions as g; "
        "w = build_world(8, 300); lines = [json.dumps(p.to_json()) for p in iter_passages(w)]; "
        "print(*lines, json.dumps(g(w, 40, 8)), sep=chr(10))"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                       capture_output=True, text=True, check=True, timeout=120).stdout
        for h in ("1", "2")
    ]
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == 301


def test_different_seeds_give_different_worlds():
    a, b = _dump(generate_passages(200, seed=0)), _dump(generate_passages(200, seed=1))
    assert not set(a) & set(b)
    titles_a = {build_world(0, 200).name(i) for i in range(160)}
    titles_b = {build_world(1, 200).name(i) for i in range(160)}
    assert len(titles_a & titles_b) < 5


def test_slices_of_the_stream_equal_the_full_stream(world):
    full = _dump(iter_passages(world))
    assert len(full) == world.num_passages
    # 1 starts inside the first (two-passage) entity; the cut points cross the notable/non-notable boundary.
    cuts = [0, 1, 7, 2 * world.num_notable - 1, 2 * world.num_notable + 3, world.num_passages]
    pieces = [_dump(iter_passages(world, lo, hi)) for lo, hi in zip(cuts, cuts[1:])]
    assert sum(pieces, []) == full


def test_questions_are_a_prefix_of_a_longer_run(world, questions):
    assert generate_questions(world, 60, seed=11) == questions[:60]
    assert generate_questions(world, 60, seed=12) != questions[:60]


# --- names ---------------------------------------------------------------------------------------------------
def test_names_are_unique_across_the_world():
    w = build_world(seed=5, num_passages=50_000)
    names = [w.name(i) for i in range(w.num_entities)]
    assert len(set(names)) == len(names)


def test_core_words_are_a_bijection_of_the_index():
    w = build_world(seed=9, num_passages=50)
    sample = list(range(0, NAME_SPACE, 97))  # spread over the whole space, incl. the top
    cores = [w.core(i) for i in sample]
    assert len(set(cores)) == len(cores)
    assert all(CORE_WORD.fullmatch(c) for c in cores)


def test_only_the_core_word_of_a_name_looks_like_a_core_word():
    """The uniqueness argument: fixed name words can never be mistaken for (and so collide with) a core."""
    fixed = {w for names in GIVEN_NAMES for w in names}
    fixed |= {w for patterns in NAME_PATTERNS.values() for p in patterns for w in p.split() if w != "{}"}
    assert not [w for w in fixed if CORE_WORD.fullmatch(w)]
    w = build_world(seed=2, num_passages=400)
    for i in range(w.num_entities):
        assert [tok for tok in w.name(i).split() if CORE_WORD.fullmatch(tok)] == [w.core(i)]


# --- passages ------------------------------------------------------------------------------------------------
def test_passage_ids_are_unique_and_sequential(corpus, world):
    assert list(corpus) == [str(i) for i in range(world.num_passages)]


def test_passage_format_and_word_counts(corpus):
    for record in corpus.values():
        title, text = split_contents(record["contents"])
        assert title == record["title"] and text
        assert MIN_WORDS <= len(text.split()) <= MAX_WORDS, (record["id"], len(text.split()))


def test_annotations_occur_verbatim_and_cover_the_title(corpus):
    for record in corpus.values():
        _, text = split_contents(record["contents"])
        spans = record["entities"]
        assert spans and all(span["text"] in text for span in spans), record["id"]
        assert {span["type"] for span in spans} <= SPAN_TYPES
        assert record["title"] in {span["text"] for span in spans}  # each passage names its entity
        assert len({span["text"] for span in spans}) == len(spans)


def test_annotations_are_in_order_of_appearance(corpus):
    for record in list(corpus.values())[:500]:
        _, text = split_contents(record["contents"])
        firsts = [text.find(span["text"]) for span in record["entities"]]
        # a span nested in an earlier one (e.g. a name inside a title) may be found earlier; allow only that
        for prev, (pos, span) in zip([-1, *firsts], zip(firsts, record["entities"])):
            assert pos >= prev or any(span["text"] in other["text"] for other in record["entities"]), record["id"]


def test_every_fact_is_stated_in_the_passage_that_claims_it(world):
    for index in range(0, world.num_entities, 7):
        entity = world.entity(index)
        rendered = render_entity(world, index)
        assert len(rendered.passages) == world.num_parts(index)
        assert set(rendered.fact_part) == set(entity.facts)
        for key, fact in entity.facts.items():
            passage = rendered.passages[rendered.fact_part[key]]
            assert fact.text in passage.text
            assert {"text": fact.text, "type": fact.type} in passage.entities


def test_relations_are_consistent_both_ways(world):
    for k in range(world.count("person")):
        person = world.nth("person", k)
        spouse = world.spouse(person)
        if spouse is not None:
            assert world.spouse(spouse) == person
            assert world.entity(spouse).facts["spouse"].target == person
    for k in range(world.count("country")):
        country = world.nth("country", k)
        capital = world.entity(country).facts["capital"].target
        assert world.entity(capital).facts["capital_of"].target == country


def test_dates_are_plausible(world):
    for k in range(0, world.count("person"), 3):
        facts = world.entity(world.nth("person", k)).facts
        born = int(facts["birth_date"].text.split()[-1])
        if "death_date" in facts:
            assert born < int(facts["death_date"].text.split()[-1]) <= 2023
    for kind in ("book", "film", "album"):
        for k in range(world.count(kind)):
            work = world.nth(kind, k)
            year = int(world.entity(work).facts["year"].text)
            assert year <= 2023
            if kind != "album":
                assert year > world.birth_year(world.creator(work))


# --- questions -----------------------------------------------------------------------------------------------
def test_every_question_chain_resolves(corpus, questions):
    assert len(questions) == 400
    for q in questions:
        k = q["hops"]
        assert len(q["chain"]) == len(q["supporting_ids"]) == len(q["oracle_queries"]) == len(q["relations"]) == k
        texts = [split_contents(corpus[pid]["contents"]) for pid in q["supporting_ids"]]
        assert [title for title, _ in texts] == q["chain"]  # hop j's passage is about chain[j]
        for j in range(k - 1):
            assert q["chain"][j + 1] in texts[j][1], (q["id"], j)  # a searcher can read the next name
        assert q["answer"] in texts[-1][1], q["id"]
        assert q["chain"][0] in q["question"]
        assert q["answer"] not in q["chain"]
        assert q["oracle_queries"] == q["chain"]


def test_hop_histogram_covers_one_to_four(questions):
    assert Counter(q["hops"] for q in questions) == {1: 100, 2: 100, 3: 100, 4: 100}
    assert len({q["question"] for q in questions}) == len(questions)
    assert len({q["id"] for q in questions}) == len(questions)


def test_only_requested_hops_are_generated(world):
    qs = generate_questions(world, 30, seed=0, hops=(3,))
    assert {q["hops"] for q in qs} == {3}
    with pytest.raises(ValueError):
        generate_questions(world, 3, seed=0, hops=())


def test_year_questions_answer_with_the_year_only(questions):
    years = [q for q in questions if q["answer_type"] == "year"]
    assert years and all(re.fullmatch(r"\d{4}", q["answer"]) for q in years)


# --- scale and layout ----------------------------------------------------------------------------------------
def test_huge_worlds_are_instant_and_random_access():
    w = build_world(seed=1, num_passages=5_000_000)
    last = w.num_entities - 1
    passages = render_entity(w, last).passages
    assert [p.id for p in passages] == w.passage_ids(last) == [str(w.num_passages - 1)]
    assert next(iter_passages(w, w.num_passages - 1)).id == str(w.num_passages - 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=40, max_value=10**7), st.data())
def test_passage_index_and_locate_are_inverse(num_passages, data):
    w = build_world(seed=0, num_passages=num_passages)
    p = data.draw(st.integers(min_value=0, max_value=num_passages - 1))
    index, part = w.locate(p)
    assert 0 <= index < w.num_entities and 0 <= part < w.num_parts(index)
    assert w.passage_index(index, part) == p


def test_world_pickles_for_worker_processes():
    w = build_world(seed=3, num_passages=500)
    clone = pickle.loads(pickle.dumps(w))
    assert _dump(iter_passages(clone, 100, 120)) == _dump(iter_passages(w, 100, 120))


def test_too_small_corpus_is_rejected():
    with pytest.raises(ValueError, match="at least 40"):
        build_world(seed=0, num_passages=10)


# --- writing and the CLI -------------------------------------------------------------------------------------
def test_write_synthetic_corpus_summary_matches_files(tmp_path):
    summary = write_synthetic_corpus(tmp_path, 240, 20, seed=4, progress=False)
    corpus_lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    question_lines = (tmp_path / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    assert summary["passages"] == len(corpus_lines) == 240
    assert summary["questions"] == len(question_lines) == 20
    assert sum(summary["entities_per_type"].values()) == summary["entities"]
    assert summary["questions_per_hops"] == {"1": 5, "2": 5, "3": 5, "4": 5}
    assert corpus_lines == _dump(generate_passages(240, seed=4))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cli_synth_writes_identical_files(tmp_path):
    app = typer.Typer()
    synthetic_cli.register(app)

    @app.callback()
    def _root() -> None:  # keeps `synth` a named sub-command, as in the real CLI
        pass

    runner = CliRunner()
    args = ["synth", "--passages", "120", "--questions", "8", "--seed", "5", "--out"]
    first = runner.invoke(app, [*args, str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "questions per hop count" in first.output and '"person"' in first.output
    assert runner.invoke(app, [*args, str(tmp_path / "b")]).exit_code == 0
    for name in ("corpus.jsonl", "questions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert runner.invoke(app, ["synth", "--passages", "10", "--out", str(tmp_path / "c")]).exit_code != 0


def test_a_world_without_flavour_states_the_same_facts_in_fewer_words():
    """flavour=False (the learning lab's short texts) drops only fact-free sentences: same passages, same ids and
    titles, every fact span still stated, questions still answered by their supporting passage."""
    from masksearch_rl.synthetic import generate_questions

    full, lean = build_world(seed=4, num_passages=300), build_world(seed=4, num_passages=300, flavour=False)
    for rich, short in zip(iter_passages(full), iter_passages(lean), strict=True):
        assert (short.id, short.title) == (rich.id, rich.title)
        assert len(short.text.split()) < len(rich.text.split())
        assert all(span["text"] in short.text for span in short.entities)
        assert {s["text"] for s in short.entities} <= {s["text"] for s in rich.entities}
    texts = {p.id: p.text for p in iter_passages(lean)}
    for question in generate_questions(lean, 40, seed=4, hops=(1, 2)):
        assert question["answer"] in texts[question["supporting_ids"][-1]]
    assert pickle.loads(pickle.dumps(lean)).flavour is False
