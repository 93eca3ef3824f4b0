"""verl agent loop ``masksearch_agent``: the think / search / information / answer tag protocol.

One rollout is one assistant turn that the policy and the environment write together::

    policy:       <think> … </think> <search> query </search>          response_mask 1 (trained on)
    environment:  <information> Doc 1 (Title: …) … </information>      response_mask 0, logprob 0.0
    policy:       … <answer> … </answer>                                response_mask 1

The policy generates until ``</search>`` or ``</answer>`` (stop strings, see :func:`stop_sampling_params`; whatever
the engine does with them, each turn is cut after its first stop tag here). A search is answered with an
``<information>`` block and generation resumes from the prompt plus everything so far. Whatever goes wrong on the
environment's side (empty or over-long query, backend down or slow, search limit reached) becomes a plain message
inside ``<information>``; the rollout goes on and nothing raises. A block always ends with its ``</information>``:
near the end of the response budget its text is shortened or dropped, never its tags (``_information_ids``).

Why the information block is raw token continuation (``tokenizer.encode(block, add_special_tokens=False)``) and not
verl's Continuous Token builder: that builder renders chat *messages* (``<|im_start|>tool …`` turns), which is what
the hermes tool variant needs; here the environment's text continues the policy's own assistant turn, as in MaskSearch
and Search-R1, so there is no message boundary to render. The ids are built once and used by both the rollout engine
and the trainer, so nothing is ever re-tokenised.

Limits:
- ``search_env.max_turns``: at most this many ``<search>`` requests are answered (errors included); the next one gets
  a "limit reached, answer now" message and one more turn; a search after that ends the rollout -- the one episode
  rule every driver follows (:class:`envs.episode.EpisodeRules`).
- ``rollout.response_length``: each generate call asks for at most what is left (``max_tokens``), an information
  block is built to fit what is left (or left out, ending the rollout, when not even its tags fit), and the response
  is truncated to the budget whatever the engine returns.

Hidden passages: a row whose ``extra_info.tools_kwargs.search.create_kwargs`` carries ``exclude`` (``ramp export
--hide-source``: the item's source passage) has those passages hidden from every search of its episode, as the
hermes tool hides them (:func:`envs.search_client.row_exclusion`).

Configuration: the top-level ``search_env`` section of the trainer config (:class:`SearchEnvConfig`), e.g.
``+search_env.backend.url=http://host:8000 +search_env.topk=3 +search_env.max_turns=4``. verl 0.9.1 does not check
top-level sections, and every agent loop receives the whole trainer config.
Registration: ``import verl`` loads our ``verl.plugins`` entry point (masksearch_rl.verl_plugins), which imports this
module; rows choose the loop with ``agent_name: masksearch_agent``.

Where ``extra_fields`` go in verl 0.9.1 (model_turns, env_turns, search_count, search_calls, search_errors,
search_empty (the backend answered with no passage at all), search_limit_hits, search_latency_s, info_tokens, response_truncated, finish_reason). ``search_errors`` counts
searches that failed on the environment's side (empty or over-long query, backend error or timeout);
``search_limit_hits`` counts searches the policy asked for past ``max_turns`` (the notice, and the search that ends
the rollout after it): the first is a backend health signal, the second the policy's behaviour.
- Reward: ``AgentLoopWorker._compute_score`` sends them as ``tool_extra_fields``; the ``naive``, ``limited`` and
  ``remote`` reward managers merge them into ``extra_info`` before calling ``compute_score`` (and set
  ``extra_info["num_turns"]`` from verl's own count, hence no key of that name here). verl's ``dapo`` and ``gdpo``
  managers do *not* merge them; our ``masksearch`` manager (reward/manager.py, the recipes' default) is ``dapo``
  plus this merge.
- Metrics: verl's V1 trainer does not log extra_fields for training batches; our trainer modes do, as ``env/*`` and
  ``reward/*`` per-step means (masksearch_rl/verl_ext/trainer.py). Keys that ``compute_score`` returns in its dict become
  ``reward_extra_info``: logged at validation as ``val-aux/<data_source>/<key>/...``, dumped with generations, and
  usable as ``algorithm.filter_groups.metric``. The loop's timing goes into verl's ``AgentLoopMetrics``
  (``generate_sequences``; search time as ``tool_calls``), which only the legacy trainer (``trainer.use_v1=false``)
  logs, as ``timing_s/agent_loop/tool_calls/{min,max,mean}``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.experimental.agent_loop.tool_agent_loop import SPEC_DECODE_EXTRA_KEYS
from verl.utils.rollout_trace import rollout_trace_op

from envs import episode as episode_rules
from envs.episode import EpisodeRules
from envs.prompts import (
    STOP_STRINGS,
    TAG_AGENT_NAME,
    information_block,
    parse_query,
    tokens_through_stop,
)
from envs.search_client import (
    SEARCH_TOOL_NAME,
    SearchSettings,
    row_exclusion,
    search_once,
    shared_backend,
    truncate_to_budget,
)

logger = logging.getLogger(__name__)

CONFIG_SECTION = "search_env"


@dataclass
class SearchEnvConfig(SearchSettings):
    """The ``search_env`` section: :class:`~envs.search_client.SearchSettings` plus the agent's search limit."""

    max_turns: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_turns, int) or self.max_turns < 0:
            raise ValueError(f"search_env.max_turns must be an integer >= 0, got {self.max_turns!r}")

    @classmethod
    def from_trainer_config(cls, config: Any) -> SearchEnvConfig:
        """Read ``search_env`` from the whole trainer config; a missing section means all defaults."""
        if OmegaConf.is_config(config):
            section = OmegaConf.select(config, CONFIG_SECTION, default=None)
        else:
            section = (config or {}).get(CONFIG_SECTION)
        try:
            return cls.from_mapping(section)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad trainer config section '{CONFIG_SECTION}': {err}") from err


# Engines that decode text with a tokenizer of their own whatever ``skip_tokenizer_init`` says: verl always gives
# vLLM its tokenizer, and our ``hf`` backend (masksearch_rl/verl_ext/hf_rollout.py) loads one next to its model and
# honours stop strings.
ENGINES_WITH_OWN_TOKENIZER = ("vllm", "hf")


def engine_decodes_text(rollout_name: str | None, skip_tokenizer_init: bool) -> bool:
    """Can the engine match stop strings? Only when it decodes text, i.e. has a tokenizer."""
    return rollout_name in ENGINES_WITH_OWN_TOKENIZER or not skip_tokenizer_init


def stop_sampling_params(rollout_name: str | None, engine_has_tokenizer: bool) -> dict[str, Any]:
    """Stop strings for the engine, kept in its output so the closing tag is part of the policy's tokens.

    vLLM and TensorRT-LLM spell "keep it" ``include_stop_str_in_output``, SGLang ``no_stop_trim``; each rejects the
    other's key. Stop strings are matched on text, so an engine started without its tokenizer (verl's
    ``rollout.skip_tokenizer_init``, default true; see :func:`engine_decodes_text` for the engines that have one
    anyway) gets none: SGLang would fail decoding them. The loop then cuts each turn after its first tag itself, at
    the cost of wasted generation.
    """
    if not engine_has_tokenizer:
        _warn_once(
            f"rollout engine {rollout_name!r} runs without a tokenizer (skip_tokenizer_init=true), so it cannot stop "
            "at </search> or </answer>; turns are cut afterwards. Set "
            "actor_rollout_ref.rollout.skip_tokenizer_init=false to stop generation at the tags."
        )
        return {}
    keep_key = "no_stop_trim" if rollout_name == "sglang" else "include_stop_str_in_output"
    return {"stop": list(STOP_STRINGS), keep_key: True}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


@dataclass
class _Trajectory:
    """The response being built: token ids, loss mask and logprobs stay the same length by construction."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    all_logprobs: bool = True  # False once a generate call returned none: then no logprobs are reported

    def add_policy(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.mask += [1] * len(ids)
        if logprobs is None or len(logprobs) != len(ids):
            self.all_logprobs = False
        else:
            self.logprobs += list(logprobs)

    def add_environment(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)


@register(TAG_AGENT_NAME)
class MaskSearchAgentLoop(AgentLoopBase):
    """Tag-protocol search agent (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # also receives verl's `tools=` list, which this loop does not use
        self.env = SearchEnvConfig.from_trainer_config(self.config)
        self.backend = shared_backend(self.env.backend)
        self.response_length = self.rollout_config.response_length
        name = self.rollout_config.name
        decodes = engine_decodes_text(name, self.rollout_config.get("skip_tokenizer_init", True))
        self.stop_params = stop_sampling_params(name, decodes)
        # The smallest block: its tags around no text.
        self.empty_block = self.tokenizer.encode(information_block(""), add_special_tokens=False)

    @rollout_trace_op
    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        tool_kwargs = (kwargs.get("tools_kwargs") or {}).get(SEARCH_TOOL_NAME) or {}
        exclusion = row_exclusion(tool_kwargs.get("create_kwargs"))
        request_id = uuid4().hex  # one id for all turns: sticky routing, prefix-cache reuse
        traj = _Trajectory()
        rules = EpisodeRules(self.env.max_turns)
        stats = {"model_turns": 0, "env_turns": 0, "search_count": 0, "search_calls": 0, "search_errors": 0,
                 "search_empty": 0, "search_limit_hits": 0, "info_tokens": 0}
        timing = {"generate_sequences": 0.0, "tool_calls": 0.0}
        server_fields: dict[str, Any] = {}
        num_preempted = None
        finish = "length"

        while len(traj.ids) < self.response_length:
            budget = self.response_length - len(traj.ids)
            params = {**sampling_params, **self.stop_params, "max_tokens": budget}
            started = time.perf_counter()
            output = await self.server_manager.generate(
                request_id=request_id, prompt_ids=prompt_ids + traj.ids, sampling_params=params
            )
            timing["generate_sequences"] += time.perf_counter() - started
            stats["model_turns"] += 1
            if output.num_preempted is not None:
                num_preempted = (num_preempted or 0) + output.num_preempted
            _merge_server_fields(server_fields, output.extra_fields)

            keep, stop_tag = tokens_through_stop(list(output.token_ids), self.tokenizer)
            if keep > budget:  # a backend that ignores max_tokens is cut here
                keep, stop_tag = budget, None
            turn_ids = list(output.token_ids[:keep])
            traj.add_policy(turn_ids, output.log_probs[:keep] if output.log_probs is not None else None)
            move = rules.next_move(stop_tag)
            if move == episode_rules.ANSWER:
                finish = "answer"
                break
            if move == episode_rules.END:  # out of budget, or ended without a tag (EOS, or nothing at all)
                finish = "length" if keep == budget else ("eos" if turn_ids else "empty")
                break
            if keep == budget:
                break  # </search> as the very last token: no room left for the results

            stats["search_count"] += 1
            room = self.response_length - len(traj.ids)
            if move == episode_rules.SEARCH_LIMIT:  # a search after the limit notice: no reply
                stats["search_limit_hits"] += 1
                finish = "search_limit"
                break
            if move == episode_rules.LIMIT_NOTICE:
                stats["search_limit_hits"] += 1
                text = rules.limit_notice
            else:
                # The results are first cut to what is left after the block's tags; _information_ids makes it exact.
                query = parse_query(self.tokenizer.decode(turn_ids))
                outcome = await search_once(
                    query, self.env, self.backend, self.tokenizer, max_tokens=max(room - len(self.empty_block), 1),
                    exclusion=exclusion,
                )
                timing["tool_calls"] += outcome.latency_s
                stats["search_calls"] += int(outcome.called_backend)
                stats["search_errors"] += int(outcome.error is not None)
                stats["search_empty"] += int(outcome.error is None and outcome.called_backend and not outcome.num_hits)
                text = outcome.text
            info_ids = self._information_ids(text, room)
            if not info_ids:
                break  # not even the block's tags fit: the response is full ("length")
            traj.add_environment(info_ids)
            stats["env_turns"] += 1
            stats["info_tokens"] += len(info_ids)

        n = self.response_length
        extra_fields = {
            **server_fields,
            **stats,
            "search_latency_s": round(timing["tool_calls"], 6),
            "response_truncated": finish == "length",
            "finish_reason": finish,
            # verl's own loops always set these two; keeping them keeps batches of mixed loops concatenable.
            "turn_scores": [],
            "tool_rewards": [],
        }
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=traj.ids[:n],
            response_mask=traj.mask[:n],
            response_logprobs=traj.logprobs[:n] if traj.all_logprobs else None,
            # verl counts chat turns: the prompt, each policy turn, each environment reply.
            num_turns=1 + stats["model_turns"] + stats["env_turns"],
            metrics={**timing, "num_preempted": -1 if num_preempted is None else num_preempted},
            extra_fields=extra_fields,
        )

    def _information_ids(self, text: str, room: int) -> list[int]:
        """Token ids of the ``<information>`` block for ``text``, at most ``room`` of them, its tags always whole.

        The block is encoded as one piece, so its length is only known once encoded (tokens merge where text meets
        tag, and a cut text ends in a marker); when it is too long the text is cut by the excess and the block encoded
        again, a few times at most, then the text is dropped. Empty when not even the tags fit: a half-closed block
        would read as the policy's own unclosed tag to the format reward.
        """
        ids = self.tokenizer.encode(information_block(text), add_special_tokens=False)
        budget = len(ids) - len(self.empty_block)  # about the text's own tokens
        for _ in range(4):
            if len(ids) <= room:
                return ids
            budget -= len(ids) - room
            if budget <= 0:
                break
            ids = self.tokenizer.encode(
                information_block(truncate_to_budget(text, budget, self.tokenizer)), add_special_tokens=False
            )
        return list(self.empty_block) if len(self.empty_block) <= room else []


def _merge_server_fields(merged: dict[str, Any], latest: dict[str, Any]) -> None:
    """Keep the server's bookkeeping verl relies on: the weight version the trajectory started and ended with
    (off-policy staleness metrics) and summed speculative-decoding counts, as verl's ToolAgentLoop does."""
    if not merged:
        merged.update(latest)
        return
    if latest.get("max_global_steps") is not None:
        merged["max_global_steps"] = latest["max_global_steps"]
    for key in SPEC_DECODE_EXTRA_KEYS:
        if key in latest and key in merged:
            merged[key] = int(merged[key]) + int(latest[key])
