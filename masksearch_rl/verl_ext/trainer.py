"""Trainer mode ``masksearch_sync``: verl 0.9.1's sync PPO trainer with platform-ready workers.

It is verl's ``PPOTrainerSync`` with three changes, all by overriding methods:
  * ``_init_resource_pool_mgr``: verl's mapping of roles to worker classes, with ``ActorRolloutRefWorker`` replaced
    by :class:`~masksearch_rl.verl_ext.workers.PlatformActorRolloutRefWorker` (it starts on the CPU platform; on
    GPUs it behaves exactly as verl's);
  * ``_build_replay_buffer``: keeps ``self.trainer_mode == "sync"``, since verl's base class switches to its async
    code paths whenever the mode string is not literally ``"sync"``;
  * ``step``: verl's V1 trainer logs neither the agent loop's extra fields nor the reward's components for training
    batches (only at validation). After each step we read them back from TransferQueue and log per-episode means:
    ``env/*`` (searches, search errors and latency, information tokens, model turns, finish reasons) and
    ``reward/*`` (every numeric component compute_score returned: acc, format, recall, judge, ...). When W&B is one
    of ``trainer.logger``, every ``masksearch_tracking.trajectory_table_freq`` steps a W&B table
    ``trajectories/train`` shows a few of the step's rollouts: prompt, searches, information, answer, gold and the
    reward components (verl itself tables only validation samples, without the components).

Stage II and any run without a curriculum use this mode; the curriculum mode (``masksearch_curriculum``) extends it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import ray
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.engine_workers import ActorRolloutRefWorker

from masksearch_rl.verl_ext.workers import PlatformActorRolloutRefWorker

logger = logging.getLogger(__name__)

TRAINER_MODE = "masksearch_sync"

# Numeric extra fields of our agent loop (envs/agent_loop.py) worth a per-step mean.
ENV_FIELDS = ("search_count", "search_calls", "search_errors", "search_empty", "search_limit_hits", "search_latency_s",
              "info_tokens", "model_turns", "env_turns", "response_truncated")


def episode_metrics(extra_fields: Iterable[Mapping[str, Any] | None]) -> dict[str, float]:
    """Per-step means of the episodes' environment statistics and reward components.

    ``extra_fields`` holds one dict per trajectory as verl stores it: our agent loop's fields plus
    ``reward_extra_info`` (the dict compute_score returned). Non-numeric values and missing keys are skipped;
    finish reasons become fractions (``env/finish/<reason>``).
    """
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    finishes: dict[str, int] = defaultdict(int)
    episodes = 0
    for fields in extra_fields:
        if not isinstance(fields, Mapping):
            continue
        episodes += 1
        for key in ENV_FIELDS:
            _add(sums, counts, f"env/{key}", fields.get(key))
        if isinstance(fields.get("finish_reason"), str):
            finishes[fields["finish_reason"]] += 1
        reward_info = fields.get("reward_extra_info")
        if isinstance(reward_info, Mapping):
            for key, value in reward_info.items():
                _add(sums, counts, f"reward/{key}", value)
    metrics = {f"{key}/mean": sums[key] / counts[key] for key in sums if counts[key]}
    for reason, n in finishes.items():
        metrics[f"env/finish/{reason}"] = n / episodes
    searched = sums.get("env/search_calls", 0.0)
    if searched:
        # The share of the step's backend searches that showed the policy nothing (failed, or no passage at all): a
        # retrieval outage must not pass for a flat reward.
        useless = sums.get("env/search_errors", 0.0) + sums.get("env/search_empty", 0.0)
        metrics["env/search_useless_frac"] = min(1.0, useless / searched)
        if useless >= searched:
            _warn_every_search_useless(int(searched))
    return metrics


_last_useless_warning = 0.0


def _warn_every_search_useless(searches: int) -> None:
    """Loud, but at most once a minute: every search of a step failed or found nothing."""
    import time

    global _last_useless_warning
    if time.monotonic() - _last_useless_warning >= 60:
        _last_useless_warning = time.monotonic()
        logger.warning("every one of this step's %d searches failed or found no passage: the policy is training "
                       "without retrieval (check the retrieval server / search_env.backend; env/search_errors, "
                       "env/search_empty)", searches)


def _add(sums: dict, counts: dict, key: str, value: Any) -> None:
    if isinstance(value, bool):
        value = float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        sums[key] += float(value)
        counts[key] += 1


# The ``masksearch_tracking`` section: a W&B table of the step's first rollouts every ``trajectory_table_freq``
# steps (0: never), ``trajectory_table_rows`` of them.
TRACKING_DEFAULTS = {"trajectory_table_freq": 0, "trajectory_table_rows": 8}


@register_trainer(TRAINER_MODE)
class MaskSearchPPOTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer whose training workers start on every platform we register."""

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role, worker in list(self.role_worker_mapping.items()):
            if getattr(worker, "__ray_actor_class__", None) is ActorRolloutRefWorker:
                self.role_worker_mapping[role] = ray.remote(PlatformActorRolloutRefWorker)

    def _build_replay_buffer(self):
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    def step(self, metrics: dict, timing_raw: dict):
        batch = super().step(metrics, timing_raw)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        live = [
            (key, fields)
            for key, fields, tag in zip(batch.keys, list(data["extra_fields"]), batch.tags, strict=True)
            if not tag.get("is_padding", False)
        ]
        metrics.update(episode_metrics(fields for _, fields in live))
        tracking = {**TRACKING_DEFAULTS, **(self.config.get("masksearch_tracking") or {})}
        freq = int(tracking["trajectory_table_freq"] or 0)
        if freq > 0 and "wandb" in list(self.config.trainer.logger) and (self.global_steps - 1) % freq == 0:
            try:
                self._log_trajectory_table(batch.partition_id, live[: int(tracking["trajectory_table_rows"])])
            except Exception:  # a sample table is never worth a training run
                logger.exception("could not log the trajectory table at step %d", self.global_steps)
        return batch

    def _log_trajectory_table(self, partition_id: str, live: list) -> None:
        """A W&B table of ``live`` rollouts ``(key, extra_fields)``, logged at verl's step (verl logs the metrics
        after us)."""
        import wandb

        from masksearch_rl.eval.trajectories import trajectory_rows
        from masksearch_rl.tracking import WandbTracker

        if wandb.run is None or not live:
            return
        keys = [key for key, _ in live]
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id,
                               select_fields=["prompts", "responses", "reward_model", "rm_scores"])
        pad = self.tokenizer.pad_token_id
        prompts = data["prompts"].to_padded_tensor(padding=pad)  # jagged in TransferQueue, as verl's own dump reads
        responses = data["responses"].to_padded_tensor(padding=pad)
        scores = data["rm_scores"].to_padded_tensor(padding=0.0).sum(dim=1).tolist()
        reward_models = [getattr(item, "data", item) for item in data["reward_model"]]
        records = []
        for i, (_, fields) in enumerate(live):
            reward_info = fields.get("reward_extra_info", {}) if isinstance(fields, Mapping) else {}
            records.append({
                "step": self.global_steps,
                "input": self.tokenizer.decode(prompts[i], skip_special_tokens=True),
                "output": self.tokenizer.decode(responses[i], skip_special_tokens=True),
                "gts": (reward_models[i] or {}).get("ground_truth"),
                "score": float(scores[i]),
                **{k: v for k, v in reward_info.items() if isinstance(v, (int, float, str, bool))},
            })
        columns, table_rows = trajectory_rows(records)
        # verl's own W&B run, through our tracker's table logging (the cell conversion every other table gets).
        WandbTracker(wandb.run).log_table("trajectories/train", columns, table_rows, step=self.global_steps)
