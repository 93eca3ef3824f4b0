"""Adversaries of the answer reward: what would a policy that wants reward without doing the task write?

For generated RAMP items (a passage of filler words and named entities, 1-4 of them masked) and QA questions, and
with the reward kwargs of every shipped recipe (and each rule-based answer metric), every adversary below must score
at most a plainly wrong but well-formed answer + 0.05, while the right answer scores at least 0.9 in each form the
prompt allows: the spans joined by `` | ``, or the reconstructed passage. Each adversary is wrapped in an otherwise
well-formed response of the row's protocol (our tags, or verl's hermes tool calls).

Adversaries: candidate lists (the right spans among the passage's other entities and filler words, in any order,
with any separator) as the whole answer, in every part, or as more parts than masks; duplicated spans and parts;
the right span padded with other words; the masked passage (or the passage with wrong fills) with the right spans
appended; the passage written twice, once with the right fills; the right answer only inside ``<think>``; several
``<answer>`` blocks.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from envs.prompts import MASK_TOKEN, TAG_AGENT_NAME, TOOL_AGENT_NAME, answer_block, information_block
from masksearch_rl.rl.launch import recipe_names
from reward.masksearch_reward import compute_score_sync, reset_caches

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
SLACK = 0.05

# Entities have pairwise disjoint tokens (distinct people, places, dates are what a passage masks); filler words are
# disjoint from them, so "another entity" is never a part of the right one.
ENTITIES = [
    "Paris", "Lyon", "Gustave Eiffel", "Maurice Koechlin", "1889", "1887", "Champ de Mars", "Seine", "324", "Rhone",
    "Marie Curie", "Warsaw", "Nobel Prize", "1903", "Sorbonne", "Pierre Janssen", "Montmartre", "4,000", "Louvre",
    "Napoleon III", "Haussmann", "Bordeaux", "1925", "Jules Verne", "Nantes", "Alps", "2.5 million", "Versailles",
    "Claude Monet", "Giverny", "Le Havre", "1840", "Orsay",
]  # fmt: skip
FILLER = (
    "was built in by the of and for a with its from at became known later during after which tower city river "
    "engineer company opened designed completed first named after it its famous"
).split()
# Padding must be a word of its own after normalisation (articles are dropped by it, as in SQuAD).
PADDING = [word for word in FILLER if word not in ("a", "an", "the")]
SEPARATORS = [" ", ", ", "; ", " and ", " or ", "\n", " / ", " - ", ",", " ... "]
DOCS = "Doc 1 (Title: Some page) Some retrieved text that mentions nothing useful."


# ------------------------------------------------------------------------------------------------ the recipes


@lru_cache(maxsize=None)
def _recipe_reward_kwargs(recipe: str) -> str:
    """The recipe's ``reward.custom_reward_function.reward_kwargs``, composed the way main_ppo composes it (JSON)."""
    from hydra import compose, initialize_config_dir

    group, name = recipe.split("/")
    with initialize_config_dir(config_dir=str(CONFIGS / group), version_base=None):
        cfg = compose(config_name=name)
    kwargs = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs, resolve=True)
    return json.dumps(kwargs, sort_keys=True)


def _reward_settings() -> list[tuple[str, str]]:
    """(label, kwargs as JSON): every shipped recipe, and the defaults with each rule-based metric."""
    settings_ = [(recipe, _recipe_reward_kwargs(recipe)) for recipe in recipe_names()]
    for metric in ("recall", "f1", "em", "cover_em"):
        settings_.append((f"defaults/{metric}", json.dumps({"ramp_metric": metric, "qa_metric": metric})))
    return settings_


@pytest.fixture(scope="module", autouse=True)
def _verl_plugins_and_fresh_configs():
    import verl  # noqa: F401  (the recipes name our plugins' config groups; composition needs no more)

    reset_caches()
    yield
    reset_caches()


def test_every_shipped_recipe_is_covered():
    recipes = {label for label, _ in _reward_settings()}
    assert {"ramp_dapo/qwen2.5-1.5b_8gpu", "hotpotqa_dapo/qwen2.5-1.5b_8gpu", "quickstart/tiny_cpu"} <= recipes
    assert len(recipes) == len(recipe_names()) + 4


# ------------------------------------------------------------------------------------------- responses


def _tool_call(query: str) -> str:
    return "<tool_call>" + json.dumps({"name": "search", "arguments": {"query": query}}) + "</tool_call>"


def respond(answer_text: str, protocol: str, think: str = "I need to look this up.") -> str:
    """A well-formed response of ``protocol`` around the answer body ``answer_text`` (written as is)."""
    if protocol == "tags":
        return (
            f"<think> {think} </think>\n<search> the passage </search>{information_block(DOCS)}"
            f"<answer> {answer_text} </answer><|im_end|>"
        )
    return (
        f"<think> {think} </think>\n{_tool_call('the passage')}\nuser\n<tool_response>\n{DOCS}\n</tool_response>\n"
        f"assistant\n<answer> {answer_text} </answer><|im_end|>"
    )


AGENTS = {"tags": TAG_AGENT_NAME, "hermes": TOOL_AGENT_NAME}


def score(data_source: str, response: str, ground_truth: dict, protocol: str, kwargs_json: str) -> float:
    extra_info = {"agent_name": AGENTS[protocol]}
    return compute_score_sync(data_source, response, ground_truth, extra_info, **json.loads(kwargs_json))["score"]


# ------------------------------------------------------------------------------------------- RAMP items


@st.composite
def ramp_items(draw):
    """(passage, masked passage, gold spans, the passage's other entities), passages of at least 12 words."""
    entities = draw(st.lists(st.sampled_from(ENTITIES), min_size=2, max_size=7, unique=True))
    k = draw(st.integers(1, min(4, len(entities))))
    masked_positions = set(draw(st.lists(st.integers(0, len(entities) - 1), min_size=k, max_size=k, unique=True)))
    pieces: list[tuple[str, bool]] = []  # (text, masked)
    for i, entity in enumerate(entities):
        filler = draw(st.lists(st.sampled_from(FILLER), min_size=2, max_size=5))
        pieces.append((" ".join(filler).capitalize() if i == 0 else " ".join(filler), False))
        pieces.append((entity, i in masked_positions))
        if draw(st.booleans()):
            pieces.append(("." if i < len(entities) - 1 else "", False))
    pieces.append((" ".join(draw(st.lists(st.sampled_from(FILLER), min_size=0, max_size=3))), False))
    pieces.append((".", False))

    def join(fill) -> str:
        text = ""
        for piece, masked in pieces:
            piece = fill(piece) if masked else piece
            if not piece:
                continue
            text += piece if (piece in (".", ",") or not text) else " " + piece
        return text

    passage = join(lambda span: span)
    masked = join(lambda span: MASK_TOKEN)
    golds = [piece for piece, is_masked in pieces if is_masked]
    others = [e for i, e in enumerate(entities) if i not in masked_positions]
    if len(passage.split()) < 12:
        passage, masked = passage + " " + " ".join(FILLER[:10]) + ".", masked + " " + " ".join(FILLER[:10]) + "."
    return passage, masked, golds, others


def restore(masked: str, fills: list[str]) -> str:
    parts = masked.split(MASK_TOKEN)
    return parts[0] + "".join(fill + part for fill, part in zip(fills, parts[1:]))


def wrong_fills(golds: list[str]) -> list[str]:
    """Well-formed spans that share no token with any entity."""
    return ["Zorblax Quint"] * len(golds)


@st.composite
def ramp_adversaries(draw, passage: str, masked: str, golds: list[str], others: list[str]):
    """(name, answer body or whole response marker) pairs: each a way to seek credit without committing."""
    n = len(golds)
    fillers = draw(st.lists(st.sampled_from(PADDING), min_size=1, max_size=4))  # at least one wrong candidate
    candidates = draw(st.permutations([*golds, *others, *fillers]))
    sep = draw(st.sampled_from(SEPARATORS))
    listed = sep.join(candidates)
    wrong = wrong_fills(golds)
    pad = draw(st.sampled_from([*PADDING, *others]))
    spans_sep = draw(st.sampled_from([" | ", "|", " |", "| "]))
    bodies = {
        "candidate list": listed,
        "candidate list in every part": spans_sep.join([listed] * n),
        "candidates as more parts than masks": spans_sep.join(draw(st.permutations([*golds, *others, "Zorblax"]))),
        "each right span doubled": spans_sep.join(f"{g} {g}" for g in golds),
        "right parts written twice": spans_sep.join(golds + golds),
        "right span padded": spans_sep.join(draw(st.sampled_from([f"{g} {pad}", f"{pad} {g}"])) for g in golds),
        "other entities with the right span": spans_sep.join(" ".join([g, *others, *fillers[:1]]) for g in golds),
        "masked passage, spans appended": masked + sep + sep.join(golds),
        "passage without masks, spans appended": masked.replace(MASK_TOKEN, "") + sep + sep.join(golds),
        "passage with wrong fills, spans appended": restore(masked, wrong) + sep + sep.join(golds),
        "passage twice, wrong then right": restore(masked, wrong) + " " + passage,
        "passage twice, right then wrong": passage + " " + restore(masked, wrong),
        "passage with every candidate in each mask": restore(masked, [listed] * n),
    }
    return bodies


def _ramp_case(item, protocol: str, kwargs_json: str):
    passage, masked, golds, _ = item
    gt = {"target": golds, "masks": golds, "masked_passage": masked}
    wrong = score("ramp", respond(" | ".join(wrong_fills(golds)), protocol), gt, protocol, kwargs_json)
    return gt, wrong


SETTINGS = _reward_settings()
PROTOCOLS = ["tags", "hermes"]


@pytest.mark.parametrize("label,kwargs_json", SETTINGS, ids=[label for label, _ in SETTINGS])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_ramp_adversaries_earn_no_more_than_a_wrong_answer(label, kwargs_json, protocol, data):
    item = data.draw(ramp_items())
    passage, masked, golds, others = item
    gt, wrong = _ramp_case(item, protocol, kwargs_json)
    right_spans = score("ramp", respond(" | ".join(golds), protocol), gt, protocol, kwargs_json)
    right_passage = score("ramp", respond(passage, protocol), gt, protocol, kwargs_json)
    assert right_spans >= 0.9, (label, golds)
    assert right_passage >= 0.9, (label, passage, masked)
    assert wrong <= right_spans - 0.5  # the test means something: right and wrong are far apart

    for name, body in data.draw(ramp_adversaries(passage, masked, golds, others)).items():
        got = score("ramp", respond(body, protocol), gt, protocol, kwargs_json)
        assert got <= wrong + SLACK, (label, name, body, golds, got, wrong)

    right, bad = " | ".join(golds), " | ".join(wrong_fills(golds))
    listed = " ".join(data.draw(st.permutations([*golds, *others])))
    whole_responses = {
        "right answer only in think": respond(bad, protocol, think=f"The answer is {right}"),
        "right answer in think, no answer": respond(bad, protocol, think=right).split("<answer>")[0] + "<|im_end|>",
        "two answers, wrong then right": respond(bad, protocol).replace("<|im_end|>", answer_block(right)),
        "two answers, right then wrong": respond(right, protocol).replace("<|im_end|>", answer_block(bad)),
        "two answers, list then right": respond(listed, protocol).replace("<|im_end|>", answer_block(right)),
        "answer inside think": respond(bad, protocol, think=answer_block(right)),
    }
    for name, response in whole_responses.items():
        got = score("ramp", response, gt, protocol, kwargs_json)
        assert got <= wrong + SLACK, (label, name, response, got, wrong)


# ------------------------------------------------------------------------------------------- QA rows


@st.composite
def qa_items(draw):
    aliases = draw(st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=2, unique=True))
    others = [e for e in draw(st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=6, unique=True))
              if e not in aliases]  # fmt: skip
    question = "Which " + " ".join(draw(st.lists(st.sampled_from(FILLER), min_size=3, max_size=8))) + "?"
    return question, aliases, others


@pytest.mark.parametrize("label,kwargs_json", SETTINGS, ids=[label for label, _ in SETTINGS])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_qa_adversaries_earn_no_more_than_a_wrong_answer(label, kwargs_json, protocol, data):
    question, aliases, others = data.draw(qa_items())
    gt = {"target": aliases}
    gold = data.draw(st.sampled_from(aliases))
    wrong = score("hotpotqa", respond("Zorblax Quint", protocol), gt, protocol, kwargs_json)
    assert score("hotpotqa", respond(gold, protocol), gt, protocol, kwargs_json) >= 0.9
    sep = data.draw(st.sampled_from(SEPARATORS))
    listed = sep.join(data.draw(st.permutations([*aliases, *others, *PADDING[:3]])))
    pad = data.draw(st.sampled_from(PADDING))
    bodies = {
        "candidate list": listed,
        "answer doubled": f"{gold} {gold}",
        "answer padded": data.draw(st.sampled_from([f"{gold} {pad}", f"{pad} {gold}", f"{gold}, {pad} {pad}"])),
        "question with the answer appended": f"{question} {gold}",
        "answer among other entities": sep.join([*others, pad, gold]),
    }
    for name, body in bodies.items():
        got = score("hotpotqa", respond(body, protocol), gt, protocol, kwargs_json)
        assert got <= wrong + SLACK, (label, name, body, got, wrong)
    for name, response in {
        "answer only in think": respond("Zorblax Quint", protocol, think=f"It is {gold}"),
        "two answers": respond("Zorblax Quint", protocol).replace("<|im_end|>", answer_block(gold)),
    }.items():
        got = score("hotpotqa", response, gt, protocol, kwargs_json)
        assert got <= wrong + SLACK, (label, name, response, got, wrong)
