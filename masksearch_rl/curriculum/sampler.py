"""Masked-span-count curriculum: the order in which RL prompts reach the trainer.

Why: RAMP items with one masked span are much easier than items with four, and MaskSearch reports that a
curriculum over the span count can help. This module decides *which dataset index comes next*; the verl trainer
mode in ``trainer.py`` plugs it into verl's train dataloader and feeds it each step's reward.

Modes
  ``mixed``    every item, reshuffled each pass (the paper's default).
  ``staged``   stage 1 (fewest masks) for a fixed budget, then stage 2, ...; then every item, mixed.
  ``adaptive`` stay on a stage until the mean reward over the last ``window`` steps reaches
               ``reward_threshold`` (and at least ``min_steps_per_stage`` steps passed); after the last stage,
               every item, mixed.

The index stream never ends: verl stops training by step count, and an endless stream means a stage boundary never
falls on a dropped last batch. All randomness is derived from ``(seed, stage, pass)``, so the stream is a pure
function of the state; ``state_dict()`` holds that state (position inside the current pass included, plus the
adaptive reward window), which is what makes a resumed run continue exactly where it stopped.

The position lives in the sampler, not in its iterators: a second ``iter()`` continues the same stream instead of
starting an epoch. (verl calls ``iter()`` on the train loader once, and again only after loading a checkpoint.)
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from masksearch_rl.configs import from_mapping

logger = logging.getLogger(__name__)

CURRICULUM_MODES = ("mixed", "staged", "adaptive")
STATE_VERSION = 1
_MAIN, _REPLAY = 0, 1  # tags that keep the main and replay shuffles independent


@dataclass
class CurriculumConfig:
    """Options of the ``curriculum`` config section (see recipes/configs/curriculum/)."""

    mode: str = "mixed"
    seed: int = 0
    # Stage order as num_masks values; None = every value present in the data, ascending (1, 2, 3, 4).
    stages: list[int] | None = None
    # staged: passes over a stage's own items before moving on (one number, or one per stage) ...
    epochs_per_stage: float | list[float] = 1.0
    # ... or, when set, a fixed number of train batches per stage (needs the train batch size).
    steps_per_stage: int | list[int] | None = None
    # staged/adaptive: share of draws taken from earlier stages so they are not forgotten (0 = off).
    replay_fraction: float = 0.0
    # adaptive: which step metric to watch, the bar it must reach, over how many steps, after how many steps.
    reward_metric: str = "curriculum/score_mean"
    reward_threshold: float = 0.5
    window: int = 10
    min_steps_per_stage: int = 10
    # Where each row keeps its span count (dotted path into the parquet row).
    num_masks_key: str = "extra_info.num_masks"

    def __post_init__(self) -> None:
        if self.mode not in CURRICULUM_MODES:
            raise ValueError(f"curriculum.mode must be one of {CURRICULUM_MODES}, got {self.mode!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"curriculum.seed must be a non-negative integer, got {self.seed!r}")
        if self.stages is not None:
            self.stages = [int(k) for k in self.stages]
            if not self.stages or len(set(self.stages)) != len(self.stages):
                raise ValueError(f"curriculum.stages must be a non-empty list of distinct values, got {self.stages}")
        if not all(_is_number(v) and v > 0 for v in _as_list(self.epochs_per_stage)):
            raise ValueError(f"curriculum.epochs_per_stage must be numbers > 0, got {self.epochs_per_stage!r}")
        if self.steps_per_stage is not None and not all(
            _is_int(v) and v >= 1 for v in _as_list(self.steps_per_stage)
        ):
            raise ValueError(f"curriculum.steps_per_stage must be integers >= 1, got {self.steps_per_stage!r}")
        if not (_is_number(self.replay_fraction) and 0.0 <= self.replay_fraction < 1.0):
            raise ValueError(f"curriculum.replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not _is_number(self.reward_threshold):
            raise ValueError(f"curriculum.reward_threshold must be a number, got {self.reward_threshold!r}")
        if not (_is_int(self.window) and self.window >= 1):
            raise ValueError(f"curriculum.window must be an integer >= 1, got {self.window!r}")
        if not (_is_int(self.min_steps_per_stage) and self.min_steps_per_stage >= 0):
            raise ValueError(f"curriculum.min_steps_per_stage must be an integer >= 0, got {self.min_steps_per_stage}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, prefix: str = "curriculum") -> CurriculumConfig:
        """Build from a plain mapping; an unknown key is an error naming it (a typo must not silently do nothing)."""
        return from_mapping(cls, values, "curriculum option", prefix=prefix)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_stage(value: Any, stage: int, num_stages: int, name: str) -> Any:
    """A scalar applies to every stage; a list gives one value per stage."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != num_stages:
        raise ValueError(f"curriculum.{name} has {len(value)} values but there are {num_stages} stages")
    return value[stage]


def read_num_masks(dataset: Any, key: str = "extra_info.num_masks") -> list[int]:
    """Span count of every dataset row, in dataset index order.

    Reads the column from verl's ``RLHFDataset.dataframe`` (a Hugging Face dataset, possibly filtered or
    subsampled, which the column access respects) without decoding whole rows; other datasets are read row by row.
    """
    parts = key.split(".")
    frame = getattr(dataset, "dataframe", None)
    if frame is not None and hasattr(frame, "select_columns"):
        if parts[0] not in frame.column_names:
            raise ValueError(f"dataset has no column {parts[0]!r} (needed for {key}); columns: {frame.column_names}")
        flat = frame.select_columns([parts[0]]).flatten()
        if key not in flat.column_names:
            raise ValueError(f"dataset column {parts[0]!r} has no field {key!r}; fields: {flat.column_names}")
        values = flat.with_format("arrow")[:].column(key).to_pylist()  # arrow slicing honours filter/select
    else:
        values = []
        for index in range(len(dataset)):
            value: Any = dataset[index]
            for part in parts:
                value = value.get(part) if isinstance(value, Mapping) else None
            values.append(value)
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"dataset row {row}: {key} = {value!r} is not a positive integer")
    return [int(v) for v in values]


@dataclass
class _Cursor:
    """Position in a shuffled pool: which pass over it, and how far into that pass."""

    epoch: int = 0
    offset: int = 0


@dataclass
class _State:
    """Everything that decides the rest of the stream; saved whole in ``state_dict``."""

    stage: int = 0  # index into stages; == len(stages) means the final all-items phase
    main: _Cursor = field(default_factory=_Cursor)
    replay: _Cursor = field(default_factory=_Cursor)
    stage_draws: int = 0
    stage_main_draws: int = 0
    total_draws: int = 0
    stage_steps: int = 0  # reward updates received on this stage
    rewards: list[float] = field(default_factory=list)  # the last `window` of them
    last_step: int = -1
    transitions: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _State:
        data = dict(data)
        data["main"] = _Cursor(**data["main"])
        data["replay"] = _Cursor(**data["replay"])
        return cls(**data)


class MaskCountCurriculumSampler(Sampler[int]):
    """Endless stream of dataset indices ordered by masked-span count (see the module docstring).

    ``batch_size`` (prompts per train step) is only needed for ``steps_per_stage``.
    """

    def __init__(self, num_masks: Sequence[int], config: CurriculumConfig, batch_size: int | None = None) -> None:
        masks = np.asarray(num_masks, dtype=np.int64)
        if masks.ndim != 1 or len(masks) == 0:
            raise ValueError("curriculum sampler needs at least one item")
        self.config = config
        self.num_items = len(masks)
        self.batch_size = batch_size
        self.stages: tuple[int, ...] = tuple(config.stages) if config.stages else tuple(sorted(set(masks.tolist())))
        self._pools = [np.flatnonzero(masks == k) for k in self.stages]
        for k, pool in zip(self.stages, self._pools):
            if len(pool) == 0:
                raise ValueError(f"curriculum.stages lists num_masks={k} but no item has that many masks")
        self._all_items = np.arange(self.num_items)
        # _replay_pools[k - 1]: the items of every stage before stage k (stage 0 has nothing to replay).
        self._replay_pools = [np.sort(np.concatenate(self._pools[:k])) for k in range(1, len(self._pools))]
        if config.mode == "staged":
            if config.steps_per_stage is not None and not batch_size:
                raise ValueError("curriculum.steps_per_stage needs the train batch size (data.train_batch_size)")
            for name in ("epochs_per_stage", "steps_per_stage"):  # a per-stage list must fit the stages found
                _per_stage(getattr(config, name), 0, len(self.stages), name)
        self._fingerprint = {
            "mode": config.mode,
            "seed": config.seed,
            "stages": list(self.stages),
            "num_items": self.num_items,
            "num_masks_crc32": zlib.crc32(masks.tobytes()),
        }
        self._perm_cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._state = _State()
        if config.mode == "mixed":
            self._state.stage = len(self.stages)

    # ------------------------------------------------------------------ stream
    def __iter__(self) -> Iterator[int]:
        # A generator reads the shared state lazily, so creating an iterator has no side effect (torchdata creates
        # one before restoring state and throws it away).
        while True:
            yield self._next_index()

    def __len__(self) -> int:
        """One nominal epoch; the stream itself is endless."""
        return self.num_items

    @property
    def stage(self) -> int:
        """Current stage index; ``len(self.stages)`` is the final all-items phase (and all of ``mixed``)."""
        return self._state.stage

    @property
    def in_final_phase(self) -> bool:
        return self._state.stage >= len(self.stages)

    def _next_index(self) -> int:
        state = self._state
        if self.config.mode == "staged" and not self.in_final_phase and self._stage_budget_spent():
            self._enter_stage(state.stage + 1)
        if self._is_replay_draw():
            index = self._take(_REPLAY, self._replay_pool(), state.replay)
        else:
            index = self._take(_MAIN, self._main_pool(), state.main)
            state.stage_main_draws += 1
        state.stage_draws += 1
        state.total_draws += 1
        return index

    def _main_pool(self) -> np.ndarray:
        return self._all_items if self.in_final_phase else self._pools[self._state.stage]

    def _replay_pool(self) -> np.ndarray:
        return self._replay_pools[self._state.stage - 1]

    def _is_replay_draw(self) -> bool:
        """Replay draws are spread evenly: exactly floor(n * fraction) of a stage's first n draws."""
        fraction = self.config.replay_fraction
        if fraction == 0 or self.in_final_phase or self._state.stage == 0:
            return False
        n = self._state.stage_draws
        return math.floor((n + 1) * fraction + 1e-9) > math.floor(n * fraction + 1e-9)

    def _stage_budget_spent(self) -> bool:
        state, num_stages = self._state, len(self.stages)
        if self.config.steps_per_stage is not None:
            steps = _per_stage(self.config.steps_per_stage, state.stage, num_stages, "steps_per_stage")
            return state.stage_draws >= steps * self.batch_size
        epochs = _per_stage(self.config.epochs_per_stage, state.stage, num_stages, "epochs_per_stage")
        return state.stage_main_draws >= max(1, round(epochs * len(self._pools[state.stage])))

    def _take(self, tag: int, pool: np.ndarray, cursor: _Cursor) -> int:
        if cursor.offset >= len(pool):
            cursor.epoch, cursor.offset = cursor.epoch + 1, 0
        order = self._permutation(tag, cursor.epoch, pool)
        cursor.offset += 1
        return int(order[cursor.offset - 1])

    def _permutation(self, tag: int, epoch: int, pool: np.ndarray) -> np.ndarray:
        key = (tag, self._state.stage, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.config.seed, tag, self._state.stage, epoch])
            self._perm_cache[key] = pool[rng.permutation(len(pool))]
        return self._perm_cache[key]

    def _enter_stage(self, stage: int) -> None:
        state = self._state
        state.stage = stage
        state.main, state.replay = _Cursor(), _Cursor()
        state.stage_draws = state.stage_main_draws = state.stage_steps = 0
        state.rewards = []
        state.transitions.append({"stage": stage, "at_draw": state.total_draws, "at_step": state.last_step})
        label = "all items (mixed)" if self.in_final_phase else f"num_masks={self.stages[stage]}"
        logger.info("curriculum: entering stage %d (%s) after %d draws", stage, label, state.total_draws)

    # ------------------------------------------------------------------ feedback
    def update(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Feed one finished training step; returns True when ``adaptive`` moved to the next stage.

        A step number already seen is ignored, so feeding the same step twice cannot count a reward twice.
        """
        state = self._state
        if step <= state.last_step:
            return False
        key = self.config.reward_metric
        if key not in metrics:
            raise KeyError(
                f"curriculum.reward_metric={key!r} is not among this step's metrics; "
                f"some available: {sorted(metrics)[:30]}"
            )
        state.last_step = step
        value = float(metrics[key])
        if not math.isfinite(value):
            logger.warning("curriculum: step %d has %s=%s; not counted", step, key, value)
            return False
        state.rewards = (state.rewards + [value])[-self.config.window :]
        state.stage_steps += 1
        if self.config.mode != "adaptive" or self.in_final_phase or not self._reward_bar_reached():
            return False
        self._enter_stage(state.stage + 1)
        return True

    def _reward_bar_reached(self) -> bool:
        state = self._state
        return (
            state.stage_steps >= self.config.min_steps_per_stage
            and len(state.rewards) >= self.config.window
            and float(np.mean(state.rewards)) >= self.config.reward_threshold
        )

    def metrics(self) -> dict[str, float]:
        """Numbers for the training log (``curriculum/...``)."""
        state = self._state
        return {
            "curriculum/stage": float(state.stage),
            "curriculum/stage_num_masks": 0.0 if self.in_final_phase else float(self.stages[state.stage]),
            "curriculum/stage_steps": float(state.stage_steps),
            "curriculum/reward_window_mean": float(np.mean(state.rewards)) if state.rewards else float("nan"),
            "curriculum/total_draws": float(state.total_draws),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values; torchdata's StatefulDataLoader puts this into verl's ``data.pt``."""
        return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), "state": asdict(self._state)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue exactly where the saved run stopped; refuse a state written for another data set or mode."""
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"curriculum state version {state_dict.get('version')!r} != {STATE_VERSION}")
        saved = state_dict["fingerprint"]
        if saved != self._fingerprint:
            diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
            raise ValueError(
                f"checkpointed curriculum state does not match this run (saved, now): {diff}. Resume with the same "
                "data and curriculum.mode/seed/stages, or start the curriculum fresh (trainer.resume_mode=disable)."
            )
        self._state = _State.from_dict(state_dict["state"])
        self._perm_cache.clear()


# ------------------------------------------------------------------ finite orders, for data files
@dataclass
class DataOrder:
    """A schedule written into data rather than streamed to a trainer: ``indices[i]`` is the item of row ``i`` and
    ``stages[i]`` its stage (an index into ``stage_masks``; ``len(stage_masks)`` is the all-items phase of ``mixed``)."""

    indices: list[int]
    stages: list[int]
    stage_masks: tuple[int, ...]
    config: CurriculumConfig

    def describe(self) -> dict[str, Any]:
        """What to record beside the data: the schedule's settings and how many rows each stage got."""
        labels = [*(f"num_masks={k}" for k in self.stage_masks), "all (mixed)"]
        rows = [self.stages.count(s) for s in range(len(labels))]
        first = {labels[s]: self.stages.index(s) for s in range(len(labels)) if rows[s]}
        return {
            "mode": self.config.mode, "seed": self.config.seed, "stages": list(self.stage_masks),
            "epochs_per_stage": self.config.epochs_per_stage, "replay_fraction": self.config.replay_fraction,
            "rows": len(self.indices), "rows_per_stage": {labels[s]: n for s, n in enumerate(rows) if n},
            "first_row_of_stage": first,
        }


def data_order(num_masks: Sequence[int], config: CurriculumConfig) -> DataOrder:
    """The RL sampler's schedule cut to a finite list, for SFT exports and self-evolve rounds, so data files follow
    the same curriculum (``staged`` / ``mixed``) as RL prompts.

    ``mixed``: one pass over every item, shuffled. ``staged``: the sampler's stream up to the end of the last stage
    (each stage's items for ``epochs_per_stage`` passes, with ``replay_fraction`` of draws from earlier stages), the
    all-items phase that follows it in RL left out. With the defaults every item appears exactly once, stage by stage.
    ``adaptive`` follows training rewards and ``steps_per_stage`` counts train batches: neither has a meaning for a
    file, so both are refused.
    """
    if config.mode == "adaptive":
        raise ValueError("curriculum.mode=adaptive follows training rewards; order a data file by 'staged' or 'mixed'")
    if config.steps_per_stage is not None:
        raise ValueError("curriculum.steps_per_stage counts train batches; give a data file epochs_per_stage instead")
    sampler = MaskCountCurriculumSampler(num_masks, config)
    stream = iter(sampler)
    indices, stages = [], []
    if config.mode == "mixed":
        for _ in range(sampler.num_items):
            indices.append(next(stream))
            stages.append(sampler.stage)
    else:
        last = len(sampler.stages) - 1
        while not (sampler.stage == last and sampler._stage_budget_spent()):
            indices.append(next(stream))
            stages.append(sampler.stage)
    return DataOrder(indices, stages, sampler.stages, config)
