"""The one episode rule (envs/episode.py) and the drivers that follow it: the standalone rollout here; verl's agent
loop in test_envs_agent_loop.py; the SFT probe through the rollout."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from envs import episode as moves
from envs.episode import EpisodeRules
from envs.prompts import ANSWER_CLOSE, SEARCH_CLOSE, SEARCH_LIMIT_REACHED
from envs.rollout import FINISH_ANSWER, FINISH_NO_TAG, FINISH_SEARCH_LIMIT, PolicyReply, run_episode
from envs.search_client import SearchOutcome

TAGS = st.sampled_from([SEARCH_CLOSE, ANSWER_CLOSE, None])


def _play(max_searches: int, tags: list[str | None]) -> list[str]:
    """The moves of an episode whose turns end with ``tags``, up to the move that ends it."""
    rules, played = EpisodeRules(max_searches), []
    for tag in tags:
        played.append(rules.next_move(tag))
        if played[-1] in (moves.ANSWER, moves.END, moves.SEARCH_LIMIT):
            break
    return played


@given(st.integers(0, 5), st.lists(TAGS, max_size=12))
def test_an_episode_answers_at_most_its_budget_then_one_notice_then_ends(max_searches, tags):
    played = _play(max_searches, tags)
    assert played.count(moves.SEARCH) <= max_searches
    assert played.count(moves.LIMIT_NOTICE) <= 1 and played.count(moves.SEARCH_LIMIT) <= 1
    if moves.LIMIT_NOTICE in played:  # the notice comes right after the last answered search
        assert played[: played.index(moves.LIMIT_NOTICE)] == [moves.SEARCH] * max_searches
    if moves.SEARCH_LIMIT in played:
        assert played[-2:] == [moves.LIMIT_NOTICE, moves.SEARCH_LIMIT]
    assert len(played) <= EpisodeRules(max_searches).max_policy_turns
    ends = [m for m in played if m in (moves.ANSWER, moves.END, moves.SEARCH_LIMIT)]
    assert len(ends) <= 1 and (not ends or played[-1] == ends[0])


def test_the_rule_in_words():
    assert _play(2, [SEARCH_CLOSE, SEARCH_CLOSE, SEARCH_CLOSE, ANSWER_CLOSE]) == [
        moves.SEARCH, moves.SEARCH, moves.LIMIT_NOTICE, moves.ANSWER]
    assert _play(1, [SEARCH_CLOSE, SEARCH_CLOSE, SEARCH_CLOSE]) == [moves.SEARCH, moves.LIMIT_NOTICE,
                                                                    moves.SEARCH_LIMIT]
    assert _play(0, [SEARCH_CLOSE, ANSWER_CLOSE]) == [moves.LIMIT_NOTICE, moves.ANSWER]
    assert _play(3, [None]) == [moves.END]
    assert EpisodeRules(2).limit_notice == SEARCH_LIMIT_REACHED.format(limit=2)
    with pytest.raises(ValueError, match="max_searches"):
        EpisodeRules(-1)


class _ScriptedPolicy:
    """Plays fixed turns, in order."""

    def __init__(self, turns: list[str]):
        self.turns = list(turns)

    async def generate(self, messages, transcript, *, stop, max_tokens):
        return PolicyReply(self.turns.pop(0), "stop")


class _Search:
    def __init__(self):
        self.queries: list[str] = []

    async def search(self, query, exclusion=None):
        self.queries.append(query)
        return SearchOutcome(text=f"Doc 1 (Title: T) about {query}", latency_s=0.0)


@pytest.mark.parametrize(("max_turns", "turns", "finish", "answered"), [
    (2, ["<search> a </search>", "<search> b </search>", "<answer> x </answer>"], FINISH_ANSWER, ["a", "b"]),
    (1, ["<search> a </search>", "<search> b </search>", "<search> c </search>"], FINISH_SEARCH_LIMIT, ["a"]),
    (1, ["<search> a </search>", "<search> b </search>", "<answer> x </answer>"], FINISH_ANSWER, ["a"]),
    (3, ["<think> no tags </think>"], FINISH_NO_TAG, []),
])
def test_the_rollout_follows_the_rule(max_turns, turns, finish, answered):
    search = _Search()
    episode = asyncio.run(run_episode(_ScriptedPolicy(turns), search, [{"role": "user", "content": "q"}],
                                      max_turns=max_turns))
    assert episode.finish == finish
    assert search.queries == answered  # only searches within the budget reach the backend
    expected = _play(max_turns, [SEARCH_CLOSE if "</search>" in t else ANSWER_CLOSE if "</answer>" in t else None
                                 for t in turns])
    assert len(episode.turns) == len(expected)
    if moves.LIMIT_NOTICE in expected:
        notice_turn = episode.turns[expected.index(moves.LIMIT_NOTICE)]
        assert notice_turn.information == EpisodeRules(max_turns).limit_notice
