"""Reward: format check, answer matching (SQuAD EM/F1, recall, cover-EM, RAMP spans), combination, verl loading.

Expected numbers are worked out by hand from the SQuAD v1.1 definitions (see the comments next to each case).
"""

from __future__ import annotations

import asyncio
import json
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from envs.prompts import SEARCH_LIMIT_REACHED, TAG_AGENT_NAME, TOOL_AGENT_NAME, answer_block, information_block
from reward.answer_match import (
    MatchScores,
    cover_exact_match,
    exact_match,
    f1_score,
    normalize_answer,
    score_answer,
    score_spans,
    split_spans,
    token_recall,
)
from reward.combine import RewardConfig, combine
from reward.passage_reading import read_masked_regions
from reward.format import FormatReason, FormatRules, check_format, extract_answer
from reward.masksearch_reward import RESULT_KEYS, compute_score, compute_score_sync, parse_ground_truth, reset_caches

R = FormatReason
RAMP_GT = {"target": ["Gustave Eiffel", "1889"], "masks": ["Gustave Eiffel", "1889"]}


def trajectory(*blocks: str, answer: str = "Gustave Eiffel | 1889", tail: str = "<|im_end|>") -> str:
    return "".join(blocks) + answer_block(answer) + tail


def search(query: str, docs: str = "Doc 1 (Title: Eiffel Tower) The tower opened in 1889.") -> str:
    return f"<search> {query} </search>{information_block(docs)}"


THINK = "<think> I need the designer and the year. </think>\n"
GOOD = trajectory(THINK, search("Eiffel Tower designer"), THINK, search("Eiffel Tower opening year"), THINK)


@pytest.fixture(autouse=True)
def _fresh_configs():
    reset_caches()
    yield
    reset_caches()


# ------------------------------------------------------------------------------------------------------ format


WELL_FORMED_CASES = [
    GOOD,
    trajectory(search("q1"), search("q2"), search("q3")),  # no think blocks: allowed by default
    trajectory(),  # answer straight away
    trajectory(THINK, tail=""),
    trajectory(THINK, tail="<|endoftext|><|endoftext|>\n"),
    trajectory(THINK, tail="\n</s>"),
    trajectory("<think></think>", search("q")),  # empty think (Qwen3 style)
    # the retriever's text is opaque: tags quoted inside <information> do not count
    trajectory(search("q", docs="a page quoting <answer> x </answer> and <think> and </search>")),
]


@pytest.mark.parametrize("response", WELL_FORMED_CASES)
def test_well_formed_responses(response):
    result = check_format(response, num_masks=2)
    assert result.ok and result.reason is R.OK
    assert result.answer == "Gustave Eiffel | 1889"


def test_counts_searches_and_thinks():
    result = check_format(GOOD, num_masks=2)
    assert (result.num_searches, result.num_thinks) == (2, 3)


MALFORMED_CASES = [
    (f"{THINK}{search('q')}<think> still unsure </think>", R.NO_ANSWER),
    (f"{THINK}<answer> a | b </answer> <answer> c | d </answer>", R.MULTIPLE_ANSWERS),
    (trajectory(THINK, tail=" Hope this helps!"), R.TEXT_AFTER_ANSWER),
    (trajectory(THINK, tail="<|im_end|> more"), R.TEXT_AFTER_ANSWER),
    (trajectory(THINK, tail="<think> after </think>"), R.TEXT_AFTER_ANSWER),
    (f"{THINK}<answer> a | b", R.UNCLOSED_TAG),
    ("<think> thinking forever", R.UNCLOSED_TAG),
    (f"{THINK}<search> q </search>\n<information> docs ...", R.UNCLOSED_TAG),
    ("</think> <answer> a | b </answer>", R.UNEXPECTED_CLOSE),
    ("<think> x </search> <answer> a | b </answer>", R.UNEXPECTED_CLOSE),
    ("<think> x <search> q </search> </think> <answer> a | b </answer>", R.NESTED_TAG),
    ("<think> I will write <answer> a | b </answer>", R.NESTED_TAG),
    ("<search> q </search> <answer> a | b </answer>", R.SEARCH_WITHOUT_INFORMATION),
    (f"<search> q </search> {search('q2')}<answer> a | b </answer>", R.SEARCH_WITHOUT_INFORMATION),
    ("<information> made up </information> <answer> a | b </answer>", R.INFORMATION_WITHOUT_SEARCH),
    (f"{search('q')}<information> twice </information><answer> a | b </answer>", R.INFORMATION_WITHOUT_SEARCH),
    ("<search>   </search>" + information_block("x") + "<answer> a | b </answer>", R.EMPTY_SEARCH),
    ("<answer>   </answer>", R.EMPTY_ANSWER),
    ("Sure! <answer> a | b </answer>", R.UNTAGGED_TEXT),
    (f"{THINK} so the answer is <answer> a | b </answer>", R.UNTAGGED_TEXT),
    ("<answer> a | b | c </answer>", R.SPAN_COUNT_MISMATCH),
    ("<answer> only one </answer>", R.SPAN_COUNT_MISMATCH),
]


@pytest.mark.parametrize(("response", "reason"), MALFORMED_CASES)
def test_malformed_responses(response, reason):
    result = check_format(response, num_masks=2)
    assert not result.ok
    assert result.reason is reason, result


def test_format_rules_are_configurable():
    chatty = "Sure! <answer> a | b </answer>"
    assert check_format(chatty, num_masks=2, rules=FormatRules(allow_untagged_text=True)).ok
    assert check_format(trajectory(THINK, tail="[END]"), rules=FormatRules(eos_tokens=("[END]",))).ok
    no_think = trajectory(search("q"))
    assert check_format(no_think, rules=FormatRules(require_think=True)).reason is R.MISSING_THINK
    assert check_format(GOOD, rules=FormatRules(require_think=True)).ok


def test_span_count_for_ramp_and_qa():
    assert check_format("<answer> a | b | c </answer>", num_masks=3).ok
    assert check_format("<answer> a|b|c </answer>", num_masks=3).ok  # spaces around the bar optional
    # a single-mask answer that hedges with several candidates is a count mismatch
    assert check_format("<answer> a | b </answer>", num_masks=1).reason is R.SPAN_COUNT_MISMATCH
    # QA rows (num_masks=None) take the answer as it is
    assert check_format("<answer> a | b </answer>").ok


def test_paragraph_answers():
    paragraph = "The tower was designed by Gustave Eiffel and opened in Paris in 1889 for the World Fair."
    result = check_format(f"<answer> {paragraph} </answer>", num_masks=2)
    assert result.ok and result.paragraph
    strict = FormatRules(allow_paragraph=False)
    assert check_format(f"<answer> {paragraph} </answer>", num_masks=2, rules=strict).reason is R.SPAN_COUNT_MISMATCH
    assert check_format("<answer> Gustave Eiffel 1889 </answer>", num_masks=2).reason is R.SPAN_COUNT_MISMATCH


def test_extract_answer():
    assert extract_answer(GOOD) == "Gustave Eiffel | 1889"
    assert extract_answer("<answer> a </answer> <answer> b </answer>") == "b"
    assert extract_answer("<answer> unfinished") is None
    assert extract_answer("no tags") is None


def test_extract_answer_skips_the_environments_text():
    quoting = search("q", docs="a page quoting <answer> Paris </answer>")
    assert extract_answer(quoting + "<think> unsure") is None
    assert extract_answer(THINK + "<answer> mine </answer> " + quoting) == "mine"  # not the quoted one after it
    assert extract_answer(search("q") + "<answer> after </answer>") == "after"
    # an unclosed block (a cut response) is the environment's text to the end
    assert extract_answer("<search> q </search>\n<information> <answer> x </answer> and more") is None
    # hermes: tool responses are the environment's
    tool_turn = "<tool_response>\nquotes <answer> Paris </answer>\n</tool_response>"
    assert extract_answer(tool_turn, "hermes") is None
    assert extract_answer("<answer> a </answer>" + tool_turn, "hermes") == "a"


@pytest.mark.parametrize("notice", [SEARCH_LIMIT_REACHED.format(limit=2),
                                    # the notice as it once read, with a complete answer block in it
                                    "Search limit reached. Give your final answer now inside <answer> and </answer>."])
def test_rollout_cut_after_the_limit_notice_does_not_score_the_notice(notice):
    response = search("Eiffel designer") + search("Eiffel year") + f"<search> more </search>{information_block(notice)}"
    response += "<think> I should answer now, but"  # the response budget ends here
    assert extract_answer(response) is None
    # a gold the notice's words would match ("and"), scored even without the format gate
    result = compute_score_sync("nq", response, "and", format_gate=False)
    assert result["format_code"] == R.UNCLOSED_TAG and result["em"] == result["f1"] == result["score"] == 0
    assert "<answer>" not in SEARCH_LIMIT_REACHED and "</answer>" not in SEARCH_LIMIT_REACHED


# ------------------------------------------------------------------------------------------------ hermes variant
HERMES = FormatRules(protocol="hermes")


def tool_call(query: str) -> str:
    """A tool call as Qwen2.5's chat template writes it (what the policy generates)."""
    return "<tool_call>\n" + json.dumps({"name": "search", "arguments": {"query": query}}) + "\n</tool_call>"


def tool_turn(*docs: str) -> str:
    """The tool turn verl appends (Qwen2.5's template), decoded with skip_special_tokens: role headers stay."""
    responses = "".join(f"\n<tool_response>\n{d}\n</tool_response>" for d in docs)
    return f"\nuser{responses}\nassistant\n"


DOCS = "Doc 1 (Title: Eiffel Tower) The tower opened in 1889."
HERMES_GOOD = (
    "I need the designer first.\n" + tool_call("Eiffel Tower designer") + tool_turn(DOCS)
    + "Now the year.\n" + tool_call("Eiffel Tower opening year") + tool_turn(DOCS)
    + answer_block("Gustave Eiffel | 1889") + "<|im_end|>"
)  # fmt: skip

HERMES_WELL_FORMED = [
    HERMES_GOOD,
    answer_block("Gustave Eiffel | 1889"),
    THINK + tool_call("q") + tool_turn(DOCS) + THINK + answer_block("Gustave Eiffel | 1889"),
    # parallel calls, each answered; or fewer answers (verl answers max_parallel_calls of them)
    tool_call("a") + tool_call("b") + tool_turn(DOCS, DOCS) + answer_block("Gustave Eiffel | 1889"),
    tool_call("a") + tool_call("b") + tool_turn(DOCS) + answer_block("Gustave Eiffel | 1889"),
    # tool responses are opaque
    tool_call("q") + tool_turn("quotes <answer> x </answer>, <tool_call> and </think>") + answer_block("a | b"),
    # decoded with special tokens
    tool_call("q") + "<|im_end|>\n<|im_start|>user\n<tool_response>\nx\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n" + answer_block("a | b") + "<|im_end|>",
]

HERMES_MALFORMED = [
    (tool_call("q") + answer_block("a | b"), R.SEARCH_WITHOUT_INFORMATION),
    (tool_call("q") + THINK + tool_turn(DOCS) + answer_block("a | b"), R.SEARCH_WITHOUT_INFORMATION),
    (tool_turn(DOCS) + answer_block("a | b"), R.INFORMATION_WITHOUT_SEARCH),
    (tool_call("q") + tool_turn(DOCS, DOCS) + answer_block("a | b"), R.INFORMATION_WITHOUT_SEARCH),
    (tool_call("q") + tool_turn(DOCS) + THINK + tool_turn(DOCS) + answer_block("a | b"), R.INFORMATION_WITHOUT_SEARCH),
    ("<tool_call> search(Eiffel) </tool_call>" + tool_turn(DOCS) + answer_block("a | b"), R.BAD_TOOL_CALL),
    ('<tool_call>{"query": "q"}</tool_call>' + tool_turn(DOCS) + answer_block("a | b"), R.BAD_TOOL_CALL),
    ("<tool_call>  </tool_call>" + tool_turn(DOCS) + answer_block("a | b"), R.EMPTY_SEARCH),
    (tool_call("q") + "\nuser\n<tool_response>\n cut", R.UNCLOSED_TAG),
    (tool_call("q") + tool_turn(DOCS) + "<answer> a | b", R.UNCLOSED_TAG),
    ("<tool_call> <answer> a | b </answer> </tool_call>", R.NESTED_TAG),
    ("</tool_call>" + answer_block("a | b"), R.UNEXPECTED_CLOSE),
    (tool_call("q") + tool_turn(DOCS) + "I am not sure.", R.NO_ANSWER),
    (answer_block("a | b") + " Hope this helps!", R.TEXT_AFTER_ANSWER),
    (answer_block("a | b") + tool_call("q"), R.TEXT_AFTER_ANSWER),
    (answer_block("a | b") + answer_block("c | d"), R.MULTIPLE_ANSWERS),
    (tool_call("q") + tool_turn(DOCS) + answer_block("one"), R.SPAN_COUNT_MISMATCH),
]


@pytest.mark.parametrize("response", HERMES_WELL_FORMED)
def test_hermes_well_formed_responses(response):
    result = check_format(response, num_masks=2, rules=HERMES)
    assert result.ok and result.reason is R.OK, result
    assert check_format(HERMES_GOOD, num_masks=2, rules=HERMES).num_searches == 2


@pytest.mark.parametrize(("response", "reason"), HERMES_MALFORMED)
def test_hermes_malformed_responses(response, reason):
    result = check_format(response, num_masks=2, rules=HERMES)
    assert not result.ok and result.reason is reason, result


def test_hermes_rules_are_configurable():
    assert check_format(HERMES_GOOD, num_masks=2, rules=FormatRules(protocol="hermes", require_think=True)).reason \
        is R.MISSING_THINK
    with pytest.raises(ValueError, match="format.protocol"):
        FormatRules(protocol="xml")


def test_the_row_agent_name_picks_the_protocol():
    """A hermes response scored 0 (untagged text) under the tag rules: the bug. The row's loop decides."""
    assert compute_score_sync("ramp", HERMES_GOOD, RAMP_GT)["format_code"] == R.UNTAGGED_TEXT
    hermes_row = compute_score_sync("ramp", HERMES_GOOD, RAMP_GT, {"agent_name": TOOL_AGENT_NAME})
    assert hermes_row["score"] == 1 and hermes_row["num_searches"] == 2
    assert compute_score_sync("ramp", HERMES_GOOD, RAMP_GT, format={"protocol": "hermes"})["score"] == 1
    # the row's agent wins over the configured default, both ways
    tag_row = compute_score_sync("ramp", HERMES_GOOD, RAMP_GT, {"agent_name": TAG_AGENT_NAME},
                                 format={"protocol": "hermes"})
    assert tag_row["score"] == 0
    assert compute_score_sync("ramp", GOOD, RAMP_GT, {"agent_name": TAG_AGENT_NAME})["score"] == 1
    # unknown agents (and odd values) follow the config
    assert compute_score_sync("ramp", GOOD, RAMP_GT, {"agent_name": "my_loop"})["score"] == 1
    assert compute_score_sync("ramp", GOOD, RAMP_GT, {"agent_name": ["tool_agent"]})["score"] == 1
    # a hermes response cut by the budget does not score text the tool returned
    cut = tool_call("q") + "\nuser\n<tool_response>\nGustave Eiffel | 1889 <answer> Gustave Eiffel | 1889 </answer>"
    assert compute_score_sync("ramp", cut, RAMP_GT, {"agent_name": TOOL_AGENT_NAME}, format_gate=False)["recall"] == 0


# ------------------------------------------------------------------------------------------------ answer match


@pytest.mark.parametrize(
    ("prediction", "gold", "em", "f1", "recall", "cover"),
    [
        # both normalise to "eiffel tower"
        ("the Eiffel Tower!", "Eiffel tower", 1, 1, 1, 1),
        # 1 common token; P = 1/1, R = 1/2, F1 = 2PR/(P+R) = 1/1.5 = 2/3
        ("Eiffel", "Eiffel Tower", 0, 2 / 3, 1 / 2, 0),
        # pred "tall eiffel tower in paris": 2 common; P = 2/5, R = 1, F1 = 0.8/1.4 = 4/7
        ("the tall Eiffel Tower in Paris", "Eiffel Tower", 0, 4 / 7, 1, 1),
        # multiset overlap: min(2,1)+min(2,1) = 2; P = 2/4, R = 1, F1 = 1/1.5 = 2/3
        ("New York New York", "New York", 0, 2 / 3, 1, 1),
        # bag of words: same tokens, other order
        ("York New", "New York", 0, 1, 1, 0),
        # articles are dropped as words only ("and" stays); gold "anderson co"; P = 2/3, R = 1, F1 = 0.8
        ("Anderson and Co.", "Anderson & Co", 0, 0.8, 1, 0),
        ("A Tale of Two Cities", "tale of two cities", 1, 1, 1, 1),
        ("U.S.A.", "USA", 1, 1, 1, 1),
        ("Lyon", "Paris", 0, 0, 0, 0),
        ("", "Paris", 0, 0, 0, 0),
        # SQuAD v1.1 quirk: two answers that normalise to "" are an exact match but have F1 0
        ("a", "The", 1, 0, 0, 1),
        # cover-EM works on token boundaries: "10" is not inside "1000"
        ("in 1000 BC", "10", 0, 0, 0, 0),
    ],
)
def test_squad_metrics_by_hand(prediction, gold, em, f1, recall, cover):
    scores = score_answer(prediction, gold)
    assert scores.em == em
    assert scores.f1 == pytest.approx(f1)
    assert scores.recall == pytest.approx(recall)
    assert scores.cover_em == cover
    assert exact_match(prediction, gold) == em and f1_score(prediction, gold) == pytest.approx(f1)
    assert token_recall(prediction, gold) == pytest.approx(recall)
    assert cover_exact_match(prediction, gold) == cover


def test_aliases_take_the_max_of_each_metric_separately():
    # vs "obama": EM 0, P = 1/2, R = 1 -> F1 2/3, recall 1, cover 1
    # vs "barack h obama": 2 common; P = 1, R = 2/3 -> F1 = (4/3)/(5/3) = 0.8, recall 2/3, cover 0
    scores = score_answer("Barack Obama", ["Obama", "Barack H. Obama"])
    assert scores.em == 0
    assert scores.f1 == pytest.approx(0.8)
    assert scores.recall == 1 and scores.cover_em == 1


def test_plain_substring_cover_em_is_available():
    assert cover_exact_match("in 1000 BC", "10", word_boundary=False) == 1


def test_ramp_spans_aligned_by_position():
    assert score_spans("Gustave Eiffel | 1889", ["Gustave Eiffel", "1889"]).mean.em == 1
    half = score_spans("Gustave Eiffel | 1890", ["Gustave Eiffel", "1889"])
    assert half.mode == "aligned" and half.mean.em == 0.5 and half.mean.recall == 0.5
    # per-span aliases
    assert score_spans("Eiffel|1889", [["Gustave Eiffel", "Eiffel"], "1889"]).mean.em == 1
    # recall per span: "gustave" covers 1/2 of "gustave eiffel", "1889" covers 1/2 of "in 1889"; mean 1/2
    partial = score_spans("Gustave | 1889", ["Gustave Eiffel", "in 1889"])
    assert partial.mean.recall == pytest.approx(0.5)
    assert [s.recall for s in partial.per_span] == [0.5, 0.5]
    # wrong order scores by position
    assert score_spans("1889 | Gustave Eiffel", ["Gustave Eiffel", "1889"]).mean.em == 0


def test_ramp_span_count_mismatch_scores_by_position():
    short = score_spans("Gustave Eiffel", ["Gustave Eiffel", "1889"])
    assert short.mode == "mismatch" and short.mean.em == 0.5
    # more parts than masks is a list of guesses: nothing, even with the right spans first
    extra = score_spans("Gustave Eiffel | 1889 | Paris", ["Gustave Eiffel", "1889"])
    assert extra.mode == "mismatch" and extra.mean == MatchScores()
    hedged = score_spans("Lyon | Paris", ["Lyon"])
    assert hedged.mode == "mismatch" and hedged.mean.recall == 0
    assert score_spans("Lyon", ["Lyon"]).mode == "aligned"


def test_commitment_guard_pays_parts_of_the_gold_never_additions():
    # a part of the gold earns its share of recall (and F1 from precision 1); an added token voids the span
    assert score_spans("Eiffel | 1889", ["Gustave Eiffel", "1889"]).per_span[0] == MatchScores(0, 2 / 3, 0.5, 0)
    assert score_spans("Gustave Eiffel Paris | 1889", ["Gustave Eiffel", "1889"]).per_span[0] == MatchScores()
    assert score_spans("Eiffel Eiffel | 1889", ["Gustave Eiffel", "1889"]).per_span[0] == MatchScores()
    # normalisation first: articles and punctuation are not tokens of their own
    assert score_spans("the Gustave-Eiffel. | 1889", ["Gustave Eiffel", "1889"]).per_span[0].em == 0  # one token
    assert score_spans("The Gustave Eiffel! | 1889", ["Gustave Eiffel", "1889"]).mean.em == 1
    # an allowance of one extra token, and the guard off (the paper's plain recall, which pays for lists)
    assert score_spans("Gustave Eiffel Paris | 1889", ["Gustave Eiffel", "1889"], max_extra_tokens=1).mean.recall == 1
    listed = score_spans("Paris Lyon 1889 | Paris Lyon 1889", ["Lyon", "1889"], max_extra_tokens=None)
    assert listed.mean.recall == 1
    assert score_spans("Paris Lyon 1889 | Paris Lyon 1889", ["Lyon", "1889"]).mean.recall == 0
    # QA answers: the same guard through score_answer; evaluation's plain metrics are unchanged
    assert score_answer("Paris or Lyon", "Lyon", max_extra_tokens=0) == MatchScores()
    assert score_answer("Paris or Lyon", "Lyon").recall == 1


def test_ramp_paragraph_answers_are_read_where_each_mask_stands():
    masked = "The tower was designed by [mask] and opened in [mask] for the World's Fair in [mask]."
    golds = ["Gustave Eiffel", "1889", "Paris"]
    paragraph = "The tower was designed by Gustave Eiffel and opened in 1889 for the World's Fair in London."
    scored = score_spans(paragraph, golds, masked_passage=masked)
    assert scored.mode == "paragraph"
    assert [s.em for s in scored.per_span] == [1, 1, 0]
    assert scored.mean.recall == pytest.approx(2 / 3)
    # the spans somewhere in the text, not where the masks stand, earn nothing
    elsewhere = "The tower was designed by someone and opened in spring for the World's Fair in 1889, Paris, Eiffel."
    assert score_spans(elsewhere, golds, masked_passage=masked).mean == MatchScores()
    # without the masked passage a paragraph cannot be read; without allow_paragraph it is one part of three
    assert score_spans(paragraph, golds).mean == MatchScores()
    assert score_spans(paragraph, golds, masked_passage=masked, allow_paragraph=False).mode == "mismatch"


@pytest.mark.parametrize(
    ("masked", "answer", "fills"),
    [
        # numbers and abbreviations stay whole, even right before the full stop
        ("It was founded in [mask] and cost [mask].", "It was founded in 1889 and cost 2.5 million.", ["1889", "2.5 million"]),
        ("He moved to [mask].", "He moved to Washington, D.C..", ["Washington, D.C."]),
        # a run of adjacent masks is one region; CJK text is aligned character by character
        ("Born on [mask] [mask] in Lyon.", "Born on 3 May 1889 in Lyon.", ["3 May 1889"]),
        ("他出生于[mask]，后来移居[mask]。", "他出生于北京，后来移居上海。", ["北京", "上海"]),
        # a rewritten neighbour leaves that mask unreadable; the other is still read
        ("The tower in [mask] was completed in [mask] after two years of work by hundreds of builders from abroad.",
         "The tower at Paris was completed in 1889 after two years of work by hundreds of builders from abroad.",
         [None, "1889"]),
    ],
)
def test_passage_reading_finds_each_fill_where_its_mask_stands(masked, answer, fills):
    regions = read_masked_regions(answer, masked)
    assert [text for _, text in regions] == fills
    assert sum(len(masks) for masks, _ in regions) == masked.count("[mask]")


def test_passage_reading_rejects_text_beyond_one_copy_of_the_passage():
    masked = "The Eiffel Tower in [mask] was completed in [mask] by the company of [mask] for the fair."
    right = "The Eiffel Tower in Paris was completed in 1889 by the company of Gustave Eiffel for the fair."
    assert [text for _, text in read_masked_regions(right, masked)] == ["Paris", "1889", "Gustave Eiffel"]
    assert read_masked_regions(right + " " + right.replace("Paris", "Lyon"), masked) is None
    assert read_masked_regions(right + " Lyon London Berlin Rome Nice", masked) is None
    assert read_masked_regions(right + " Lyon", masked) is not None  # a word or two beyond it earns nothing either
    adjacent = score_spans("Born on 3 May 1889 in Lyon and raised there by his aunt and uncle.", ["3 May", "1889"],
                           masked_passage="Born on [mask] [mask] in Lyon and raised there by his aunt and uncle.")
    assert adjacent.mode == "paragraph" and adjacent.mean.em == 1


def test_split_spans():
    assert split_spans("a | b|c  |  d") == ["a", "b", "c", "d"]


def _official_normalize(s: str) -> str:
    """The SQuAD v1.1 evaluation script's normalisation, written out from its definition."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


NORMALISATION_PIECES = [*"aAnNtThHeE .,!-_'’–é1\t\n\x00\u2028", "the ", " an ", "a.", "ß", "The", "İ", "Ⅻ"]


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(NORMALISATION_PIECES), max_size=30).map("".join), st.text(max_size=30)))
def test_normalisation_equals_the_official_definition(text):
    assert normalize_answer(text) == _official_normalize(text)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=30), st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_metric_invariants(prediction, golds):
    scores = score_answer(prediction, golds)
    for value in scores:
        assert 0.0 <= value <= 1.0
    # covering a (non-empty) gold means finding all its tokens; an empty gold is covered only by an exact match
    assert scores.cover_em <= max(scores.recall, scores.em)
    pred = normalize_answer(prediction)
    if pred and any(normalize_answer(g) == pred for g in golds):
        assert scores.em == scores.f1 == scores.recall == scores.cover_em == 1.0


# ------------------------------------------------------------------------------------------------ compute_score


def test_result_has_every_key_and_numeric_values():
    for response in (GOOD, "", "<answer>", "garbage </answer>"):
        result = compute_score_sync("ramp", response, RAMP_GT)
        assert tuple(result) == RESULT_KEYS
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in result.values())


def test_good_trajectory_scores_one():
    result = compute_score_sync("ramp", GOOD, RAMP_GT, {"index": 0, "num_masks": 2})
    assert result["score"] == 1 and result["acc"] == 1 and result["format"] == 1
    assert result["num_searches"] == 2 and result["judge"] == 0 and result["judge_fallback"] == 0


def test_format_gate_zeroes_a_correct_answer():
    response = trajectory(THINK, tail=" and that's my answer")
    result = compute_score_sync("ramp", response, RAMP_GT)
    assert result["format"] == 0 and result["format_code"] == R.TEXT_AFTER_ANSWER
    assert result["em"] == 1 and result["recall"] == 1  # still reported
    assert result["score"] == 0 and result["acc"] == 0


def test_ramp_default_metric_is_recall_and_metrics_are_selectable():
    response = trajectory(answer="Eiffel | 1889")  # recall (1/2 + 1)/2 = 0.75, EM 0.5
    assert compute_score_sync("ramp", response, RAMP_GT)["score"] == pytest.approx(0.75)
    assert compute_score_sync("ramp", response, RAMP_GT, ramp_metric="em")["score"] == pytest.approx(0.5)
    # F1 per span: "eiffel" vs "gustave eiffel" -> P 1, R 1/2, F1 2/3; mean (2/3 + 1)/2 = 5/6
    assert compute_score_sync("ramp", response, RAMP_GT, ramp_metric="f1")["score"] == pytest.approx(5 / 6)


def test_qa_rows_and_ground_truth_shapes():
    response = "<think> easy </think><answer> the Big Apple </answer>"
    aliases = ["New York City", "Big Apple"]
    for gt in (
        {"target": aliases},
        {"target": np.array(aliases, dtype=object)},
        aliases,
        np.array(aliases),
        "Big Apple",
        {"target": [aliases]},
    ):
        result = compute_score_sync("hotpotqa", response, gt)
        assert result["score"] == 1 and result["em"] == 1, gt
    assert compute_score_sync("hotpotqa", response, "New York City")["score"] == 0
    # QA answers are never split at "|"
    assert compute_score_sync("nq", "<answer> AC|DC </answer>", "AC/DC")["em"] == 1


def test_ramp_ground_truth_shapes():
    target = parse_ground_truth("ramp", {"target": np.array(["a", "b"]), "masks": np.array(["a", "b"])})
    assert target.is_ramp and target.blanks == (("a",), ("b",))
    # masks with aliases; masks decide RAMP even for another data source name
    target = parse_ground_truth("ramp_wiki", {"masks": [["Eiffel", "Gustave Eiffel"], "1889"]})
    assert target.is_ramp and target.blanks == (("Eiffel", "Gustave Eiffel"), ("1889",))
    assert parse_ground_truth("ramp", {"target": ["x", "y"]}).blanks == (("x",), ("y",))
    # parquet reads nested lists back as object arrays of arrays; numbers become strings
    nested = np.array([np.array(["Eiffel", "Gustave Eiffel"]), np.array([1889])], dtype=object)
    assert parse_ground_truth("ramp", {"masks": nested}).blanks == (("Eiffel", "Gustave Eiffel"), ("1889",))
    assert parse_ground_truth("nq", {"target": np.array([["a", "b"]], dtype=object)}).blanks == (("a", "b"),)
    with pytest.raises(ValueError, match="data_source='ramp'"):
        parse_ground_truth("ramp", {"masks": []})
    with pytest.raises(ValueError, match="no 'target'"):
        parse_ground_truth("nq", {"answers": ["x"]})


def test_combination_options():
    bad_but_right = trajectory(tail=" !")
    kwargs = dict(format_weight=0.2, format_penalty=-0.5, answer_weight=1.0)
    assert compute_score_sync("ramp", GOOD, RAMP_GT, **kwargs)["score"] == pytest.approx(1.2)
    assert compute_score_sync("ramp", bad_but_right, RAMP_GT, **kwargs)["score"] == pytest.approx(-0.5)
    ungated = compute_score_sync("ramp", bad_but_right, RAMP_GT, format_gate=False, **kwargs)
    assert ungated["score"] == pytest.approx(0.5) and ungated["acc"] == 1
    clipped = compute_score_sync("ramp", GOOD, RAMP_GT, max_score=1.0, **kwargs)
    assert clipped["score"] == 1.0
    config = RewardConfig(format_weight=0.2, format_penalty=-0.5)
    assert config.bounds() == (-0.5, 1.2)
    assert combine(False, 1.0, config) == (-0.5, 0.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="ramp_metric"):
        compute_score_sync("ramp", GOOD, RAMP_GT, ramp_metric="bleu")
    with pytest.raises(ValueError, match="unknown reward.custom_reward_function.reward_kwargs option.*metrc"):
        compute_score_sync("ramp", GOOD, RAMP_GT, metrc="em")
    with pytest.raises(ValueError, match="format option.*strict"):
        compute_score_sync("ramp", GOOD, RAMP_GT, format={"strict": True})
    with pytest.raises(ValueError, match="format_gate='maybe'"):
        compute_score_sync("ramp", GOOD, RAMP_GT, format_gate="maybe")
    with pytest.raises(ValueError, match="judge.base_url"):
        compute_score_sync("ramp", trajectory(answer="x | y"), RAMP_GT, ramp_metric="judge")


def test_long_qa_answers_are_ill_formed_when_limited():
    """format.max_answer_words: a cap on the answer's length (a format rule, beside the commitment guard that already
    voids a listing answer's credit); RAMP answers (one span per mask, or the paragraph) are never limited."""
    gold = {"target": ["Gustave Eiffel"]}
    listing = trajectory(search("who"), answer="Gustave Eiffel or Stephen Sauvestre or Maurice Koechlin")
    assert compute_score_sync("hotpotqa", listing, gold, qa_metric="recall")["score"] == 0.0
    unguarded = compute_score_sync("hotpotqa", listing, gold, qa_metric="recall", max_extra_answer_tokens=-1)
    assert unguarded["score"] == 1.0  # the paper's plain recall pays for the list
    limited = compute_score_sync("hotpotqa", listing, gold, qa_metric="recall", format={"max_answer_words": 5})
    assert limited["format_code"] == R.ANSWER_TOO_LONG and limited["score"] == 0.0
    short = trajectory(search("who"), answer="Gustave Eiffel")
    assert compute_score_sync("hotpotqa", short, gold, qa_metric="recall", format={"max_answer_words": 5})["score"] == 1.0
    rules = FormatRules(max_answer_words=1)
    assert check_format(trajectory(answer="Gustave Eiffel | 1889"), num_masks=2, rules=rules).ok
    with pytest.raises(ValueError, match="max_answer_words"):
        FormatRules(max_answer_words=-1)


def test_options_from_hydra_nodes_and_environment(monkeypatch):
    from omegaconf import OmegaConf

    response = trajectory(answer="Eiffel | 1889")
    node = OmegaConf.create({"ramp_metric": "em", "format": {"require_think": True, "eos_tokens": ["<|im_end|>"]}})
    result = compute_score_sync("ramp", response, RAMP_GT, **node)
    assert result["format_code"] == R.MISSING_THINK
    assert compute_score_sync("ramp", THINK + response, RAMP_GT, **node)["score"] == 0.5

    monkeypatch.setenv("MASKSEARCH_REWARD_RAMP_METRIC", "em")
    monkeypatch.setenv("MASKSEARCH_REWARD_FORMAT_REQUIRE_THINK", "true")
    reset_caches()
    assert compute_score_sync("ramp", THINK + response, RAMP_GT)["score"] == 0.5
    assert compute_score_sync("ramp", response, RAMP_GT)["format_code"] == R.MISSING_THINK
    # explicit kwargs beat the environment
    assert compute_score_sync("ramp", THINK + response, RAMP_GT, ramp_metric="recall")["score"] == 0.75


def test_runtime_kwargs_from_verl_are_accepted():
    result = compute_score_sync("ramp", GOOD, RAMP_GT, reward_router_address="127.0.0.1:1", reward_model_tokenizer=None)
    assert result["score"] == 1
    # they are no options: with and without them the same config, built once
    from reward.masksearch_reward import _CONFIGS

    half = trajectory(answer="Eiffel | 1889")
    assert compute_score_sync("ramp", half, RAMP_GT, ramp_metric="em", reward_router_address="h:1")["score"] == 0.5
    assert compute_score_sync("ramp", half, RAMP_GT, ramp_metric="em")["score"] == 0.5
    assert len(_CONFIGS) == 2  # {} and {ramp_metric: em}


def test_config_cache_tells_apart_options_that_compare_equal():
    """Cached configs are keyed cheaply (verl passes the same reward_kwargs on every call), but never so that a
    value is served the config of another value it merely compares equal to (True == 1 == 1.0, -0.0 == 0.0)."""
    from reward.masksearch_reward import reward_config

    options = {"qa_metric": "f1", "ramp_metric": "em"}
    assert reward_config(options) is reward_config(dict(options))
    assert reward_config({"format_gate": True}).format_gate is True
    with pytest.raises(ValueError, match="format_gate=1.0"):
        reward_config({"format_gate": 1.0})  # not a boolean: an error, not True's cached config
    assert reward_config({"format_gate": 0}).format_gate is False
    assert reward_config({"format_gate": False}) is not reward_config({"format_gate": 0})
    assert reward_config({"min_score": -0.0}).min_score == 0.0
    assert str(reward_config({"min_score": -0.0}).min_score) == "-0.0"
    assert str(reward_config({"min_score": 0.0}).min_score) == "0.0"
    # the same options in another order: equal configs
    assert reward_config({"ramp_metric": "em", "qa_metric": "f1"}) == reward_config(options)


async def test_async_entry_matches_sync():
    for response in (GOOD, trajectory(answer="Eiffel | 1889"), "junk"):
        assert await compute_score("ramp", response, RAMP_GT) == compute_score_sync("ramp", response, RAMP_GT)


# -------------------------------------------------------------------------------------- property tests (hypothesis)

TAGS = ["<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>"]
HERMES_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CALL_JSON = '{"name": "search", "arguments": {"query": "x"}}'
PIECES = [*TAGS, " ", "\n", "Paris", "1889", " | ", "|", "the", "<|im_end|>", "<|endoftext|>", "</s>", "<", ">", "x",
          *HERMES_TAGS, CALL_JSON, "user", "assistant"]
CONFIGS = [
    {},
    {"ramp_metric": "em", "qa_metric": "f1"},
    {"format_weight": 0.1, "format_penalty": -1.0},
    {"format_gate": False, "answer_weight": 2.0, "format_penalty": -0.3},
    {"format_weight": 0.5, "max_score": 1.0, "min_score": -0.2, "format_penalty": -1.0},
    {"ramp_metric": "cover_em", "format": {"allow_untagged_text": True, "require_think": True}},
    {"format_weight": 0.2, "format_penalty": -0.5, "format": {"protocol": "hermes"}},
    {"format_gate": False, "format": {"protocol": "hermes", "require_think": True}},
    {"qa_metric": "recall", "format_weight": 0.1, "format": {"max_answer_words": 2}},
]
# What a row may say about the loop that wrote it (compute_score's extra_info).
EXTRA_INFOS = [None, {"agent_name": TOOL_AGENT_NAME}, {"agent_name": TAG_AGENT_NAME, "index": 3}]
GROUND_TRUTHS = [
    ("ramp", RAMP_GT),
    ("ramp", {"target": ["Paris"], "masks": ["Paris"]}),
    ("ramp", {"masks": [["Paris", "the city of Paris"], "1889", "x"]}),
    ("hotpotqa", {"target": ["Paris", "1889"]}),
    ("nq", "the"),
]


_BOUNDS = [RewardConfig.from_kwargs(kwargs, env={}).bounds() for kwargs in CONFIGS]


def _check(response: str, config_index: int, gt_index: int, extra_index: int = 0) -> None:
    data_source, ground_truth = GROUND_TRUTHS[gt_index]
    extra_info = EXTRA_INFOS[extra_index]
    result = compute_score_sync(data_source, response, ground_truth, extra_info, **CONFIGS[config_index])
    low, high = _BOUNDS[config_index]
    assert tuple(result) == RESULT_KEYS
    assert low - 1e-9 <= result["score"] <= high + 1e-9
    for key in ("acc", "format", "em", "f1", "recall", "cover_em", "judge", "judge_fallback"):
        assert 0.0 <= result[key] <= 1.0
    if result["format"] == 1:
        protocol = {TOOL_AGENT_NAME: "hermes", TAG_AGENT_NAME: "tags"}.get(
            (extra_info or {}).get("agent_name"), CONFIGS[config_index].get("format", {}).get("protocol", "tags")
        )
        assert extract_answer(response, protocol)


# Strings are one primitive draw for Hypothesis (cheap to generate and to shrink): each character of a drawn code
# string stands for one piece of the tag alphabet.
_CODES = "".join(chr(ord("A") + i) for i in range(len(PIECES)))
_PIECE_OF = dict(zip(_CODES, PIECES, strict=True))
tag_strings = st.text(alphabet=_CODES, max_size=40).map(lambda codes: "".join(_PIECE_OF[c] for c in codes))
indices = (st.integers(0, len(CONFIGS) - 1), st.integers(0, len(GROUND_TRUTHS) - 1))
extra_indices = st.integers(0, len(EXTRA_INFOS) - 1)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag_strings, *indices, extra_indices)
def test_random_tag_strings_never_raise_and_stay_in_bounds(response, config_index, gt_index, extra_index):
    _check(response, config_index, gt_index, extra_index)


ANSWERS = ["Gustave Eiffel | 1889", "Paris", "a | b | c", "", "Paris | 1889"]
TAILS = ["", "<|im_end|>", " x", "\n"]
INSERTS = [*TAGS, "|", "<|im_end|>", "x"]


@st.composite
def mutated_trajectories(draw):
    """A valid trajectory, then up to three adversarial edits: drop, duplicate or insert a tag."""
    kinds = draw(st.text(alphabet="ts", max_size=4))
    blocks = [THINK if kind == "t" else search("Eiffel") for kind in kinds]
    text = trajectory(*blocks, answer=draw(st.sampled_from(ANSWERS)), tail=draw(st.sampled_from(TAILS)))
    for op in draw(st.text(alphabet="ddi", max_size=3)):
        at = draw(st.integers(0, 10**6))
        tags = list(re.finditer("|".join(map(re.escape, TAGS)), text))
        if op == "i" or not tags:
            at %= len(text) + 1
            text = text[:at] + INSERTS[draw(st.integers(0, len(INSERTS) - 1))] + text[at:]
        else:
            m = tags[at % len(tags)]
            duplicate = draw(st.booleans())
            text = text[: m.start()] + (m.group() * 2 if duplicate else "") + text[m.end() :]
    return text


@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_trajectories(), *indices)
def test_mutated_trajectories_never_raise_and_stay_in_bounds(response, config_index, gt_index):
    _check(response, config_index, gt_index)


@st.composite
def mutated_hermes_trajectories(draw):
    """A valid hermes trajectory (calls, tool turns, thinks), then up to three edits: drop, duplicate or insert."""
    text = ""
    for kind in draw(st.text(alphabet="tcp", max_size=4)):
        if kind == "t":
            text += THINK
        elif kind == "c":
            text += tool_call("Eiffel") + tool_turn(DOCS)
        else:
            text += tool_call("a") + tool_call("b") + tool_turn(*[DOCS] * draw(st.integers(1, 2)))
    text += answer_block(draw(st.sampled_from(ANSWERS))) + draw(st.sampled_from(TAILS))
    for op in draw(st.text(alphabet="ddi", max_size=3)):
        at = draw(st.integers(0, 10**6))
        tags = list(re.finditer("|".join(map(re.escape, TAGS + HERMES_TAGS)), text))
        if op == "i" or not tags:
            at %= len(text) + 1
            inserts = [*INSERTS, *HERMES_TAGS, CALL_JSON]
            text = text[:at] + inserts[draw(st.integers(0, len(inserts) - 1))] + text[at:]
        else:
            m = tags[at % len(tags)]
            text = text[: m.start()] + (m.group() * 2 if draw(st.booleans()) else "") + text[m.end() :]
    return text


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_hermes_trajectories(), *indices, extra_indices)
def test_mutated_hermes_trajectories_never_raise_and_stay_in_bounds(response, config_index, gt_index, extra_index):
    _check(response, config_index, gt_index, extra_index)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="tcp", max_size=5),
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="<>|"), min_size=1, max_size=12), min_size=1, max_size=4
    ),
    st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=20),
)
def test_generated_valid_hermes_trajectories_pass(kinds, spans, reasoning):
    spans = [s.strip() or "x" for s in spans]
    blocks = {"t": THINK, "c": reasoning + tool_call(reasoning) + tool_turn(DOCS),
              "p": tool_call("a") + tool_call("b") + tool_turn(DOCS, reasoning)}
    response = "".join(blocks[kind] for kind in kinds) + reasoning + answer_block(" | ".join(spans)) + "<|im_end|>"
    result = check_format(response, num_masks=len(spans), rules=HERMES)
    assert result.ok, (result, response)
    assert result.num_searches == kinds.count("c") + 2 * kinds.count("p")
    assert compute_score_sync("ramp", response, {"masks": spans}, {"agent_name": TOOL_AGENT_NAME})["format"] == 1


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200), *indices)
def test_arbitrary_text_never_raises(response, config_index, gt_index):
    _check(response, config_index, gt_index)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="ts", max_size=5),
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="<>|"), min_size=1, max_size=12), min_size=1, max_size=4
    ),
)
def test_generated_valid_trajectories_pass(kinds, spans):
    spans = [s.strip() or "x" for s in spans]
    blocks = [THINK if kind == "t" else search("query") for kind in kinds]
    response = trajectory(*blocks, answer=" | ".join(spans))
    result = check_format(response, num_masks=len(spans))
    assert result.ok, (result, response)
    assert result.num_searches == kinds.count("s")


# ------------------------------------------------------------- fast paths agree with the definitions (reference code)
#
# The scoring code has fast paths (a block-by-block regex walk for the format check, shortcuts for exact answers,
# ...). The functions below are the plain definitions they must equal -- written the straightforward way, as the
# reward was first implemented -- and the property tests compare the two on adversarial inputs.

_REF_TAGS = ["<think>", "<search>", "<information>", "<answer>", "</think>", "</search>", "</information>", "</answer>"]
_REF_TAG_RE = re.compile("|".join(map(re.escape, _REF_TAGS)))


def _reference_check_format(response: str, num_masks: int | None, rules: FormatRules) -> tuple:
    """The tag protocol read tag by tag over the whole response; the result as a plain tuple."""
    pos = num_searches = num_thinks = 0
    awaiting_info = False
    answer = None

    def fail(reason):
        return (False, reason, answer, num_searches, num_thinks, False)

    while (match := _REF_TAG_RE.search(response, pos)) is not None:
        tag = match.group()
        if answer is not None:
            return fail(R.MULTIPLE_ANSWERS if tag == "<answer>" else R.TEXT_AFTER_ANSWER)
        if not rules.allow_untagged_text and pos < match.start() and not response[pos : match.start()].isspace():
            return fail(R.UNTAGGED_TEXT)
        if tag.startswith("</"):
            return fail(R.UNEXPECTED_CLOSE)
        name = tag[1:-1]
        if awaiting_info and name != "information":
            return fail(R.SEARCH_WITHOUT_INFORMATION)
        if name == "information":
            if not awaiting_info:
                return fail(R.INFORMATION_WITHOUT_SEARCH)
            end = response.find("</information>", match.end())
            if end < 0:
                return fail(R.UNCLOSED_TAG)
            awaiting_info, pos = False, end + len("</information>")
            continue
        closing = _REF_TAG_RE.search(response, match.end())
        if closing is None:
            return fail(R.UNCLOSED_TAG)
        if closing.group() != f"</{name}>":
            return fail(R.UNEXPECTED_CLOSE if closing.group().startswith("</") else R.NESTED_TAG)
        body, pos = response[match.end() : closing.start()], closing.end()
        if name == "search":
            if not body.strip():
                return fail(R.EMPTY_SEARCH)
            num_searches, awaiting_info = num_searches + 1, True
        elif name == "think":
            num_thinks += 1
        else:
            answer = body.strip()
    if answer is None:
        return fail(R.NO_ANSWER)
    tail = response[pos:]
    for token in rules.eos_tokens:
        tail = tail.replace(token, "")
    if tail.strip():
        return fail(R.TEXT_AFTER_ANSWER)
    if not answer:
        return fail(R.EMPTY_ANSWER)
    if rules.require_think and num_thinks == 0:
        return fail(R.MISSING_THINK)
    paragraph = False
    if num_masks is not None and len(split_spans(answer)) != num_masks:
        paragraph = (
            rules.allow_paragraph
            and num_masks > 1
            and "|" not in answer
            and len(answer.split()) >= rules.paragraph_min_words
        )
        if not paragraph:
            return fail(R.SPAN_COUNT_MISMATCH)
    return (True, R.OK, answer, num_searches, num_thinks, paragraph)


def _reference_scores(prediction: str, aliases: list[str], word_boundary: bool = True) -> tuple:
    """SQuAD v1.1 metrics (Counter-based F1, as the official script) plus recall and cover-EM, max over aliases."""
    pred = _official_normalize(prediction)
    pred_tokens = pred.split()
    best = None
    for alias in aliases:
        gold = _official_normalize(str(alias))
        gold_tokens = gold.split()
        em = 1.0 if pred == gold else 0.0
        if not gold:
            cover = em
        elif word_boundary:
            cover = 1.0 if f" {gold} " in f" {pred} " else 0.0
        else:
            cover = 1.0 if gold in pred else 0.0
        same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        f1 = recall = 0.0
        if same:
            precision, recall = same / len(pred_tokens), same / len(gold_tokens)
            f1 = 2 * precision * recall / (precision + recall)
        scores = (em, f1, recall, cover)
        best = scores if best is None else tuple(max(pair) for pair in zip(best, scores))
    return best


def _reference_guarded(prediction: str, aliases: list[str], word_boundary: bool) -> tuple:
    """The commitment guard at 0 extra tokens: against each alias, the plain metrics when every token of the
    prediction is a token of the alias (multiset) and some token is shared (or both are empty), else zeros."""
    pred_tokens = Counter(_official_normalize(prediction).split())
    best = (0.0, 0.0, 0.0, 0.0)
    for alias in aliases:
        gold_tokens = Counter(_official_normalize(str(alias)).split())
        committed = not (pred_tokens - gold_tokens) and (bool(pred_tokens & gold_tokens) or pred_tokens == gold_tokens)
        scores = _reference_scores(prediction, [alias], word_boundary) if committed else (0.0, 0.0, 0.0, 0.0)
        best = tuple(max(pair) for pair in zip(best, scores))
    return best


def _reference_spans(answer: str, golds: list, allow_paragraph: bool, min_words: int, word_boundary: bool) -> tuple:
    """RAMP span scoring without a masked passage: (mean, per span, mode). A paragraph-shaped answer to several
    masks cannot be read and scores 0; more parts than masks score 0; each part is guarded."""
    n = len(golds)
    aliases = [[gold] if isinstance(gold, str) else list(gold) for gold in golds]
    zero = (0.0, 0.0, 0.0, 0.0)
    parts = [part.strip() for part in answer.split("|")]
    if allow_paragraph and n > 1 and "|" not in answer and len(answer.split()) >= min_words:
        per_span, mode = [zero] * n, "paragraph"
    elif len(parts) > n:
        per_span, mode = [zero] * n, "mismatch"
    else:
        per_span = [
            _reference_guarded(parts[i], alias_list, word_boundary) if i < len(parts) else zero
            for i, alias_list in enumerate(aliases)
        ]
        mode = "aligned" if len(parts) == n else "mismatch"
    mean = tuple(sum(column) / n for column in zip(*per_span))
    return mean, tuple(per_span), mode


RULE_VARIANTS = [
    FormatRules(),
    FormatRules(allow_untagged_text=True),
    FormatRules(require_think=True, allow_paragraph=False),
    FormatRules(paragraph_min_words=2),
    # tokens that contain one another: removing them one after the other is not the same as "only tokens left"
    FormatRules(eos_tokens=("end", "<|end|>", "<|im_end|>", " ")),
    FormatRules(eos_tokens=()),
]
# whitespace that str.isspace and the regex \s both know beyond ASCII, and text that looks like a tag but is not one
FORMAT_PIECES = [*PIECES, "\t", "\u3000", "\x1c", "\x85", "<thinking>", "< think>", "<|end|>", "end", "a b c d"]
_FORMAT_CODES = "".join(chr(ord("A") + i) for i in range(len(FORMAT_PIECES)))
_FORMAT_PIECE_OF = dict(zip(_FORMAT_CODES, FORMAT_PIECES, strict=True))
format_strings = st.text(alphabet=_FORMAT_CODES, max_size=40).map(lambda c: "".join(_FORMAT_PIECE_OF[x] for x in c))
format_args = (st.sampled_from([None, 1, 2, 3]), st.integers(0, len(RULE_VARIANTS) - 1))


def _assert_format_matches_reference(response: str, num_masks: int | None, rules_index: int) -> None:
    rules = RULE_VARIANTS[rules_index]
    result = check_format(response, num_masks=num_masks, rules=rules)
    assert tuple(result) == _reference_check_format(response, num_masks, rules), response


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(format_strings, *format_args)
def test_format_check_equals_the_reference_on_tag_soup(response, num_masks, rules_index):
    _assert_format_matches_reference(response, num_masks, rules_index)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_trajectories(), *format_args)
def test_format_check_equals_the_reference_on_mutated_trajectories(response, num_masks, rules_index):
    _assert_format_matches_reference(response, num_masks, rules_index)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ts", max_size=5),
    st.lists(st.sampled_from(["q", " ", "  ", "x < y", "<b>", "</informatio>", "\n"]), min_size=1, max_size=3),
    st.sampled_from(["Paris | 1889", " a<b | c ", "", "   ", "one two three four"]),
    st.sampled_from(["", "<|im_end|>", " \n", "<|endoftext|><|endoftext|>", "<|im_end|> x", "<search>"]),
    *format_args,
)
def test_format_check_equals_the_reference_on_long_valid_looking_responses(
    kinds, bodies, answer, tail, num_masks, rules_index
):
    # realistic shapes, with "<" inside bodies and information blocks that quote tags
    docs = "Doc 1 (Title: <answer>) quotes <think> and </search>; x < y.\n" * 3
    blocks = [
        f"<think> {bodies[i % len(bodies)]} </think>\n" if kind == "t" else search(bodies[i % len(bodies)], docs)
        for i, kind in enumerate(kinds)
    ]
    _assert_format_matches_reference("".join(blocks) + answer_block(answer) + tail, num_masks, rules_index)


def test_format_check_equals_the_reference_on_the_hand_written_cases():
    responses = [*WELL_FORMED_CASES, *(case for case, _ in MALFORMED_CASES)]
    for response in responses:
        for num_masks in (None, 1, 2):
            for index in range(len(RULE_VARIANTS)):
                _assert_format_matches_reference(response, num_masks, index)


ANSWER_WORDS = ["Paris", "paris", "the", "a", "An", "New", "York", "1889", "10", "1000", "U.S.A.", "usa", "é", "İ"]
answer_texts = st.lists(
    st.sampled_from([*ANSWER_WORDS, " ", ", ", "-", "!", "\t", "_", "the-end"]), max_size=8
).map("".join)
gold_values = st.one_of(answer_texts, st.lists(answer_texts, min_size=1, max_size=3))


@settings(max_examples=800, deadline=None)
@given(answer_texts, gold_values, st.booleans())
def test_answer_scores_equal_the_squad_reference(prediction, gold, word_boundary):
    aliases = [gold] if isinstance(gold, str) else gold
    expected = _reference_scores(prediction, aliases, word_boundary)
    assert tuple(score_answer(prediction, gold, word_boundary=word_boundary)) == expected
    # the same prediction spelled exactly like an alias takes the exact-match shortcut
    assert tuple(score_answer(aliases[0], gold, word_boundary=word_boundary)) == _reference_scores(
        aliases[0], aliases, word_boundary
    )


span_answers = st.tuples(st.lists(answer_texts, max_size=5), st.sampled_from(["|", " | ", " |"])).map(
    lambda parts_and_bar: parts_and_bar[1].join(parts_and_bar[0])
)


@settings(max_examples=600, deadline=None)
@given(
    span_answers,
    st.lists(gold_values, min_size=1, max_size=4),
    st.booleans(),
    st.integers(1, 6),
    st.booleans(),
)
@example("Paris | 1889", ["Paris", "1889"], True, 12, True)  # every mask exact
@example("Paris|1889 | the", [["x", "Paris"], "1889", "a"], True, 12, False)  # exact, and "" == ""
@example("U.S.A. | 10", ["usa", "1000"], False, 1, False)  # exact after normalising; "10" inside "1000"
def test_span_scores_equal_the_reference(answer, golds, allow_paragraph, min_words, word_boundary):
    scored = score_spans(
        answer, golds, allow_paragraph=allow_paragraph, paragraph_min_words=min_words, word_boundary=word_boundary
    )
    mean, per_span, mode = _reference_spans(answer, golds, allow_paragraph, min_words, word_boundary)
    assert (tuple(scored.mean), tuple(map(tuple, scored.per_span)), scored.mode) == (mean, per_span, mode)
    assert all(isinstance(s, MatchScores) for s in (scored.mean, *scored.per_span))


def _expected_result(data_source: str, response: str, ground_truth, kwargs: dict) -> dict:
    """compute_score_sync assembled from the public pieces, each checked against its reference above."""
    config = RewardConfig.from_kwargs(kwargs)
    target = parse_ground_truth(data_source, ground_truth)
    rules = config.format
    fmt = check_format(response, num_masks=len(target.blanks) if target.is_ramp else None, rules=rules)
    answer = fmt.answer if fmt.answer is not None else extract_answer(response, rules.protocol)
    if not answer:
        match = MatchScores()
    elif target.is_ramp:
        spans = score_spans(
            answer, target.blanks, allow_paragraph=rules.allow_paragraph, paragraph_min_words=rules.paragraph_min_words,
            masked_passage=target.masked_passage, max_extra_tokens=config.extra_token_allowance,
        )
        match = spans.mean
    else:
        match = score_answer(answer, target.blanks[0], max_extra_tokens=config.extra_token_allowance)
    score, counted = combine(fmt.ok, match.get(config.metric_for(target.is_ramp)), config)
    return {
        "score": score,
        "acc": counted,
        "format": float(fmt.ok),
        "format_code": int(fmt.reason),
        "em": match.em,
        "f1": match.f1,
        "recall": match.recall,
        "cover_em": match.cover_em,
        "judge": 0.0,
        "judge_fallback": 0.0,
        "num_searches": fmt.num_searches,
    }


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(tag_strings, mutated_trajectories()), *indices)
def test_compute_score_is_the_composition_of_the_parts(response, config_index, gt_index):
    data_source, ground_truth = GROUND_TRUTHS[gt_index]
    kwargs = CONFIGS[config_index]
    result = compute_score_sync(data_source, response, ground_truth, **kwargs)
    assert result == _expected_result(data_source, response, ground_truth, kwargs)


# -------------------------------------------------------------------------------- loading through verl's machinery


def _tiny_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer trained here on a few lines (no downloads), saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([GOOD, "Fill in the [mask] tokens."] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def _compose(manager: str, tokenizer_dir: Path, extra: list[str]):
    import verl.trainer.config
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(verl.trainer.config.__file__).parent)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                "reward.custom_reward_function.path=pkg://reward.masksearch_reward",
                "reward.custom_reward_function.name=compute_score",
                f"reward.reward_manager.name={manager}",
                f"actor_rollout_ref.model.path={tokenizer_dir}",
                *extra,
            ],
        )


def _batch(tokenizer, rows: list[tuple[str, str, object]]):
    import torch
    from verl import DataProto

    prompts = [tokenizer.encode("Fill in the [mask] tokens.") for _ in rows]
    responses = [tokenizer.encode(response) for _, response, _ in rows]
    plen, rlen, pad = max(map(len, prompts)), max(map(len, responses)), tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (plen - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (rlen - len(r)) for r in responses])
    mask = torch.tensor(
        [
            [0] * (plen - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (rlen - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask},
        non_tensors={
            "data_source": np.array([ds for ds, _, _ in rows], dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": gt} for _, _, gt in rows], dtype=object),
            "extra_info": np.array([{"index": i, "num_masks": 2} for i in range(len(rows))], dtype=object),
        },
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return _tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


ROWS = [
    ("ramp", GOOD, RAMP_GT),  # perfect
    ("ramp", trajectory(THINK, answer="Eiffel | 1889"), RAMP_GT),  # recall 0.75, em 0.5
    ("ramp", trajectory(THINK, tail=" extra"), RAMP_GT),  # right answer, broken format
    ("hotpotqa", "<think> x </think><answer> Paris </answer><|im_end|>", {"target": np.array(["Paris"])}),
]


@pytest.mark.parametrize("manager", ["naive", "dapo"])
async def test_verl_reward_loop_loads_and_scores(manager, tokenizer_dir):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    config = _compose(manager, tokenizer_dir, ["+reward.custom_reward_function.reward_kwargs.qa_metric=f1"])
    worker = RewardLoopWorker(config)  # builds the manager with verl's load_reward_manager / get_custom_reward_fn
    assert type(worker.reward_manager).__name__ == {"naive": "NaiveRewardManager", "dapo": "DAPORewardManager"}[manager]
    assert worker.reward_manager.is_async_reward_score
    outputs = await worker.compute_score_batch(_batch(worker.input_tokenizer, ROWS))

    scores = [o["reward_score"] for o in outputs]
    assert scores == pytest.approx([1.0, 0.75, 0.0, 1.0])
    infos = [o["reward_extra_info"] for o in outputs]
    assert [i["em"] for i in infos] == pytest.approx([1.0, 0.5, 1.0, 1.0])
    assert [i["format"] for i in infos] == [1.0, 1.0, 0.0, 1.0]
    # verl stacks every key of the first sample into arrays: all samples must carry the same keys
    assert all(set(i) == set(infos[0]) >= set(RESULT_KEYS) for i in infos)
    stacked = {key: np.array([i[key] for i in infos]) for key in infos[0]}
    assert stacked["acc"].dtype.kind == "f" and stacked["acc"].tolist() == pytest.approx([1.0, 0.75, 0.0, 1.0])


async def test_verl_dapo_overlong_penalty_and_reward_kwargs(tokenizer_dir):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    overrides = [
        "+reward.custom_reward_function.reward_kwargs.ramp_metric=em",
        "+reward.custom_reward_function.reward_kwargs.format.require_think=true",
        "+reward.reward_kwargs.max_resp_len=24",
        "+reward.reward_kwargs.overlong_buffer_cfg.enable=true",
        "+reward.reward_kwargs.overlong_buffer_cfg.len=16",
        "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
        "+reward.reward_kwargs.overlong_buffer_cfg.log=true",
    ]
    worker = RewardLoopWorker(_compose("dapo", tokenizer_dir, overrides))
    rows = [("ramp", "<answer> Gustave Eiffel | 1889 </answer>", RAMP_GT), ROWS[1]]
    data = _batch(worker.input_tokenizer, rows)
    outputs = await worker.compute_score_batch(data)
    short, long = outputs
    # reward_kwargs reached compute_score: require_think fails the first, ramp_metric=em scores the second 0.5
    assert short["reward_extra_info"]["format_code"] == R.MISSING_THINK and short["reward_extra_info"]["score"] == 0
    assert long["reward_extra_info"]["score"] == 0.5
    # the second response is far longer than max_resp_len - buffer: DAPO adds its (negative) overlong penalty
    length = int(data.batch["attention_mask"][1, data.batch["prompts"].shape[1] :].sum())
    expected_penalty = min(-(length - (24 - 16)) / 16 * 1.0, 0)
    assert expected_penalty < 0
    assert float(long["reward_extra_info"]["overlong_reward"]) == pytest.approx(expected_penalty)
    assert float(long["reward_score"]) == pytest.approx(0.5 + expected_penalty)


def test_verl_get_custom_reward_fn_passes_reward_kwargs(tokenizer_dir):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = _compose("naive", tokenizer_dir, ["+reward.custom_reward_function.reward_kwargs.ramp_metric=em"])
    fn = get_custom_reward_fn(config)
    result = asyncio.run(fn(data_source="ramp", solution_str=trajectory(answer="Eiffel | 1889"), ground_truth=RAMP_GT))
    assert result["score"] == 0.5
