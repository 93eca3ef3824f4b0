"""A standalone async search-agent rollout over any OpenAI-compatible server, in our tag protocol.

Who uses it: self-evolve distillation (a served teacher writes trajectories for new RAMP items) and the eval
harness (a served policy answers benchmark questions). Both need what verl's agent loop does during RL --
generate until ``</search>`` or ``</answer>``, search, append an ``<information>`` block, go on -- but against a
served model (vLLM, DashScope, ...) instead of verl's rollout workers, so this module speaks text, not token ids.
Tag handling is shared with the RL loop (:func:`envs.prompts.find_stop`, :func:`envs.prompts.parse_query`,
:func:`envs.prompts.information_block`) and searches go through :func:`envs.search_client.search_once`, so a policy
sees the same text here as in training. Nothing here raises for a bad model turn or a failed search: problems are
recorded on the :class:`Episode` (``finish``, ``errors``) and the caller decides what to keep.

Public API (kept stable; the eval harness imports it)::

    episode = await run_episode(policy, search, messages, max_turns=4, max_new_tokens=2048)
    episode.answer / .finish / .turns / .searches / .information / .raw / .errors / .to_messages()

    PolicyClient           Protocol: ``await policy.generate(messages, transcript, stop=..., max_tokens=...)``
    ChatPolicy(llm, mode)  PolicyClient over ``/v1/chat/completions`` (masksearch_rl.llm.LLMClient)
    CompletionPolicy(llm, tokenizer)   PolicyClient over ``/v1/completions`` with the chat template rendered here
    SearchEnv(settings, backend)       what ``search`` is: SearchSettings + a backend (see :func:`make_search_env`)

How a transcript is shown to the model (``ChatPolicy.mode``):

* ``"continue"`` (default; needs vLLM/SGLang): one assistant message holding everything so far, completed with
  ``continue_final_message`` -- exactly the single-assistant-turn text verl's RL loop trains on.
* ``"turns"`` (any chat API): each policy turn is an assistant message and each ``<information>`` block a message of
  role ``info_role`` -- exactly how the SFT parquet renders trajectories (:meth:`Episode.to_messages`), so an
  SFT-trained teacher sees the layout it was trained on.
* :class:`CompletionPolicy` renders the chat template locally and continues the raw text (any completions server).

Limits are the RL loop's, from one rule (:class:`envs.episode.EpisodeRules`): at most ``max_turns`` searches are
answered; the next search gets the "limit reached, answer now" message and one more turn; a search after that ends
the episode (``finish="search_limit"``).
``max_new_tokens`` bounds each generate call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from envs import episode as episode_rules
from envs.episode import EpisodeRules
from envs.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    STOP_STRINGS,
    find_stop,
    information_block,
    parse_query,
)
from envs.search_client import SearchOutcome, SearchSettings, search_once, shared_backend
from masksearch_rl.llm import Completion, LLMClient, LLMError
from masksearch_rl.retrieval.exclusion import SearchExclusion
from masksearch_rl.retrieval.types import SearchBackend

logger = logging.getLogger(__name__)

# Episode.finish values.
FINISH_ANSWER = "answer"  # a complete <answer> block: the only finish that counts as answered
FINISH_SEARCH_LIMIT = "search_limit"  # searched again after the "limit reached" notice
FINISH_NO_TAG = "no_tag"  # a turn ended without </search> or </answer> (EOS, or empty)
FINISH_LENGTH = "length"  # a turn hit max_new_tokens, or the episode hit max_policy_calls
FINISH_POLICY_ERROR = "policy_error"  # the policy endpoint failed after its retries
FINISHES = (FINISH_ANSWER, FINISH_SEARCH_LIMIT, FINISH_NO_TAG, FINISH_LENGTH, FINISH_POLICY_ERROR)

# Turn.search_error values for searches past the limit: the policy's move, not a failure of the search (counted in
# Episode.search_limit_hits, not search_errors, as the RL loop's extra fields do).
LIMIT_REACHED = "search limit reached"
AFTER_LIMIT_NOTICE = "search after the limit notice"
LIMIT_NOTICES = (LIMIT_REACHED, AFTER_LIMIT_NOTICE)


# ------------------------------------------------------------------------------------------------ data types
@dataclass
class Segment:
    """One piece of the transcript: policy text (``kind="policy"``) or an environment block (``kind="info"``,
    ``text`` is the whole ``<information>`` block as :func:`information_block` renders it)."""

    kind: str
    text: str


@dataclass
class Turn:
    """One policy turn and, when it ended with a search, what the environment answered."""

    text: str  # the policy's text, through its stop tag
    query: str | None = None  # the search query ("" when the tags were empty), None when no search
    information: str | None = None  # the text inside <information> (None: not answered)
    search_error: str | None = None
    search_latency_s: float = 0.0
    finish_reason: str | None = None  # what the server said (stop, length, ...)


@dataclass
class Episode:
    """A finished rollout. ``raw`` is the single assistant text as the RL loop would build it (policy turns with
    the information blocks in between); ``answer`` is the body of the ``<answer>`` block (None if never given)."""

    prompt: list[dict[str, Any]]
    turns: list[Turn] = field(default_factory=list)
    answer: str | None = None
    finish: str = FINISH_NO_TAG
    errors: list[str] = field(default_factory=list)
    policy_calls: int = 0
    latency_s: float = 0.0

    @property
    def transcript(self) -> list[Segment]:
        segments = []
        for turn in self.turns:
            segments.append(Segment("policy", turn.text))
            if turn.information is not None:
                segments.append(Segment("info", information_block(turn.information)))
        return segments

    @property
    def raw(self) -> str:
        return "".join(segment.text for segment in self.transcript)

    @property
    def searches(self) -> list[str]:
        return [turn.query for turn in self.turns if turn.query is not None]

    @property
    def information(self) -> list[str]:
        return [turn.information for turn in self.turns if turn.information is not None]

    @property
    def search_count(self) -> int:
        return len(self.searches)

    @property
    def search_errors(self) -> int:
        """Searches that failed (empty or over-long query, backend down or slow); limit hits are not failures."""
        return sum(turn.search_error is not None and turn.search_error not in LIMIT_NOTICES for turn in self.turns)

    @property
    def search_limit_hits(self) -> int:
        return sum(turn.search_error in LIMIT_NOTICES for turn in self.turns)

    def to_messages(self, info_role: str = "tool") -> list[dict[str, str]]:
        """Prompt + trajectory as chat messages: policy turns are ``assistant`` messages (trained on), each
        ``<information>`` block a message of ``info_role`` (loss-masked by verl's MultiTurnSFTDataset)."""
        return [dict(m) for m in self.prompt] + transcript_messages(self.transcript, info_role)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (the raw agent log)."""
        return {
            "prompt": self.prompt,
            "turns": [asdict(turn) for turn in self.turns],
            "answer": self.answer,
            "finish": self.finish,
            "errors": list(self.errors),
            "policy_calls": self.policy_calls,
            "search_count": self.search_count,
            "search_errors": self.search_errors,
            "search_limit_hits": self.search_limit_hits,
            "latency_s": round(self.latency_s, 6),
            "raw": self.raw,
        }


def transcript_messages(transcript: list[Segment], info_role: str = "tool") -> list[dict[str, str]]:
    """Segments -> chat messages (policy -> assistant, info -> ``info_role``); block whitespace is stripped so a
    chat template's own separators are the only ones."""
    return [
        {"role": "assistant" if seg.kind == "policy" else info_role, "content": seg.text.strip()}
        for seg in transcript
    ]


@dataclass
class PolicyReply:
    """What a policy returned for one turn. ``text`` may or may not end with the stop tag (servers differ)."""

    text: str
    finish_reason: str | None = None
    stop_tag: str | None = None  # the stop string that ended generation, when the server says so (vLLM)


@runtime_checkable
class PolicyClient(Protocol):
    """Anything that continues a search-agent transcript by one turn."""

    async def generate(
        self, messages: list[dict[str, Any]], transcript: list[Segment], *, stop: list[str], max_tokens: int
    ) -> PolicyReply:
        """The next policy turn after ``messages`` (system + user) and ``transcript``; raises on endpoint failure."""
        ...


# ------------------------------------------------------------------------------------------------- policies
CHAT_MODES = ("continue", "turns")


class ChatPolicy:
    """A :class:`PolicyClient` over an OpenAI-compatible chat endpoint (see the module docstring for ``mode``).

    ``vllm_stop_params`` asks vLLM to keep the stop string in the output (``include_stop_str_in_output``); other
    servers drop it, and the rollout puts it back when the server says the turn ended at a stop string.
    """

    def __init__(self, llm: LLMClient, mode: str = "continue", info_role: str = "tool", vllm_stop_params: bool = True,
                 sampling: dict[str, Any] | None = None):
        if mode not in CHAT_MODES:
            raise ValueError(f"ChatPolicy mode must be one of {CHAT_MODES}, got {mode!r}")
        self.llm, self.mode, self.info_role = llm, mode, info_role
        self.vllm_stop_params = vllm_stop_params
        self.sampling = dict(sampling or {})

    async def generate(
        self, messages: list[dict[str, Any]], transcript: list[Segment], *, stop: list[str], max_tokens: int
    ) -> PolicyReply:
        body: dict[str, Any] = {"include_stop_str_in_output": True} if self.vllm_stop_params else {}
        if self.mode == "continue" and transcript:
            partial = "".join(seg.text for seg in transcript)
            chat = [*messages, {"role": "assistant", "content": partial}]
            body.update({"continue_final_message": True, "add_generation_prompt": False})
        else:
            chat = [*messages, *transcript_messages(transcript, self.info_role)]
        reply = await self.llm.chat_completion(chat, stop=list(stop), max_tokens=max_tokens, extra_body=body,
                                               **self.sampling)
        return _reply(reply)


class CompletionPolicy:
    """A :class:`PolicyClient` over ``/v1/completions``: the prompt is rendered with ``tokenizer``'s chat template
    (generation prompt added) and the transcript appended as raw text -- the RL loop's layout, on any server."""

    def __init__(self, llm: LLMClient, tokenizer: Any, vllm_stop_params: bool = True,
                 sampling: dict[str, Any] | None = None):
        self.llm, self.tokenizer = llm, tokenizer
        self.vllm_stop_params = vllm_stop_params
        self.sampling = dict(sampling or {})

    async def generate(
        self, messages: list[dict[str, Any]], transcript: list[Segment], *, stop: list[str], max_tokens: int
    ) -> PolicyReply:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt += "".join(seg.text for seg in transcript)
        body = {"include_stop_str_in_output": True} if self.vllm_stop_params else {}
        reply = await self.llm.text_completion(prompt, stop=list(stop), max_tokens=max_tokens, extra_body=body,
                                               **self.sampling)
        return _reply(reply)


def _reply(completion: Completion) -> PolicyReply:
    stop_tag = completion.stop_reason if completion.stop_reason in STOP_STRINGS else None
    return PolicyReply(completion.text, completion.finish_reason, stop_tag)


# ---------------------------------------------------------------------------------------------------- search
@dataclass
class SearchEnv:
    """The environment side: search settings (topk, result budget, deadline) and the backend to call."""

    settings: SearchSettings
    backend: SearchBackend
    tokenizer: Any | None = None  # budget results in this tokenizer's tokens (else words)

    async def search(self, query: str, exclusion: SearchExclusion | None = None) -> SearchOutcome:
        return await search_once(query, self.settings, self.backend, self.tokenizer, exclusion=exclusion)


def make_search_env(settings: SearchSettings | dict[str, Any] | None = None, tokenizer: Any | None = None) -> SearchEnv:
    """A :class:`SearchEnv` on the process-wide shared backend for ``settings.backend`` (see envs.search_client)."""
    if not isinstance(settings, SearchSettings):
        settings = SearchSettings.from_mapping(settings)
    return SearchEnv(settings, shared_backend(settings.backend), tokenizer)


# --------------------------------------------------------------------------------------------------- rollout
def close_turn(reply: PolicyReply) -> tuple[str, str | None]:
    """The turn's text through its first stop tag, and that tag (None when the turn ended without one).

    Servers that strip the stop string (OpenAI-style) are handled: when the server reports the tag, or reports a
    plain ``stop`` while a ``<search>``/``<answer>`` block is left open at the end, the closing tag is put back.
    """

    text = reply.text
    found = find_stop(text)
    if found is not None:
        end, tag = found
        return text[:end], tag
    if reply.stop_tag is not None:
        return text + reply.stop_tag, reply.stop_tag
    if reply.finish_reason == "stop":  # ended at a stripped stop string, or at EOS inside an open block
        search_at, answer_at = text.rfind(SEARCH_OPEN), text.rfind(ANSWER_OPEN)
        if max(search_at, answer_at) >= 0:
            closer = SEARCH_CLOSE if search_at > answer_at else ANSWER_CLOSE
            return text + closer, closer
    return text, None


def answer_of(turn_text: str) -> str | None:
    """Body of the ``<answer>`` block that ends ``turn_text``."""
    end = turn_text.rfind(ANSWER_CLOSE)
    start = turn_text.rfind(ANSWER_OPEN, 0, max(end, 0))
    if end < 0 or start < 0:
        return None
    return turn_text[start + len(ANSWER_OPEN) : end].strip()


async def run_episode(
    policy: PolicyClient,
    search: SearchEnv,
    messages: list[dict[str, Any]],
    max_turns: int = 4,
    max_new_tokens: int = 1024,
    max_policy_calls: int | None = None,
    exclusion: SearchExclusion | None = None,
) -> Episode:
    """Roll out one episode: generate, answer each ``<search>`` with ``<information>``, stop at ``<answer>``.

    ``messages`` is the prompt (system + user; e.g. :func:`envs.prompts.ramp_messages`). ``max_turns`` bounds the
    searches answered, ``max_new_tokens`` each generate call, ``max_policy_calls`` (default ``max_turns + 2``) the
    generate calls. ``exclusion`` hides passages from every search of the episode (a RAMP item's source, as the RL
    row's ``exclude`` does). Never raises for model or search failures; see :class:`Episode`.
    """

    rules = EpisodeRules(max_turns)  # raises for a negative limit
    max_calls = rules.max_policy_turns if max_policy_calls is None else max_policy_calls
    episode = Episode(prompt=[dict(m) for m in messages])
    started = time.perf_counter()
    try:
        while True:
            if episode.policy_calls >= max_calls:
                episode.finish = FINISH_LENGTH
                break
            episode.policy_calls += 1
            try:
                reply = await policy.generate(
                    episode.prompt, episode.transcript, stop=list(STOP_STRINGS), max_tokens=max_new_tokens
                )
            except Exception as err:  # noqa: BLE001 - a failed turn ends this episode, never the caller's run
                if not isinstance(err, LLMError):
                    logger.exception("policy %s raised", type(policy).__name__)
                episode.errors.append(f"policy: {type(err).__name__}: {err}")
                episode.finish = FINISH_POLICY_ERROR
                break
            text, tag = close_turn(reply)
            turn = Turn(text=text, finish_reason=reply.finish_reason)
            episode.turns.append(turn)
            move = rules.next_move(tag)
            if move == episode_rules.ANSWER:
                episode.answer = answer_of(text)
                episode.finish = FINISH_ANSWER
                break
            if move == episode_rules.END:
                episode.finish = FINISH_LENGTH if reply.finish_reason == "length" else FINISH_NO_TAG
                break
            turn.query = parse_query(text)
            if move == episode_rules.LIMIT_NOTICE:
                turn.information = rules.limit_notice
                turn.search_error = LIMIT_REACHED
                continue
            if move == episode_rules.SEARCH_LIMIT:
                turn.search_error = AFTER_LIMIT_NOTICE
                episode.finish = FINISH_SEARCH_LIMIT
                break
            outcome = await search.search(turn.query, exclusion)
            turn.information, turn.search_error = outcome.text, outcome.error
            turn.search_latency_s = outcome.latency_s
    finally:
        episode.latency_s = time.perf_counter() - started
    return episode
