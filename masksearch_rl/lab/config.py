"""What the learning lab builds and runs: world and split sizes, the policy recipe, the RL arms and their budget.

Two presets: the default (the benchmark, budgeted at <= 2 h to build the policy and <= 3 h of RL arms on 2 CPU
cores) and ``quick`` (minutes: the test suite checks that the lab completes and writes a well-formed
``learning.json``; it says nothing about learning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

# The RL arms (docs/lab.md explains each). "sft" trains nothing: it evaluates the SFT policy.
ARMS = ("sft", "dapo", "dapo_mixed", "qa_only", "ramp_then_qa", "dapo_hidden")
# Which held-out set an arm is judged on.
ARM_TASK = {"sft": "ramp", "dapo": "ramp", "dapo_mixed": "ramp", "dapo_hidden": "ramp", "qa_only": "qa",
            "ramp_then_qa": "qa"}


@dataclass(frozen=True)
class LabConfig:
    out_dir: Path = Path("runs/lab")
    results_dir: Path = Path("docs/results")
    seed: int = 0  # world, data split and policy build; the RL seeds are `seeds`

    # --- the world and the tasks
    passages: int = 2000
    # Passages padded with fact-free sentences (60-130 words, the quickstart's world) or stating facts only (~30).
    flavour: bool = True
    questions: int = 6000  # generated; the lab keeps the 1-hop questions whose passage a search of the question finds
    maskings: int = 4  # RAMP items per passage, each with its own draw of masks
    heldout_share: float = 0.15  # entities (all their passages) kept out of every training stage
    val_ramp: int = 200  # held-out RAMP items each evaluation scores
    val_qa: int = 200  # held-out questions each evaluation scores
    # What a search shows: one passage, cut to this many tokens -- the oracle then sees every span (lab.data checks).
    topk: int = 1
    max_info_tokens: int = 256
    opening_words: int = 10  # the oracle's RAMP query: the masked text's first words (copyable; finds the source)

    # --- the policy
    model_shape: str = "small"
    vocab_size: int = 2000
    pretrain_steps: int = 500  # copy pre-training: next-token loss on every token of oracle trajectories
    sft_steps: int = 500  # SFT: loss on the policy's own tokens only
    pretrain_lr: float = 2e-3
    sft_lr: float = 1e-3
    batch_size: int = 16
    # masksearch_rl.sft.train's backend for both steps: "hf" (HF Trainer, the DeepSpeed runner without DeepSpeed:
    # ~4x faster than verl's FSDP engine for a model this small on a CPU) or "fsdp" (verl's SFT trainer).
    sft_backend: str = "hf"
    diagnostics_items: int = 100

    # --- the RL arms
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    rl_steps: int = 40  # ramp_then_qa: half on RAMP, half on the questions
    eval_every: int = 10
    rl_timeout_s: float = 3600.0
    extra_overrides: tuple[str, ...] = field(default_factory=tuple)  # hydra overrides for every RL run
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown:
            raise ValueError(f"unknown lab arm(s) {unknown}; choose from {ARMS}")
        if not self.seeds:
            raise ValueError("the lab needs at least one RL seed")
        if self.rl_steps < 2 or self.rl_steps % 2:
            raise ValueError(f"rl_steps must be an even number >= 2 (ramp_then_qa splits it), got {self.rl_steps}")
        if self.eval_every < 1 or self.rl_steps % self.eval_every:
            raise ValueError(f"eval_every ({self.eval_every}) must divide rl_steps ({self.rl_steps})")
        if not 0 < self.heldout_share < 1:
            raise ValueError(f"heldout_share must be in (0, 1), got {self.heldout_share}")

    @classmethod
    def quick_preset(cls, **overrides) -> LabConfig:
        """Minutes on 2 cores: a small world, a few training steps, one seed, two RL steps per arm."""
        values = dict(
            passages=240, questions=600, maskings=2, val_ramp=8, val_qa=8, max_info_tokens=96, model_shape="tiny",
            vocab_size=600,
            pretrain_steps=6, sft_steps=6, batch_size=4, diagnostics_items=4, seeds=(0,), rl_steps=2, eval_every=1,
            rl_timeout_s=1500.0, quick=True,
            # A policy this untrained answers nothing: every group would be all-wrong and DAPO's refill would never
            # end. Small batches keep each step short.
            extra_overrides=("algorithm.filter_groups.enable=false", "data.train_batch_size=2",
                             "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.n=4",
                             "data.max_response_length=192", "reward.reward_kwargs.overlong_buffer_cfg.len=32"),
        )
        values.update(overrides)
        return cls(**values)

    def describe(self) -> dict:
        """JSON-ready settings (what learning.json records as ``config``)."""
        values = dataclasses.asdict(self)
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in values.items()}
