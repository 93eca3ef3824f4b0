"""Masked-span-count curriculum: sampler order, resumption, adaptive feedback, and its wiring into verl 0.9.1.

The trainer is built the way verl's TaskRunner builds it (hydra-composed ``ppo_trainer`` config, trainer class looked
up by ``trainer.v1.trainer_mode``), then only its CPU-side set-up runs: ``_init_tokenizer`` and ``_init_dataloader``
(the first two calls of ``PPOTrainer._setup``). Prompts are fetched with verl's own ``_next_train_batch``, and
checkpoints go through verl's own ``_save_checkpoint`` / ``_load_checkpoint`` with a stand-in for the GPU worker
group (the only part that needs Ray and GPUs).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

from masksearch_rl.curriculum import CurriculumConfig, MaskCountCurriculumSampler, read_num_masks
from masksearch_rl.verl_ext import curriculum_trainer
from masksearch_rl.verl_ext.curriculum_trainer import (
    SCORE_METRIC,
    TRAINER_MODE,
    CurriculumPPOTrainer,
    curriculum_config_from,
    mean_step_score,
    rebuild_with_sampler,
)

# num_masks of the 24 rows, in file order: 9 x 1, 6 x 2, 5 x 3, 4 x 4, interleaved.
NUM_MASKS = [1, 2, 3, 4, 1, 1, 2, 3, 1, 2, 4, 1, 3, 2, 1, 4, 1, 2, 3, 1, 2, 1, 4, 3]
BATCH = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny local "model" dir (trained word-level tokenizer + Qwen2 config), a RAMP parquet and a recipe."""
    root = tmp_path_factory.mktemp("curriculum")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["fill in each [mask] of the passage", "user assistant answer search"],
        trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(root / "model")
    Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(root / "model")

    rows = []
    for index, k in enumerate(NUM_MASKS):
        spans = [f"span{index}_{j}" for j in range(k)]
        rows.append(
            {
                "data_source": "ramp",
                "prompt": [{"role": "user", "content": "fill in each " + " ".join(["[mask]"] * k) + " of the passage"}],
                "ability": "ramp",
                "reward_model": {"style": "rule", "ground_truth": {"target": [" | ".join(spans)], "masks": spans}},
                "extra_info": {
                    "index": index,
                    "num_masks": k,
                    "split": "train",
                    "tools_kwargs": {"search": {"create_kwargs": {"item_id": str(index)}}},
                },
                "agent_name": "tool_agent",
            }
        )
    pd.DataFrame(rows).to_parquet(root / "train.parquet")
    # A recipe as ours are written: verl's config first on the search path, then our config groups.
    (root / "recipe.yaml").write_text(
        "hydra:\n  searchpath:\n    - pkg://verl.trainer.config\n    - pkg://recipes.configs\n"
        "defaults:\n  - ppo_trainer\n  - _self_\n"
    )
    return root


def compose_config(workdir: Path, *overrides: str):
    base = [
        f"data.train_files={workdir / 'train.parquet'}",
        f"data.val_files={workdir / 'train.parquet'}",
        f"data.train_batch_size={BATCH}",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={workdir / 'model'}",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        "trainer.n_gpus_per_node=1",
        "algorithm.adv_estimator=grpo",
        f"trainer.default_local_dir={workdir / 'ckpt'}",
    ]
    with initialize_config_dir(config_dir=str(workdir), version_base=None):
        return compose("recipe", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def base_config(workdir):
    """verl's composed config with our trainer mode; tests add ``curriculum.*`` keys (composing costs seconds)."""
    return compose_config(workdir, f"trainer.v1.trainer_mode={TRAINER_MODE}")


def with_options(base_config, *dotlist: str):
    config = copy.deepcopy(base_config)
    with open_dict(config):
        config.merge_with(OmegaConf.from_dotlist(list(dotlist)))
    return config


def build_trainer(base_config, *dotlist: str) -> CurriculumPPOTrainer:
    """The trainer as verl's TaskRunnerV1 creates it, with the CPU part of its set-up done."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = with_options(base_config, *dotlist)
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config=config)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    trainer.global_steps = 0
    return trainer


def next_prompts(trainer, batches: int) -> list[int]:
    """Row indices of the next ``batches`` train batches, fetched through verl's own dataloader path."""
    out = []
    for _ in range(batches):
        batch = trainer._next_train_batch()
        out.extend(int(info["index"]) for info in list(batch["extra_info"]))
    return out


def masks_of(indices: list[int]) -> list[int]:
    return [NUM_MASKS[i] for i in indices]


class NoWeights:
    """Stands in for verl's GPU worker group: these checkpoints only carry the dataloader state (data.pt)."""

    def save_checkpoint(self, *args, **kwargs):
        pass

    def load_checkpoint(self, *args, **kwargs):
        pass


def save_verl_checkpoint(trainer, step: int) -> None:
    trainer.global_steps = step
    trainer.actor_rollout_wg = NoWeights()
    trainer._save_checkpoint()


def resume_verl_checkpoint(base_config, *dotlist: str) -> CurriculumPPOTrainer:
    trainer = build_trainer(base_config, *dotlist, "trainer.resume_mode=auto")
    trainer.actor_rollout_wg = NoWeights()
    trainer._load_checkpoint()
    return trainer


@pytest.fixture(scope="module", autouse=True)
def fresh_verl_import():
    """A fresh interpreter that only runs ``import verl`` and looks our trainer mode up.

    Started before the other tests and checked by the last one: on a 2-core CI box the ~10 s import overlaps them.
    """
    code = (
        "import verl\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        f"cls = get_trainer_cls({TRAINER_MODE!r})\n"
        "print(cls.__module__ + '.' + cls.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


# ---------------------------------------------------------------------------------------------- wiring into verl


def test_trainer_keeps_verl_sync_semantics(base_config):
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    trainer = build_trainer(base_config, "curriculum.mode=mixed")
    assert isinstance(trainer, PPOTrainerSync)
    assert trainer.config.trainer.v1.trainer_mode == TRAINER_MODE
    assert trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer and not isinstance(trainer.replay_buffer, ReplayBufferAsync)
    assert trainer.train_dataloader.sampler is trainer.curriculum_sampler
    assert trainer.train_dataloader.batch_size == BATCH


def test_hydra_compose_passes_verl_validation(workdir, base_config):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    # Our config group (recipes/configs/curriculum/, found through pkg://recipes.configs), and plain overrides.
    grouped = compose_config(workdir, "+curriculum=adaptive", "curriculum.reward_threshold=0.7")
    plain = compose_config(
        workdir, f"trainer.v1.trainer_mode={TRAINER_MODE}", "+curriculum.mode=staged", "+curriculum.epochs_per_stage=2"
    )
    for config in (grouped, plain):
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        assert config.trainer.v1.trainer_mode == TRAINER_MODE
    assert curriculum_config_from(grouped) == CurriculumConfig(mode="adaptive", reward_threshold=0.7, seed=0)
    assert curriculum_config_from(plain) == CurriculumConfig(mode="staged", epochs_per_stage=2, seed=0)
    assert curriculum_config_from(with_options(base_config, "data.seed=5")).seed == 5
    # Every file of the group selects our trainer mode and holds only valid options.
    group_dir = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "curriculum"
    modes = set()
    for path in sorted(group_dir.glob("*.yaml")):
        assert path.read_text().startswith("# @package _global_"), path
        options = OmegaConf.load(path)
        assert options.trainer.v1.trainer_mode == TRAINER_MODE
        config = copy.deepcopy(base_config)
        with open_dict(config):
            config.curriculum = options.curriculum
        modes.add(curriculum_config_from(config).mode)
    assert modes == {"mixed", "staged", "adaptive"}

    # Bad options fail when the trainer is created (before any worker), naming the key.
    from verl.trainer.ppo.v1 import get_trainer_cls

    typo = with_options(base_config, "curriculum.mode=staged", "curriculum.epochs_per_stag=2")
    with pytest.raises(ValueError, match=r"curriculum\.epochs_per_stag\b"):
        get_trainer_cls(TRAINER_MODE)(config=typo)
    with pytest.raises(ValueError, match="curriculum.mode must be one of"):
        curriculum_config_from(with_options(base_config, "curriculum.mode=reverse"))


# ---------------------------------------------------------------------------------------------- order per mode


def test_mixed_reshuffles_every_item_each_pass(base_config):
    trainer = build_trainer(base_config, "curriculum.mode=mixed")
    first, second = next_prompts(trainer, 6), next_prompts(trainer, 6)
    assert sorted(first) == sorted(second) == list(range(len(NUM_MASKS)))
    assert first != second
    assert masks_of(first) != sorted(masks_of(first))


def test_staged_by_epochs_goes_one_mask_count_at_a_time_then_mixes(base_config):
    trainer = build_trainer(base_config, "curriculum.mode=staged", "curriculum.epochs_per_stage=1")
    drawn = next_prompts(trainer, 6)  # 24 draws = one pass over each stage
    assert masks_of(drawn) == sorted(NUM_MASKS)  # 1s, then 2s, 3s, 4s; batches straddle stage ends
    assert sorted(drawn) == list(range(len(NUM_MASKS)))
    after = next_prompts(trainer, 6)
    assert sorted(after) == list(range(len(NUM_MASKS)))  # final phase: everything, shuffled
    assert masks_of(after) != sorted(masks_of(after))


def test_staged_by_steps_with_replay(base_config):
    trainer = build_trainer(
        base_config, "curriculum.mode=staged", "curriculum.steps_per_stage=2", "curriculum.replay_fraction=0.25"
    )
    drawn = masks_of(next_prompts(trainer, 8))  # 4 stages x 2 steps x 4 prompts
    stages = [drawn[i : i + 8] for i in range(0, 32, 8)]
    assert stages[0] == [1] * 8
    for k, stage in enumerate(stages[1:], start=2):
        counts = Counter(stage)
        assert counts[k] == 6  # 6 of 8 draws from the stage itself ...
        assert sum(c for m, c in counts.items() if m < k) == 2  # ... 2 replayed from earlier stages
        assert all(m <= k for m in stage)


def test_same_seed_same_stream_other_seed_differs():
    config = CurriculumConfig(mode="staged", seed=3, replay_fraction=0.2)
    one = list(islice(MaskCountCurriculumSampler(NUM_MASKS, config), 100))
    two = list(islice(MaskCountCurriculumSampler(NUM_MASKS, config), 100))
    other = list(islice(MaskCountCurriculumSampler(NUM_MASKS, CurriculumConfig(mode="staged", seed=4)), 100))
    assert one == two
    assert one != other


# ---------------------------------------------------------------------------------------------- adaptive


def test_adaptive_advances_only_past_threshold_window_and_min_steps():
    config = CurriculumConfig(mode="adaptive", reward_threshold=0.5, window=3, min_steps_per_stage=4)
    sampler = MaskCountCurriculumSampler(NUM_MASKS, config)
    stream = iter(sampler)
    feed = lambda step, r: sampler.update(step, {SCORE_METRIC: r})  # noqa: E731

    assert masks_of([next(stream) for _ in range(30)]) == [1] * 30  # no feedback: stays on stage 1 (cycling)
    assert not any(feed(step, 0.1) for step in range(1, 10))  # below the bar, however long
    assert not feed(10, 0.9)  # window (0.1, 0.1, 0.9): mean 0.37
    assert feed(11, 0.9)  # window (0.1, 0.9, 0.9): mean 0.63 >= 0.5
    assert sampler.stage == 1 and masks_of([next(stream) for _ in range(12)]) == [2] * 12

    # The window restarts on a new stage: three good steps are not enough before min_steps_per_stage=4.
    assert not feed(12, 1.0) and not feed(13, 1.0) and not feed(14, 1.0)
    assert feed(15, 1.0) and sampler.stage == 2
    assert not feed(15, 1.0)  # a step seen before is not counted twice
    for step in range(16, 24):
        feed(step, 1.0)
    assert sampler.in_final_phase  # stage 4 done -> every item, mixed
    assert sorted(next(stream) for _ in range(24)) == list(range(24))

    with pytest.raises(KeyError, match="reward_metric"):
        sampler.update(99, {"critic/score/mean": 1.0})

    # Without a minimum, the first full window decides: two great steps are not a window of three.
    quick = MaskCountCurriculumSampler(NUM_MASKS, CurriculumConfig(mode="adaptive", window=3, min_steps_per_stage=0))
    assert not quick.update(1, {SCORE_METRIC: 1.0}) and not quick.update(2, {SCORE_METRIC: 1.0})
    assert quick.update(3, {SCORE_METRIC: 1.0})


def test_trainer_step_feeds_adaptive_with_rollout_scores(base_config, monkeypatch):
    """Our ``step`` override reads rm_scores from TransferQueue after verl's step (both stubbed: they need GPUs)."""
    from verl.trainer.ppo.v1.replay_buffer import DAPO_FILTERED_REWARD_COUNTS_KEY
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    trainer = build_trainer(
        base_config,
        "curriculum.mode=adaptive",
        "curriculum.window=2",
        "curriculum.min_steps_per_stage=2",
        "curriculum.reward_threshold=0.6",
        "algorithm.filter_groups.enable=True",
        "algorithm.filter_groups.metric=reward",
    )
    assert trainer.train_dataloader.batch_size == 1  # verl forces gen_batch_size=1 under DAPO; we keep it

    step_scores: dict = {}

    def verl_step(self, metrics, timing_raw):
        metrics["actor/pg_loss"] = 0.0
        metrics[DAPO_FILTERED_REWARD_COUNTS_KEY] = step_scores["filtered"]
        keys = [f"k{i}" for i in range(len(step_scores["rows"]))]
        return SimpleNamespace(keys=keys, tags=step_scores["tags"], partition_id="train")

    def kv_batch_get(keys, partition_id, select_fields):
        assert partition_id == "train"
        if select_fields == ["extra_fields"]:  # the base trainer mode's env/* and reward/* metrics
            return {"extra_fields": [{"search_count": len(r), "reward_extra_info": {"acc": r[-1]}}
                                     for r in step_scores["rows"]]}
        assert select_fields == ["rm_scores"]
        rows = [torch.tensor(r, dtype=torch.float32) for r in step_scores["rows"]]
        return {"rm_scores": torch.nested.nested_tensor(rows, layout=torch.jagged)}

    monkeypatch.setattr(PPOTrainerSync, "step", verl_step)
    monkeypatch.setattr(curriculum_trainer.tq, "kv_batch_get", kv_batch_get)

    def run_step(step, rows, tags, filtered):
        step_scores.update(rows=rows, tags=tags, filtered=filtered)
        trainer.global_steps = step
        metrics: dict = {}
        trainer.step(metrics, {})
        return metrics

    # Kept rows score 0+1 (the padding row's 5 is ignored); 1 filtered all-0 group of n=2 -> mean 1/4.
    m = run_step(1, [[0.0, 0.0], [0.0, 1.0], [5.0]], [{}, {}, {"is_padding": True}], {0.0: 1})
    # masksearch_sync's per-episode means cover the kept rows only.
    assert m["env/search_count/mean"] == 2.0 and m["reward/acc/mean"] == 0.5
    assert m[SCORE_METRIC] == pytest.approx(0.25)
    run_step(2, [[0.0], [1.0]], [{}, {}], {0.0: 1})
    assert trainer.curriculum_sampler.stage == 0  # mean 0.25 < 0.5
    # DAPO drops all-correct groups from the batch; counting them is what lets the stage pass: (0+1+1+1)/4.
    # (The kept rows alone would average 0.5, below the 0.6 bar, forever.)
    m = run_step(3, [[0.0], [1.0]], [{}, {}], {1.0: 1})
    assert m[SCORE_METRIC] == pytest.approx(0.75) and trainer.curriculum_sampler.stage == 0  # window mean 0.5
    m = run_step(4, [[0.0], [1.0]], [{}, {}], {1.0: 1})
    assert trainer.curriculum_sampler.stage == 1 and m["curriculum/stage_num_masks"] == 2.0
    assert math.isnan(m["curriculum/reward_window_mean"])  # the window restarts on a new stage
    drawn = masks_of(next_prompts(trainer, 5))
    assert drawn == [2] * len(drawn) and len(drawn) == 5 * BATCH


# ---------------------------------------------------------------------------------------------- resumption


def test_staged_resumes_mid_stage_through_verl_checkpoint(base_config, tmp_path):
    overrides = ("curriculum.mode=staged", "curriculum.epochs_per_stage=1.5", f"trainer.default_local_dir={tmp_path}")
    trainer = build_trainer(base_config, *overrides)
    before = next_prompts(trainer, 5)  # 20 draws: stage 1 has 14 (1.5 passes over 9), so mid stage 2
    assert masks_of(before)[-1] == 2 and trainer.curriculum_sampler.stage == 1
    save_verl_checkpoint(trainer, step=5)
    assert (tmp_path / "global_step_5" / "data.pt").exists()
    expected = next_prompts(trainer, 10)

    resumed = resume_verl_checkpoint(base_config, *overrides)
    assert resumed.global_steps == 5
    assert resumed.curriculum_sampler.metrics()["curriculum/total_draws"] == 20  # restored before the first step
    assert next_prompts(resumed, 10) == expected


def test_adaptive_resume_keeps_reward_window(base_config, tmp_path):
    overrides = (
        "curriculum.mode=adaptive",
        "curriculum.window=3",
        "curriculum.min_steps_per_stage=3",
        f"trainer.default_local_dir={tmp_path}",
    )
    rewards = [0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]

    def run(trainer, steps):
        out = []
        for step in steps:
            out.extend(next_prompts(trainer, 1))
            trainer.curriculum_sampler.update(step, {SCORE_METRIC: rewards[step - 1]})
        return out

    trainer = build_trainer(base_config, *overrides)
    run(trainer, range(1, 6))  # stage 2 entered at step 3; steps 4 (0.2) and 5 (0.9) are in its window
    assert trainer.curriculum_sampler.stage == 1
    saved_metrics = trainer.curriculum_sampler.metrics()
    save_verl_checkpoint(trainer, step=5)
    expected = run(trainer, range(6, 11))

    resumed = resume_verl_checkpoint(base_config, *overrides)
    assert resumed.curriculum_sampler.metrics() == saved_metrics
    assert run(resumed, range(6, 11)) == expected
    assert resumed.curriculum_sampler.metrics() == trainer.curriculum_sampler.metrics()


def test_resume_with_loader_workers(base_config):
    """With worker processes torchdata snapshots the sampler as it hands out indices; resuming is still exact."""
    trainer = build_trainer(base_config, "curriculum.mode=staged", "data.dataloader_num_workers=2")
    loader = trainer.train_dataloader
    assert loader.num_workers == 2 and loader.sampler is trainer.curriculum_sampler
    stream = iter(loader)
    first = [list(next(stream)["index"]) for _ in range(4)]
    state = loader.state_dict()  # by now the workers have been handed indices beyond batch 4
    expected = [list(next(stream)["index"]) for _ in range(5)]
    stream._shutdown_workers()  # now, rather than at a garbage collection during some later test
    assert masks_of([i for batch in first for i in batch]) == [1] * 9 + [2] * 6 + [3]

    sampler = MaskCountCurriculumSampler(read_num_masks(trainer.train_dataset), trainer.curriculum_config, BATCH)
    fresh = rebuild_with_sampler(loader, sampler)
    fresh.load_state_dict(state)
    stream = iter(fresh)
    resumed = [list(next(stream)["index"]) for _ in range(5)]
    stream._shutdown_workers()
    assert resumed == expected


def test_state_from_another_run_is_refused():
    staged = MaskCountCurriculumSampler(NUM_MASKS, CurriculumConfig(mode="staged"))
    with pytest.raises(ValueError, match="does not match this run"):
        MaskCountCurriculumSampler(NUM_MASKS, CurriculumConfig(mode="adaptive")).load_state_dict(staged.state_dict())
    with pytest.raises(ValueError, match="does not match this run"):
        MaskCountCurriculumSampler(NUM_MASKS[::-1], CurriculumConfig(mode="staged")).load_state_dict(
            staged.state_dict()
        )


# ---------------------------------------------------------------------------------------------- helpers


def test_read_num_masks_follows_verl_subsampling(base_config):
    trainer = build_trainer(base_config, "curriculum.mode=mixed", "data.train_max_samples=10", "data.seed=1")
    dataset = trainer.train_dataset
    assert len(dataset) == 10
    assert read_num_masks(dataset) == [dataset[i]["extra_info"]["num_masks"] for i in range(10)]
    assert read_num_masks(dataset) != NUM_MASKS[:10]  # a random subset: the column access must honour it
    with pytest.raises(ValueError, match="extra_info.num_spans"):
        read_num_masks(dataset, "extra_info.num_spans")


def test_mean_step_score_counts_filtered_groups():
    assert mean_step_score([1.0, 0.0], None, group_size=2) == 0.5
    assert mean_step_score([1.0, 0.0], {1.0: 2, 0.0: 1}, group_size=2) == pytest.approx(5 / 8)
    assert math.isnan(mean_step_score([], {}, group_size=4))


def test_entry_point_registers_trainer_mode(fresh_verl_import):
    from importlib.metadata import entry_points

    assert "masksearch_rl.verl_plugins" in {ep.value for ep in entry_points(group="verl.plugins")}
    # The probe interpreter imported nothing but verl: the mode can only have come from our entry point.
    stdout, stderr = fresh_verl_import.communicate(timeout=300)
    assert fresh_verl_import.returncode == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-1] == "masksearch_rl.verl_ext.curriculum_trainer.CurriculumPPOTrainer"
