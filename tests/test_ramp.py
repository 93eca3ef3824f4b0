"""RAMP generation: golden checks on real Wikipedia (KILT sample), masking properties, the LLM extractor against a
misbehaving local endpoint, kill-and-resume, worker-count independence, PPL masking with a tiny local model, and
the verl parquet export."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.prompts import MASK_TOKEN, RAMP_INSTRUCTION, TAG_AGENT_NAME, ramp_messages
from masksearch_rl.corpus.passage import Passage
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.llm import LLMConfig
from masksearch_rl.ramp.export import ExportConfig, export_parquet, split_ids
from masksearch_rl.ramp.extractors import (
    OfflineExtractor,
    Span,
    SpanParseError,
    detect_language,
    extraction_messages,
    parse_span_list,
)
from masksearch_rl.ramp.masking import (
    MaskingConfig,
    choose_k,
    find_all,
    mask_text,
    on_word_boundaries,
    restore_text,
    sample_spans,
    select_masks,
    span_weights,
    validate_candidates,
)
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
from masksearch_rl.ramp.sentences import crosses_sentence, may_cross, sentence_starts

REPO = Path(__file__).resolve().parents[1]
KILT = Path(os.environ["MASKSEARCH_SHARED_DATA"]) / "wiki" / "kilt_sample_100.jsonl"  # tests/conftest.py


# --------------------------------------------------------------------------------------------------------------
# Corpus fixtures


def _kilt_passages_local(path: Path) -> list[dict]:
    """A tiny KILT reader: one passage per body paragraph; headings and list items skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        page = json.loads(line)
        title = page["wikipedia_title"]
        for i, paragraph in enumerate(page["text"][1:], start=1):
            paragraph = paragraph.strip()
            if paragraph and not paragraph.startswith(("Section::::", "BULLET::::")):
                records.append(Passage(f"{title}#{i}", title, paragraph).to_json())
    return records


def _kilt_passages(path: Path) -> list[dict]:
    try:
        from masksearch_rl.corpus.readers import read_corpus
    except ImportError:
        return _kilt_passages_local(path)
    return [p.to_json() for p in read_corpus(path, "kilt")]


@pytest.fixture(scope="module")
def kilt_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kilt") / "passages.jsonl"
    records = _kilt_passages(KILT)
    assert len(records) > 1000
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def kilt_run(kilt_corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kilt_items") / "items.jsonl"
    summary = generate_ramp(RampConfig(corpus=str(kilt_corpus), out=str(out), seed=7, progress=False))
    return out, summary


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# --------------------------------------------------------------------------------------------------------------
# Golden: real Wikipedia through the offline extractor


def check_item(item: dict, instruction: str = RAMP_INSTRUCTION) -> None:
    """Every invariant DESIGN.md promises for a RAMP item."""
    passage, masked, masks = item["passage"], item["query"], item["masks"]
    assert item["num_masks"] == len(masks) == masked.count(MASK_TOKEN)
    assert 1 <= item["num_masks"] <= 4
    assert restore_text(masked, masks) == passage
    assert item["instruction"] == instruction
    assert not masked.startswith(MASK_TOKEN)
    starts = []
    for span in masks:
        assert find_all(passage, span) == [passage.index(span)], f"{span!r} must occur exactly once"
        start = passage.index(span)
        assert on_word_boundaries(passage, start, start + len(span))
        assert not crosses_sentence(passage, start, start + len(span)), f"{span!r} runs over a sentence end"
        starts.append(start)
    assert starts == sorted(starts), "masks are listed in order of appearance"
    for (s1, m1), (s2, _) in zip(zip(starts, masks), zip(starts[1:], masks[1:])):
        assert s1 + len(m1) <= s2, "masks never overlap"
    assert len(set(masks)) == len(masks), "drawn without replacement"
    assert set(masks) <= set(item["entities"])
    assert item["title"].casefold() not in {m.casefold() for m in masks}


@pytest.mark.shared_data
def test_kilt_items_satisfy_every_invariant(kilt_run, kilt_corpus):
    out, summary = kilt_run
    items = read_jsonl(out)
    dropped = read_jsonl(f"{out}.dropped.jsonl")
    passages = read_jsonl(kilt_corpus)
    assert len(items) > 0.7 * len(passages)
    for item in items:
        check_item(item)
        assert item["extractor"] == "offline" and item["source"] == "wiki" and item["seed"] == 7
    # Every passage is accounted for exactly once: an item or a recorded drop.
    ids = [i["id"] for i in items] + [d["id"] for d in dropped]
    assert sorted(ids) == sorted(p["id"] for p in passages)
    # The summary's counts match the files' content.
    histogram = Counter(str(i["num_masks"]) for i in items)
    assert summary["run"]["mask_histogram"] == dict(histogram) == summary["totals"]["mask_histogram"]
    assert summary["run"]["items"] == len(items) and summary["run"]["dropped"] == len(dropped)
    assert summary["run"]["drop_reasons"] == dict(Counter(d["reason"] for d in dropped))
    assert set(summary["run"]["drop_reasons"]) <= {"too_short", "no_valid_span", "contains_mask_token"}
    assert json.loads(Path(f"{out}.summary.json").read_text())["totals"]["items"] == len(items)


@pytest.mark.shared_data
def test_kilt_k_gives_every_curriculum_stage_data(kilt_run):
    """The default k (the paper's: uniform on 1..min(4, candidates)) leaves no stage of a 1 -> 4 curriculum short:
    each k holds >= 15% of the items (measured: ~33/24/23/20%; fewer 4s because some passages have < 4 spans)."""
    out, _ = kilt_run
    histogram = Counter(item["num_masks"] for item in read_jsonl(out))
    total = sum(histogram.values())
    assert set(histogram) == {1, 2, 3, 4}
    assert all(histogram[k] >= 0.15 * total for k in range(1, 5)), histogram


@pytest.mark.shared_data
def test_kilt_golden_spans():
    """Known spans of known paragraphs are proposed and survive validation."""
    pages = {json.loads(line)["wikipedia_title"]: json.loads(line) for line in KILT.read_text().splitlines()}
    title = next(t for t in pages if any("Anthropological Society" in p for p in pages[t]["text"]))
    paragraph = next(p for p in pages[title]["text"] if "Anthropological Society of Madrid" in p).strip()
    spans = OfflineExtractor().extract_sync(Passage("x", title, paragraph)).spans
    candidates, _ = validate_candidates(paragraph, spans, title)
    texts = {c.text for c in candidates}
    assert {"Anthropological Society of Madrid", "American Anthropological Association", "1865"} <= texts
    types = {s.text: s.type for s in spans}
    assert types["1865"] == "year" and types["American Anthropological Association"] == "name"


@pytest.mark.shared_data
def test_kilt_output_is_deterministic_and_seeded(kilt_corpus, kilt_run, tmp_path):
    out, _ = kilt_run
    again = tmp_path / "again.jsonl"
    generate_ramp(RampConfig(corpus=str(kilt_corpus), out=str(again), seed=7, progress=False, limit=300))
    first_300 = read_jsonl(out)[: _lines(again)]
    assert read_jsonl(again) == first_300
    other = tmp_path / "other_seed.jsonl"
    generate_ramp(RampConfig(corpus=str(kilt_corpus), out=str(other), seed=8, progress=False, limit=300))
    assert [i["masks"] for i in read_jsonl(other)] != [i["masks"] for i in first_300]


def test_offline_extractor_rules():
    text = (
        'In 1929, Charles E. Merriam met John F. Kennedy at the University of Chicago to discuss "The Great Gatsby". '
        "On 27 February 1980, 1,200 people (4.5%) left the A1234 plant; Lin Yixiong's wife said \"it felt odd.\""
    )
    spans = {s.text: s.type for s in OfflineExtractor().extract_sync(Passage("p", "T", text)).spans}
    assert spans["27 February 1980"] == "date"
    assert spans["The Great Gatsby"] == "title"
    assert spans["University of Chicago"] == spans["John F. Kennedy"] == spans["Lin Yixiong"] == "name"
    assert spans["1929"] == "year" and spans["1,200"] == "number" and spans["4.5%"] == "number"
    assert "In" not in spans and "On" not in spans  # sentence-initial function words are not names
    assert "it felt odd." not in spans  # quotations are not titles
    annotations = [{"text": "Tamsin Road", "type": "book"}]
    annotated = Passage("p", "T", "Kelovar wrote Tamsin Road in 1901.", entities=annotations)
    assert OfflineExtractor().extract_sync(annotated).spans[0] == Span("Tamsin Road", "book")


def test_language_detection_and_prompts():
    assert detect_language("Marie Curie was born in Warsaw.") == "en"
    zh = "居里夫人出生于华沙，是第一位获得诺贝尔奖的女性。"
    assert detect_language(zh) == "zh"
    assert "段落" in extraction_messages(zh)[1]["content"] and zh in extraction_messages(zh)[1]["content"]
    assert "Passage:" in extraction_messages("Paris is big.")[1]["content"]


# --------------------------------------------------------------------------------------------------------------
# Masking: unit and property tests

WORDS = ["Paris", "paris", "1867", "the", "of", "Curie", "Cur", "ie", "A", "a", "[", "]", "mask", "居里", "华沙", "12", "-"]


@st.composite
def passage_and_spans(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=40))
    seps = draw(st.lists(st.sampled_from([" ", "", ", ", "\n"]), min_size=len(words), max_size=len(words)))
    text = "".join(w + s for w, s in zip(words, seps))
    cuts = draw(st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, 12)), max_size=12))
    spans = [Span(text[i : i + n], "x") for i, n in cuts]
    spans += [Span(w, "w") for w in draw(st.lists(st.sampled_from(WORDS), max_size=4))]
    return text, spans


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=passage_and_spans(),
    seed=st.integers(0, 10**6),
    k_dist=st.sampled_from(["paper", "uniform", "max_available", "0,0,0,1", "1,1"]),
    weighting=st.sampled_from(["paper", "uniform"]),
    max_masks=st.integers(1, 4),
)
def test_masking_invariants_hold_for_random_passages(data, seed, k_dist, weighting, max_masks):
    text, spans = data
    config = MaskingConfig(k_dist=k_dist, weighting=weighting, max_masks=max_masks)
    candidates, rejects = validate_candidates(text, spans, title="Curie")
    assert len(candidates) + sum(rejects.values()) == len(spans)
    for cand in candidates:
        assert find_all(text, cand.text) == [cand.start] and text[cand.start : cand.end] == cand.text
        assert on_word_boundaries(text, cand.start, cand.end) and text[: cand.start].strip()
        assert cand.text.casefold() != "curie"
    chosen = select_masks(text, candidates, config, random.Random(seed))
    assert (len(chosen) >= 1) == bool(candidates) and len(chosen) <= max_masks
    assert [c.start for c in chosen] == sorted(c.start for c in chosen)
    assert all(a.end <= b.start for a, b in zip(chosen, chosen[1:]))
    if MASK_TOKEN not in text:
        masked = mask_text(text, chosen)
        masks = [c.text for c in chosen]
        assert masked.count(MASK_TOKEN) == len(masks)
        assert restore_text(masked, masks) == text


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 12),
    seed=st.integers(0, 10**6),
    k_dist=st.sampled_from(["paper", "uniform", "max_available", "0.4,0.3,0.2,0.1"]),
)
def test_choose_k_stays_in_range(n, seed, k_dist):
    k = choose_k(n, MaskingConfig(k_dist=k_dist), random.Random(seed))
    assert k == 0 if n == 0 else 1 <= k <= min(4, n)
    if k_dist == "max_available" and n != 2:
        assert k == min(4, n)  # "as many as available, up to 4" (the authors' code picks 1 or 2 for two)


@pytest.mark.parametrize("k_dist", ["paper", "uniform"])
def test_paper_k_is_uniform_over_the_feasible_k(k_dist):
    """The paper draws k at random, 0 < k < 5: uniform on 1..min(max_masks, candidates)."""
    rng = random.Random(0)
    for n, feasible in [(9, 4), (3, 3), (2, 2), (1, 1)]:
        counts = Counter(choose_k(n, MaskingConfig(k_dist=k_dist), rng) for _ in range(4000))
        assert set(counts) == set(range(1, feasible + 1))
        assert all(abs(c / 4000 - 1 / feasible) < 0.03 for c in counts.values()), (n, counts)
    assert set(Counter(choose_k(9, MaskingConfig(k_dist=k_dist, max_masks=2), rng) for _ in range(200))) == {1, 2}


def test_max_available_k_masks_as_many_as_there_are():
    """The rule in the authors' script, kept under its own name: 1 -> 1, 2 -> 1 or 2, 3 -> 3, 4+ -> 4."""
    rng = random.Random(0)
    config = MaskingConfig(k_dist="max_available")
    assert [choose_k(n, config, rng) for n in (0, 1, 3, 4, 12)] == [0, 1, 3, 4, 4]
    assert {choose_k(2, config, rng) for _ in range(100)} == {1, 2}
    assert choose_k(12, MaskingConfig(k_dist="max_available", max_masks=3), rng) == 3


def test_sampling_is_without_replacement_and_weighted():
    text = "x " + " ".join(f"w{i}" for i in range(6))
    candidates, _ = validate_candidates(text, [Span(f"w{i}", "x") for i in range(6)])
    for seed in range(200):
        chosen = sample_spans(candidates, [1.0] * 6, 4, random.Random(seed))
        assert len({c.text for c in chosen}) == 4
    # Heavier spans are drawn more often.
    weights = [1, 1, 1, 1, 1, 20]
    counts = Counter(c.text for seed in range(300) for c in sample_spans(candidates, weights, 1, random.Random(seed)))
    assert counts["w5"] > 200


def test_paper_weighting_favours_long_spans_and_numbers():
    text = "x Marie Curie met Bob in 1867 at the University of Paris"
    proposals = [Span(s, "x") for s in ["Marie Curie", "Bob", "1867", "University of Paris"]]
    candidates, _ = validate_candidates(text, proposals)
    weights = dict(zip([c.text for c in candidates], span_weights(candidates, "paper")))
    assert weights == {"Marie Curie": 2, "Bob": 1, "1867": 3, "University of Paris": 3}
    assert set(span_weights(candidates, "uniform")) == {1.0}


def test_validation_reasons():
    text = "Paris is in France. France is big. Some Americans like the 12 films."
    proposals = ["Paris", "France", "American", "Atlantis", "", "Americans", "12", "Paris", "films", "x" * 81]
    candidates, rejects = validate_candidates(text, [Span(s, "x") for s in proposals], title="Americans")
    assert [(c.text, c.start) for c in candidates] == [("12", text.index("12")), ("films", text.index("films"))]
    assert rejects == Counter(
        at_passage_start=1, repeated_in_passage=1, partial_word=1, not_in_passage=1, empty=1, is_title=1,
        duplicate=1, too_long=1,
    )


def test_chinese_spans_need_no_spaces_and_weigh_by_characters():
    text = "据记载，居里夫人出生于华沙，1867年来到巴黎大学。"
    candidates, rejects = validate_candidates(text, [Span(s, "x") for s in ["华沙", "1867", "巴黎大学"]])
    assert [c.text for c in candidates] == ["华沙", "1867", "巴黎大学"] and not rejects
    assert span_weights(candidates, "paper", "zh") == [2.0, 4.0, 4.0]


# --------------------------------------------------------------------------------------------------------------
# Spans stay inside one sentence


def _offline(text: str) -> set[str]:
    return {s.text for s in OfflineExtractor().extract_sync(Passage("p", "T", text)).spans}


def _accepted(text: str, span: str) -> tuple[bool, Counter]:
    candidates, rejects = validate_candidates(text, [Span(span, "llm")])
    return bool(candidates), rejects


def test_abbreviation_ending_a_sentence_is_no_bridge():
    text = "Smith was born in Washington, D.C. He was the son of a lawyer and moved to Ohio in 1901."
    assert "D.C. He" not in _offline(text) and "D.C." in _offline(text)
    assert _accepted(text, "D.C. He") == (False, Counter(crosses_sentence=1))  # from any extractor
    assert _accepted(text, "Washington, D.C.") == (True, Counter())
    text = "In 1944 Smith joined the U.S. Army and served in France until the war ended."
    assert "U.S. Army" in _offline(text) and _accepted(text, "U.S. Army")[0]
    text = "He fought in World War I. He then moved to Paris, where he died."
    assert "World War I" in _offline(text) and not any("He" in span for span in _offline(text))


def test_initials_decimals_and_quotes_keep_their_sentence():
    text = "In 1929, Charles E. Merriam said the city had 3.5 million people. It grew."
    assert "Charles E. Merriam" in _offline(text) and _accepted(text, "Charles E. Merriam")[0]
    assert "3.5" in _offline(text) and _accepted(text, "3.5 million")[0]
    assert sentence_starts(text) == (text.index("It grew"),)
    text = 'She said "it felt odd." Then Anna Smith left for Paris in 1921.'
    assert sentence_starts(text) == (text.index("Then"),)
    assert _accepted(text, 'odd." Then') == (False, Counter(crosses_sentence=1))
    assert _accepted(text, '" Then Anna')[0] is False  # starts just after the sentence's end
    assert _accepted(text, "it felt odd.")[0] and "Anna Smith" in _offline(text)
    # pysbd's list-item splits ("1) a 2) b") are no sentence ends; line breaks are.
    assert sentence_starts("See 1) foo 2) bar") == () and sentence_starts("Paris\nCurie") == (6,)


def test_chinese_passages_split_at_chinese_sentence_ends():
    text = "据记载，居里夫人出生于华沙。1867年她来到巴黎大学！她很有名。"
    assert sentence_starts(text) == (text.index("1867"), text.index("她很"))
    candidates, rejects = validate_candidates(text, [Span(s, "x") for s in ["华沙", "华沙。1867年", "巴黎大学"]])
    assert [c.text for c in candidates] == ["华沙", "巴黎大学"] and rejects == Counter(crosses_sentence=1)


SENTENCE_WORDS = ["Paris", "D.C.", "U.S.", "He", "The", "Army", "E.", "Merriam", "3.5", "million", "it", "was",
                  ".", "!", "?", '"', "'", "(", ")", "1)", "No.", "Dr.", "…", "居里", "华沙", "。", "！", "12"]


@st.composite
def sentences_and_spans(draw):
    words = draw(st.lists(st.sampled_from(SENTENCE_WORDS), min_size=1, max_size=30))
    seps = draw(st.lists(st.sampled_from([" ", "", "  ", "\n"]), min_size=len(words), max_size=len(words)))
    text = "".join(w + s for w, s in zip(words, seps))
    cuts = draw(st.lists(st.tuples(st.integers(0, len(text)), st.integers(1, 25)), max_size=12))
    return text, [Span(text[i : i + n], "x") for i, n in cuts]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=sentences_and_spans())
def test_no_accepted_span_crosses_a_sentence_boundary(data):
    text, spans = data
    starts = sentence_starts(text)
    candidates, _ = validate_candidates(text, spans)
    for cand in candidates:
        assert not any(cand.start < b < cand.end for b in starts), (cand, starts)
    # The cheap test that lets most passages go unsegmented never misses a crossing span.
    for span in spans:
        value = span.text.strip()
        start = text.find(value)
        if value and any(start < b < start + len(value) for b in starts):
            assert may_cross(value)
    # The offline extractor proposes no crossing span in the first place.
    for span in OfflineExtractor(use_annotations=False).extract_sync(Passage("p", "", text)).spans:
        [start, *others] = find_all(text, span.text)
        if not others:
            assert not any(start < b < start + len(span.text) for b in starts), (span, starts)


def test_bad_k_dist_and_weighting_fail_fast():
    with pytest.raises(ValueError, match="k_dist must be one of .*max_available"):
        MaskingConfig(k_dist="triangular")
    with pytest.raises(ValueError, match="weighting"):
        MaskingConfig(weighting="ppl")


# --------------------------------------------------------------------------------------------------------------
# LLM reply parsing


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.text(min_size=1, max_size=20).filter(str.strip), max_size=8),
    wrap=st.sampled_from(["plain", "fence", "prose"]),
)
def test_parse_span_list_round_trips(spans, wrap):
    body = json.dumps(spans, ensure_ascii=False)
    replies = {"plain": body, "fence": f"```json\n{body}\n```", "prose": f"Entities: {body} Hope it helps."}
    reply = replies[wrap]
    if wrap == "prose" and "]" in "".join(spans):
        return  # prose around a list whose strings contain "]" is ambiguous by construction
    assert parse_span_list(reply) == [s.strip() for s in spans]


@settings(max_examples=500, deadline=None)
@given(reply=st.text(max_size=200))
def test_parse_span_list_never_crashes(reply):
    try:
        result = parse_span_list(reply)
    except SpanParseError:
        return
    assert isinstance(result, list) and all(isinstance(s, str) and s for s in result)


def test_parse_span_list_cases():
    assert parse_span_list('["Paris", 1867, true, null, " Curie "]') == ["Paris", "1867", "Curie"]
    assert parse_span_list('{"entities": ["Paris"]}') == ["Paris"]
    assert parse_span_list("```\n[\"Paris\"]\n```") == ["Paris"]
    for garbage in ["", "Sorry, I can't help with that.", "[Paris, France]", '{"a": 1}', "__import__('os')"]:
        with pytest.raises(SpanParseError):
            parse_span_list(garbage)


# --------------------------------------------------------------------------------------------------------------
# The LLM extractor against a local OpenAI-compatible endpoint that misbehaves


class FakeExtractorServer:
    """Replies by the passage's marker word: GARBAGE (prose), FENCED (```json), SLOW (sleeps past the client's
    timeout), RATE (always 429); otherwise a JSON list of the passage's capitalised words plus one hallucination.
    Once ``healthy``, every passage gets the JSON list."""

    def __init__(self) -> None:
        self.calls = Counter()
        self.healthy = False  # when True, SLOW and RATE behave
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            prompt = (await request.json())["messages"][-1]["content"]
            passage = prompt.rsplit("Passage:\n", 1)[-1]
            marker = next((m for m in ("GARBAGE", "FENCED", "SLOW", "RATE") if m in passage), "OK")
            self.calls[marker] += 1
            if self.healthy and marker == "GARBAGE":
                marker = "OK"
            if marker == "RATE" and not self.healthy:
                error = {"error": {"message": "rate limited"}}
                return JSONResponse(error, status_code=429, headers={"retry-after-ms": "10"})
            if marker == "SLOW" and not self.healthy:
                await asyncio.sleep(2)
            names = sorted(set(re.findall(r"\b[A-Z][a-z]+\b", passage)) - {"The", "In"})
            body = json.dumps(names + ["Atlantis"])
            replies = {"GARBAGE": "I am sorry, I cannot list entities.", "FENCED": f"```json\n{body}\n```"}
            content = replies.get(marker, body)
            return {
                "id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
            }

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> FakeExtractorServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_llm_extractor_counts_rejects_and_errors_without_crashing(tmp_path):
    kinds = ["OK", "GARBAGE", "FENCED", "SLOW", "RATE"]
    records = []
    for i in range(20):
        kind = kinds[i % len(kinds)]
        text = (
            f"In {1900 + i}, the {kind} explorer Kelovar{chr(97 + i)} reached Tamsin and met Orlena at Varnhold, "
            f"where Brisco founded a school of navigation."
        )
        records.append({"id": f"p{i:02d}", "contents": f'"Doc {i}"\n{text}', "title": f"Doc {i}"})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "items.jsonl"
    with FakeExtractorServer() as server:
        llm = LLMConfig(
            base_url=f"http://127.0.0.1:{server.port}/v1", model="fake", timeout_s=0.5, max_retries=1,
            concurrency=4, cache_dir=str(tmp_path / "cache"),
        )
        config = RampConfig(corpus=str(corpus), out=str(out), extractor="llm", llm=llm, progress=False, seed=1)
        summary = generate_ramp(config)
        run = summary["run"]
        assert run["parse_rejects"] == 4  # the GARBAGE passages: left for a re-run, not dropped for good
        assert run["llm_errors"] == 8  # SLOW (timeouts) and RATE (429 after a retry): left for a re-run
        assert run["items"] == 8  # OK and FENCED
        assert run["candidate_rejects"]["not_in_passage"] == 8  # the hallucinated "Atlantis"
        assert server.calls["RATE"] == 8  # 4 passages x (1 call + 1 retry): bounded
        items = read_jsonl(out)
        for item in items:
            check_item(item)
            assert item["extractor"] == "llm" and "Atlantis" not in item["entities"]
        assert read_jsonl(f"{out}.dropped.jsonl") == []
        assert summary["llm"]["stats"]["http_429"] == 8

        # The endpoint recovers: a re-run finishes exactly the failed passages (the prose replies were not cached,
        # so they are asked again); nothing else is called again.
        server.healthy = True
        calls_before = sum(server.calls.values())
        summary = generate_ramp(config)
        assert summary["run"]["skipped_done"] == 8 and summary["run"]["items"] == 12
        assert sum(server.calls.values()) - calls_before == 12 and summary["run"]["parse_rejects"] == 0
        assert summary["totals"]["items"] == 20 and summary["totals"]["dropped"] == 0
    assert sorted(i["id"] for i in read_jsonl(out)) == [r["id"] for r in records]


def test_llm_run_stops_when_the_endpoint_is_down(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 40)
    llm = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, concurrency=2)
    out = tmp_path / "items.jsonl"
    config = RampConfig(corpus=str(corpus), out=str(out), extractor="llm", llm=llm, max_llm_errors=5, progress=False)
    run = generate_ramp(config)["run"]
    assert run["stopped"] and "re-run" in run["stopped"]
    assert 5 <= run["llm_errors"] < 40 and run["items"] == 0
    assert _lines(out) == 0  # failed passages are not recorded as done (only the one too short to send is)
    assert {d["reason"] for d in read_jsonl(f"{out}.dropped.jsonl")} <= {"too_short"}


# --------------------------------------------------------------------------------------------------------------
# Resumability and parallelism


def _synthetic_corpus(path: Path, n: int) -> None:
    rng = random.Random(0)
    names = ["Kelovar", "Tamsin", "Orlena", "Varnhold", "Brisco", "Delmar", "Quenton", "Ysolde"]
    with open(path, "w") as handle:
        for i in range(n):
            a, b, c = rng.sample(names, 3)
            text = (
                f"The city of {a}{i} was founded in {rng.randint(1000, 2020)} by {b} {c}, who later moved to "
                f"Port {c}{i}. Its population was {rng.randint(100, 99999):,} in {rng.randint(1900, 2020)}."
            )
            if i % 17 == 0:
                text = "Too short."
            handle.write(json.dumps({"id": f"s{i:05d}", "title": f"{a}{i}", "contents": f'"{a}{i}"\n{text}'}) + "\n")


_SLOW_RUN = """
import sys, time
import masksearch_rl.ramp.pipeline as pipeline
original = pipeline.prepare_offline
def slow(*args, **kwargs):
    time.sleep(0.002)
    return original(*args, **kwargs)
pipeline.prepare_offline = slow
pipeline.generate_ramp(pipeline.RampConfig(corpus=sys.argv[1], out=sys.argv[2], seed=3, progress=False))
"""


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 1500)
    reference = tmp_path / "reference.jsonl"
    generate_ramp(RampConfig(corpus=str(corpus), out=str(reference), seed=3, progress=False))

    out = tmp_path / "items.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(corpus), str(out)], cwd=REPO)
    deadline = time.monotonic() + 60
    while (not out.exists() or _lines(out) < 300) and time.monotonic() < deadline:
        assert child.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = _lines(out)
    assert 300 <= written < 1500, "killed mid-run"

    summary = generate_ramp(RampConfig(corpus=str(corpus), out=str(out), seed=3, progress=False))
    assert summary["run"]["skipped_done"] >= written
    for suffix in ("", ".dropped.jsonl"):
        resumed = read_jsonl(f"{out}{suffix}")
        expected = read_jsonl(f"{reference}{suffix}")
        assert len({r["id"] for r in resumed}) == len(resumed), "no duplicates"
        assert sorted(resumed, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"]), "same content"
    assert summary["totals"]["items"] + summary["totals"]["dropped"] == 1500

    # A third run has nothing left to do.
    again = generate_ramp(RampConfig(corpus=str(corpus), out=str(out), seed=3, progress=False))
    assert again["run"]["items"] == again["run"]["dropped"] == 0 and again["run"]["skipped_done"] == 1500


def test_output_does_not_depend_on_worker_count(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 600)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    generate_ramp(RampConfig(corpus=str(corpus), out=str(one), seed=5, progress=False, workers=1))
    generate_ramp(RampConfig(corpus=str(corpus), out=str(two), seed=5, progress=False, workers=2, chunk_size=32))
    assert one.read_bytes() == two.read_bytes()
    assert Path(f"{one}.dropped.jsonl").read_bytes() == Path(f"{two}.dropped.jsonl").read_bytes()


@pytest.mark.shared_data
def test_reads_other_corpus_formats_through_corpus_readers(tmp_path):
    pytest.importorskip("masksearch_rl.corpus.readers")
    out = tmp_path / "items.jsonl"
    summary = generate_ramp(RampConfig(corpus=str(KILT), out=str(out), corpus_format="kilt", limit=60, progress=False))
    assert summary["run"]["items"] + summary["run"]["dropped"] == 60
    for item in read_jsonl(out):
        check_item(item)


def test_bad_corpus_lines_and_duplicate_ids_are_counted(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    good = {"id": "a", "contents": '"Alpha"\nAlpha was founded in 1901 by Kelovar Tamsin near the Orlena River.'}
    corpus.write_text(
        json.dumps(good) + "\n" + "{not json\n" + json.dumps({"contents": "no id"}) + "\n" + json.dumps(good) + "\n"
        + json.dumps({"id": "b", "contents": "[mask] was founded in 1902 by Kelovar Tamsin near the Orlena River."})
        + "\n"
    )
    summary = generate_ramp(RampConfig(corpus=str(corpus), out=str(tmp_path / "o.jsonl"), progress=False))
    run = summary["run"]
    assert run["bad_lines"]["total"] == 2 and run["duplicate_ids"] == 1
    assert run["items"] == 1 and run["drop_reasons"] == {"contains_mask_token": 1}


def test_a_non_utf8_line_and_a_bom_lose_only_that_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 300)
    lines = corpus.read_bytes().splitlines(keepends=True)
    lines[150] = lines[150].replace(b"founded", b"found\xe9d")  # line 151 (a Latin-1 byte)
    corpus.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    summary = generate_ramp(RampConfig(corpus=str(corpus), out=str(tmp_path / "o.jsonl"), progress=False))
    run = summary["run"]
    assert run["bad_lines"]["total"] == 1 and run["bad_lines"]["examples"][0].startswith(f"{corpus}:151: not valid UTF-8")
    assert run["items"] + run["dropped"] == 299 and run["passages_read"] == 299  # the first record included


def test_a_truncated_gz_corpus_fails_the_command_naming_it(tmp_path):
    import gzip

    import typer
    from typer.testing import CliRunner

    from masksearch_rl.ramp.cli import register

    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 2000)
    truncated = tmp_path / "corpus.jsonl.gz"
    truncated.write_bytes(gzip.compress(corpus.read_bytes())[:-500])
    app = typer.Typer()
    register(app)
    out = tmp_path / "items.jsonl"
    result = CliRunner().invoke(app, ["ramp", "generate", "--corpus", str(truncated), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 1 and f"{truncated}: cannot be read past line" in result.output
    done = _lines(out) + _lines(Path(f"{out}.dropped.jsonl"))
    assert 0 < done < 2000  # what was read before the cut is kept (a re-run of a fixed file goes on from there)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus"):
        RampConfig(corpus=str(tmp_path / "missing.jsonl"), out="x")
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(ValueError, match="extractor 'llm' needs"):
        RampConfig(corpus=str(tmp_path / "c.jsonl"), out="x", extractor="llm")
    with pytest.raises(ValueError, match="extractor must be"):
        RampConfig(corpus=str(tmp_path / "c.jsonl"), out="x", extractor="spacy")


# --------------------------------------------------------------------------------------------------------------
# PPL masking with a tiny random-weight model and a locally trained tokenizer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    sentences = [
        "The city of Kelovar was founded in 1901 by Tamsin Orlena.",
        "Marie Curie was born in Warsaw in 1867 and moved to Paris.",
        "Its population was 12,345 in 1990, according to the census.",
        "The Varnhold River flows through Port Brisco into the sea.",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(sentences, trainer)
    path = tmp_path_factory.mktemp("tiny_lm")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_ppl_scores_match_a_direct_computation_and_batching(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from masksearch_rl.ramp.ppl import PplConfig, PplScorer

    texts = [
        "The city of Kelovar was founded in 1901 by Tamsin Orlena.",
        "Marie Curie moved to Paris.",
        "Its population was 12,345 in 1990, and the Varnhold River flows through Port Brisco into the sea.",
    ]
    spans = [[(12, 19), (35, 39)], [(0, 11), (21, 26)], [(19, 25), (45, 59)]]
    batched = PplScorer(PplConfig(str(tiny_lm), batch_size=3)).span_scores(texts, spans)
    single = PplScorer(PplConfig(str(tiny_lm), batch_size=1)).span_scores(texts, spans)
    for row_b, row_s in zip(batched, single):
        assert row_b == pytest.approx(row_s, abs=1e-4)  # right padding does not change real tokens' losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    encoded = tokenizer(texts[0], return_offsets_mapping=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"]).logits[0]
    ids = encoded["input_ids"][0]
    losses = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none").tolist()
    offsets = encoded["offset_mapping"][0].tolist()
    start, end = spans[0][0]
    expected = [
        losses[t - 1]
        for t in range(1, len(ids))
        if offsets[t][1] > offsets[t][0] and offsets[t][0] < end and start < offsets[t][1]
    ]
    assert batched[0][0] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert all(math.isfinite(s) for row in batched for s in row)


def test_ppl_masking_picks_the_hardest_spans(tiny_lm, tmp_path):
    from masksearch_rl.ramp.ppl import PplConfig, PplScorer

    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 30)
    out = tmp_path / "items.jsonl"
    ppl = PplConfig(str(tiny_lm), batch_size=4)
    masking = MaskingConfig(k_dist="uniform")
    generate_ramp(RampConfig(corpus=str(corpus), out=str(out), ppl=ppl, progress=False, masking=masking))
    items = read_jsonl(out)
    assert items
    scorer = PplScorer(ppl)
    for item in items:
        check_item(item)
        assert item["selection"] == "ppl" and len(item["mask_scores"]) == item["num_masks"]
        candidates, _ = validate_candidates(
            item["passage"], [Span(e, "x") for e in item["entities"]], item["title"]
        )
        scores = scorer.span_scores([item["passage"]], [[(c.start, c.end) for c in candidates]])[0]
        by_text = dict(zip([c.text for c in candidates], scores))
        assert [round(by_text[m], 4) for m in item["masks"]] == item["mask_scores"]
        # Nothing left unmasked scores higher than the easiest chosen mask, unless it overlaps a chosen one.
        chosen = {m: item["passage"].index(m) for m in item["masks"]}
        floor = min(by_text[m] for m in item["masks"])
        for cand in candidates:
            overlaps = any(cand.start < s + len(m) and s < cand.end for m, s in chosen.items())
            if cand.text not in chosen and not overlaps:
                assert by_text[cand.text] <= floor + 1e-6


# --------------------------------------------------------------------------------------------------------------
# verl parquet export


@pytest.mark.shared_data
def test_export_parquet_rows_split_and_dedupe(kilt_run, tmp_path):
    import pandas as pd

    out, _ = kilt_run
    items = read_jsonl(out)
    doubled = tmp_path / "items.jsonl"
    doubled.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items + items[:25]))
    result = export_parquet(doubled, tmp_path / "parquet", ExportConfig(val_fraction=0.05, seed=11))
    assert result["duplicates_skipped"] == 25
    train = pd.read_parquet(tmp_path / "parquet" / "train.parquet")
    val = pd.read_parquet(tmp_path / "parquet" / "val.parquet")
    assert len(train) + len(val) == len(items) and len(val) == round(0.05 * len(items))
    assert list(train.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"]
    by_id = {i["id"]: i for i in items}
    seen = set()
    for frame, split in ((train, "train"), (val, "val")):
        assert list(frame["extra_info"].map(lambda e: e["index"])) == list(range(len(frame)))
        for row in frame.to_dict("records"):
            info = row["extra_info"]
            item = by_id[info["id"]]
            seen.add(info["id"])
            assert row["data_source"] == "ramp" and row["agent_name"] == TAG_AGENT_NAME and row["ability"] == "ramp"
            assert info["split"] == split and info["num_masks"] == item["num_masks"]
            assert dict(info["tools_kwargs"]["search"]["create_kwargs"]) == {"item_id": item["id"]}
            assert [dict(m) for m in row["prompt"]] == ramp_messages(item["query"], instruction=item["instruction"])
            truth = row["reward_model"]["ground_truth"]
            assert row["reward_model"]["style"] == "rule"
            assert list(truth["target"]) == list(truth["masks"]) == item["masks"]
    assert seen == set(by_id)
    # The split is decided by (seed, id): same seed, same split; another seed, another split.
    assert set(val["extra_info"].map(lambda e: e["id"])) == split_ids(by_id, 0.05, 11)
    assert split_ids(by_id, 0.05, 11) != split_ids(by_id, 0.05, 12)


@pytest.mark.shared_data
def test_export_loads_with_hf_datasets_like_verl(kilt_run, tmp_path):
    import datasets

    out, _ = kilt_run
    export_parquet(out, tmp_path, ExportConfig(val_fraction=0.1, agent_name="tool_agent"))
    row = datasets.load_dataset("parquet", data_files=str(tmp_path / "val.parquet"))["train"][0]
    assert row["agent_name"] == "tool_agent" and row["prompt"][0]["role"] == "system"
    assert row["extra_info"]["tools_kwargs"].get("search", {}).get("create_kwargs")  # what verl's tool loop reads


@pytest.mark.shared_data
def test_cli_generate_and_export(kilt_corpus, tmp_path):
    import typer
    from typer.testing import CliRunner

    from masksearch_rl.ramp.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "items.jsonl"
    gen = runner.invoke(
        app,
        ["ramp", "generate", "--corpus", str(kilt_corpus), "--out", str(out), "--limit", "200", "--k-dist", "uniform",
         "--weighting", "uniform", "--seed", "2", "--no-progress"],
    )
    assert gen.exit_code == 0, gen.output
    report = json.loads(gen.stdout)  # stdout stays JSON; the k table goes to stderr
    assert report["items_this_run"] == _lines(out) and report["items_this_run"] + report["dropped_this_run"] == 200
    assert "masks per item (k)" in gen.stderr
    for k, count in report["totals"]["mask_histogram"].items():
        assert re.search(rf"│ {k} │ +{count} │", gen.stderr), gen.stderr
    max_out = tmp_path / "max.jsonl"
    old_rule = runner.invoke(app, ["ramp", "generate", "--corpus", str(kilt_corpus), "--out", str(max_out),
                                   "--limit", "100", "--k-dist", "max_available", "--no-progress"])
    assert old_rule.exit_code == 0, old_rule.output
    assert json.loads(old_rule.stdout)["mask_histogram"]["4"] > 50
    exp = runner.invoke(
        app, ["ramp", "export", "--items", str(out), "--out-dir", str(tmp_path / "pq"), "--val-fraction", "0.1"]
    )
    assert exp.exit_code == 0, exp.output
    assert json.loads(exp.stdout)["train"] + json.loads(exp.stdout)["val"] == report["items_this_run"]
    bad = runner.invoke(app, ["ramp", "generate", "--corpus", str(kilt_corpus), "--out", str(out), "--k-dist", "bogus"])
    assert bad.exit_code == 2 and "k_dist" in bad.output
