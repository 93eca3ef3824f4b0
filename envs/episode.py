"""What an episode is: the one rule every driver of the search protocol follows.

An episode is think -> search -> information -> ... -> answer, written by the policy and the environment together.
Three drivers run it -- verl's agent loop during RL (:mod:`envs.agent_loop`, token ids), the standalone rollout
over a served or local model (:mod:`envs.rollout`: self-evolve teachers, eval, the SFT probe) -- and they must agree
on what each policy turn leads to, or RL, the SFT probe and eval measure different tasks. This module is that
agreement; the drivers only generate, search and build their own record.

After each policy turn, :meth:`EpisodeRules.next_move` reads the turn's stop tag (``</search>``, ``</answer>`` or
none) and says what happens next:

==========================  =================================================================================
``answer``                  the turn closed ``<answer>``: the episode is over, answered
``end``                     the turn ended without a tag (EOS, empty, or out of tokens): over, unanswered
``search``                  a search within the limit: answer it with ``<information>`` and go on
``limit_notice``            the first search past ``max_searches``: reply with :data:`SEARCH_LIMIT_REACHED`
                            ("answer now") instead of results, and give the policy one more turn
``search_limit``            a search after that notice: over, unanswered
==========================  =================================================================================

The empty or missing query (``<search></search>``) is a search like any other: it counts against the limit and the
environment answers it with a message saying the query was empty (:func:`envs.search_client.search_once`).
"""

from __future__ import annotations

from dataclasses import dataclass

from envs.prompts import ANSWER_CLOSE, SEARCH_CLOSE, SEARCH_LIMIT_REACHED

ANSWER = "answer"
END = "end"
SEARCH = "search"
LIMIT_NOTICE = "limit_notice"
SEARCH_LIMIT = "search_limit"
MOVES = (ANSWER, END, SEARCH, LIMIT_NOTICE, SEARCH_LIMIT)


@dataclass
class EpisodeRules:
    """The search budget of one episode and the moves it allows (module docstring). One instance per episode."""

    max_searches: int
    searches: int = 0  # search requests seen so far, the notice and the one after it included

    def __post_init__(self) -> None:
        if not isinstance(self.max_searches, int) or self.max_searches < 0:
            raise ValueError(f"max_searches must be an integer >= 0, got {self.max_searches!r}")

    def next_move(self, stop_tag: str | None) -> str:
        """What the policy's turn that ended with ``stop_tag`` leads to (one of :data:`MOVES`)."""
        if stop_tag == ANSWER_CLOSE:
            return ANSWER
        if stop_tag != SEARCH_CLOSE:
            return END
        self.searches += 1
        over = self.searches - self.max_searches
        if over <= 0:
            return SEARCH
        return LIMIT_NOTICE if over == 1 else SEARCH_LIMIT

    @property
    def limit_notice(self) -> str:
        """The text the environment answers the first search past the limit with."""
        return SEARCH_LIMIT_REACHED.format(limit=self.max_searches)

    @property
    def max_policy_turns(self) -> int:
        """The most policy turns an episode can take: every allowed search, the notice's turn and the last one."""
        return self.max_searches + 2
