"""verl trainer mode ``masksearch_curriculum``: verl 0.9.1's sync PPO trainer fed by our curriculum sampler.

Select it with ``trainer.v1.trainer_mode=masksearch_curriculum`` and configure it under the top-level
``curriculum`` section (recipes/configs/curriculum/ documents every key). verl finds the mode because ``import
verl`` imports masksearch_rl.verl_plugins (entry point group ``verl.plugins``), which imports this module.

What it changes in verl's ``PPOTrainerSync`` (verl/trainer/ppo/v1/trainer_base.py), all by overriding methods (on top
of ``masksearch_sync``, masksearch_rl/verl_ext/trainer.py: platform-ready workers, sync semantics kept):
  * ``_init_dataloader``: verl's own code builds the datasets and the train loader, then the train loader is rebuilt
    with the same settings but our ``MaskCountCurriculumSampler`` in place of ``create_rl_sampler``'s sampler.
  * ``step``: after verl's step, the step's mean score goes to ``sampler.update`` (this drives ``adaptive``) and the
    ``curriculum/*`` numbers join the step's metrics. This runs before ``fit`` saves a checkpoint, so the saved
    sampler state already holds this step's reward.
  * ``_load_checkpoint``: restores the sampler right away instead of at the first batch.

Checkpoints: verl saves ``train_dataloader.state_dict()`` as ``<ckpt>/global_step_N/data.pt``. torchdata's
StatefulDataLoader wraps our sampler in its BatchSampler, whose iterator state holds ``sampler.state_dict()``
(torchdata/stateful_dataloader/sampler.py, ``_BatchSamplerIterator``); on resume verl's ``load_state_dict`` hands it
back to ``sampler.load_state_dict`` when the loader is next iterated. No extra file is needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.v1.replay_buffer import DAPO_FILTERED_REWARD_COUNTS_KEY
from verl.trainer.ppo.v1.trainer_base import register_trainer

from masksearch_rl.curriculum.sampler import CurriculumConfig, MaskCountCurriculumSampler, read_num_masks
from masksearch_rl.verl_ext.trainer import MaskSearchPPOTrainer

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

TRAINER_MODE = "masksearch_curriculum"
CONFIG_KEY = "curriculum"
SCORE_METRIC = "curriculum/score_mean"


def curriculum_config_from(config: DictConfig) -> CurriculumConfig:
    """The ``curriculum`` section as a validated dataclass; the seed falls back to ``data.seed``, then 0."""
    section = config.get(CONFIG_KEY, None)
    values = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    if values.get("seed") is None:
        data_seed = config.data.get("seed", None)
        values["seed"] = 0 if data_seed is None else int(data_seed)
    return CurriculumConfig.from_mapping(values, prefix=CONFIG_KEY)


def rebuild_with_sampler(
    loader: StatefulDataLoader, sampler: MaskCountCurriculumSampler, num_workers: int | None = None
) -> StatefulDataLoader:
    """A StatefulDataLoader like ``loader`` (as verl built it) but drawing indices from ``sampler``."""
    workers = loader.num_workers if num_workers is None else num_workers
    kwargs: dict[str, Any] = dict(
        dataset=loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
    )
    if workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return StatefulDataLoader(**kwargs)


def mean_step_score(
    kept_scores: Iterable[float], filtered_group_counts: Mapping[float, int] | None, group_size: int
) -> float:
    """Mean trajectory score of everything rolled out for this step.

    With DAPO group filtering the trained batch only holds groups whose scores differ; the groups dropped for
    scoring all alike (``{score: number_of_groups}``, ``group_size`` trajectories each) are added back, else the
    mean would hover near the middle whatever the policy's skill and ``adaptive`` could never judge a stage.
    """
    kept = [float(s) for s in kept_scores]
    total, count = sum(kept), len(kept)
    for score, groups in (filtered_group_counts or {}).items():
        total += float(score) * groups * group_size
        count += groups * group_size
    return total / count if count else float("nan")


@register_trainer(TRAINER_MODE)
class CurriculumPPOTrainer(MaskSearchPPOTrainer):
    """verl's sync PPO trainer (platform-ready, see masksearch_sync) with prompts in mask-count curriculum order."""

    def __init__(self, config: DictConfig):
        # Parse first: a bad curriculum option fails before any worker starts.
        self.curriculum_config = curriculum_config_from(config)
        self.curriculum_sampler: MaskCountCurriculumSampler | None = None
        super().__init__(config)

    def _init_dataloader(self):
        super()._init_dataloader()
        cfg = self.curriculum_config
        num_masks = read_num_masks(self.train_dataset, cfg.num_masks_key)
        self.curriculum_sampler = MaskCountCurriculumSampler(
            num_masks, cfg, batch_size=int(self.config.data.train_batch_size)
        )
        num_workers = None
        if cfg.mode == "adaptive" and self.train_dataloader.num_workers > 0:
            # Loader workers prefetch indices ahead of training and torchdata snapshots the sampler when it hands
            # them out, so a stage change would arrive late and data.pt would hold stale reward statistics.
            logger.info("curriculum: adaptive mode loads train prompts in the trainer process (num_workers=0)")
            num_workers = 0
        self.train_dataloader = rebuild_with_sampler(self.train_dataloader, self.curriculum_sampler, num_workers)
        self.train_dataloader_it = None
        counts = {k: num_masks.count(k) for k in sorted(set(num_masks))}
        logger.info(
            "curriculum: mode=%s stages=%s items per num_masks=%s",
            cfg.mode,
            self.curriculum_sampler.stages,
            counts,
        )

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps > 0:
            # StatefulDataLoader only stores the state until the next iter(); iterate now so the sampler (stage,
            # reward window) is live from the first step on. verl's _fetch_one_gen_batch uses this iterator.
            self.train_dataloader_it = iter(self.train_dataloader)
            logger.info("curriculum: resumed at %s", self.curriculum_sampler.metrics())

    def step(self, metrics: dict, timing_raw: dict):
        batch = super().step(metrics, timing_raw)
        metrics[SCORE_METRIC] = self._step_score(batch, metrics)
        self.curriculum_sampler.update(self.global_steps, metrics)
        metrics.update(self.curriculum_sampler.metrics())
        return batch

    def _step_score(self, batch, metrics: Mapping[str, Any]) -> float:
        """Mean sequence score (summed ``rm_scores``) of this step's rollouts, read from TransferQueue."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
        kept = [
            float(row.sum())
            for row, tag in zip(list(data["rm_scores"]), batch.tags, strict=True)
            if not tag.get("is_padding", False)
        ]
        filter_groups = self.config.algorithm.get("filter_groups", None)
        filtered = None
        if filter_groups is not None and filter_groups.get("enable", False):
            if filter_groups.get("metric") == "reward":
                filtered = metrics.get(DAPO_FILTERED_REWARD_COUNTS_KEY)
            elif not getattr(self, "_warned_filter_metric", False):
                self._warned_filter_metric = True
                logger.warning(
                    "curriculum: algorithm.filter_groups.metric=%s is not 'reward', so %s only covers the groups "
                    "that survived filtering",
                    filter_groups.get("metric"),
                    SCORE_METRIC,
                )
        return mean_step_score(kept, filtered, group_size=int(self.config.actor_rollout_ref.rollout.n))
