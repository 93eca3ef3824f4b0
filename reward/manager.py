"""verl reward manager ``masksearch``: DAPO's overlong shaping *and* the agent loop's rollout fields in ``extra_info``.

Why it exists: in verl 0.9.1 the ``dapo`` manager applies the overlong-buffer penalty but hands ``compute_score``
only the dataset row's ``extra_info``; the fields our agent loop reports (``tool_extra_fields``: search_count,
search_calls, search_errors, model/env turns, finish_reason ...) and verl's turn count never reach the reward. The
``naive`` manager merges them but has no overlong shaping. This manager is verl's ``DAPORewardManager`` (same
config keys, same formula, same ``overlong_reward`` / ``overlong`` logging: nothing is re-implemented) that feeds it
a sample whose ``extra_info`` also holds the rollout's fields, merged the way ``naive`` merges them:

    extra_info = {**row extra_info, **tool_extra_fields, "num_turns": __num_turns__, "rollout_reward_scores": ...,
                  "agent_name": the row's agent_name}

``agent_name`` tells ``compute_score`` which loop wrote the response, so tag-protocol and hermes tool-call rollouts
are each checked by their own format rules (reward/format.py); verl keeps it as a column of its own, not in
``extra_info``.

Unlike ``naive`` it builds a new dict instead of updating the row's in place: rollouts of one prompt can share that
dict object, and samples are scored concurrently, so an in-place update could hand one rollout another's counts.

It also adds the rollout's counts to ``reward_extra_info`` (``ROLLOUT_METRICS``, always present, 0 when a rollout
does not report one) and its length in tokens (``rollout_response_tokens``: policy and information tokens, what
``max_response_length`` bounds), so they are logged and dumped next to the reward's own keys (score, acc, format,
recall, judge, judge_fallback, num_searches ...) -- for validation too, where verl logs no response length.

Select it with::

    reward.reward_manager.name=masksearch            # source: register (the default)
    +reward.reward_kwargs.overlong_buffer_cfg.{enable,len,penalty_factor,log}  +reward.reward_kwargs.max_resp_len

``import verl`` registers it through our ``verl.plugins`` entry point (masksearch_rl/verl_plugins.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.dapo import DAPORewardManager

MANAGER_NAME = "masksearch"

# reward_extra_info key -> the merged extra_info key it reports (envs/agent_loop.py's extra_fields; verl's turn count).
ROLLOUT_METRICS: dict[str, str] = {
    "rollout_turns": "num_turns",
    "rollout_searches": "search_count",
    "rollout_search_calls": "search_calls",
    "rollout_search_errors": "search_errors",
    "rollout_search_limit_hits": "search_limit_hits",
}


RESPONSE_TOKENS = "rollout_response_tokens"


def merged_extra_info(non_tensor: Mapping[str, Any]) -> dict[str, Any]:
    """One sample's ``extra_info`` with the rollout's fields merged in (a new dict; the row's is left alone).

    Same keys and precedence as verl's ``naive`` manager: the tool fields override the row's keys, then
    ``num_turns`` and ``rollout_reward_scores`` are set from verl's own columns; ``agent_name`` is the row's (verl
    hands it over as a numpy string) unless ``extra_info`` already names one.
    """
    extra_info = dict(non_tensor.get("extra_info") or {})
    tool_fields = non_tensor.get("tool_extra_fields")
    if tool_fields is not None:
        extra_info.update(tool_fields.items())
    extra_info["num_turns"] = non_tensor.get("__num_turns__")
    extra_info["rollout_reward_scores"] = non_tensor.get("reward_scores", {})
    agent_name = non_tensor.get("agent_name")
    if agent_name is not None and "agent_name" not in extra_info:
        extra_info["agent_name"] = str(agent_name)
    return extra_info


def rollout_metrics(extra_info: Mapping[str, Any]) -> dict[str, float]:
    """The rollout counts for ``reward_extra_info``: every key in every sample (verl stacks them into arrays)."""
    metrics = {}
    for key, field in ROLLOUT_METRICS.items():
        value = extra_info.get(field)
        metrics[key] = float(value) if isinstance(value, (int, float, np.number)) else 0.0
    return metrics


@register(MANAGER_NAME)
class MaskSearchRewardManager(DAPORewardManager):
    """verl's DAPO manager whose ``compute_score`` sees the agent loop's fields (see the module docstring)."""

    async def run_single(self, data: DataProto) -> dict:
        last = data[-1:]  # what DAPO scores: the last sequence of a multi-sequence sample
        extra_info = merged_extra_info(last[0].non_tensor_batch)
        # slice() builds a new non_tensor_batch dict, so this replaces the column in ``last`` only
        last.non_tensor_batch["extra_info"] = np.array([extra_info], dtype=object)
        result = await super().run_single(last)
        result["reward_extra_info"].update(rollout_metrics(extra_info))
        response_length = last.batch["responses"].shape[-1]  # valid tokens, as the dapo manager counts them
        valid = last.batch["attention_mask"][0, -response_length:].sum()
        result["reward_extra_info"][RESPONSE_TOKENS] = float(valid)
        return result
