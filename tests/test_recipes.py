"""The recipes under recipes/configs compose against the installed verl 0.9.1 the way main_ppo composes them, pass
verl's own start-up validation, and resolve to DAPO; the launch scripts parse and build commands that compose too.

What is checked, per recipe, with verl's real code (no Ray, no training):
- hydra composition from the recipe's directory with verl's ppo_trainer on the search path (as main_ppo does), and
  once through main_ppo's own hydra entry point (``--cfg job``, in process) on the command a launch script prints;
- ``verl.utils.config.validate_config`` (what main_ppo runs before starting Ray), the dataclass conversions verl's
  workers do at start-up (actor, rollout, model with a tiny local model in place of the hub id, algorithm,
  checkpoint engine) and verl's reward-manager lookup;
- the DAPO values, our agent loop and search settings, our reward function loaded through verl's
  ``get_custom_reward_fn`` and our ``masksearch`` reward manager (verl's dapo + the rollout's fields) built by
  verl's ``load_reward_manager`` and run on a short and an over-long response.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from masksearch_rl.rl.launch import OVERLAY_GROUPS, recipe_names

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
LAUNCH = REPO / "recipes" / "launch"

# Every recipe the docs promise (docs/recipes.md); a new YAML file is picked up by RECIPES automatically.
EXPECTED = {
    *(f"{stage}/qwen2.5-{size}_8gpu" for stage in ("ramp_dapo", "hotpotqa_dapo") for size in ("1.5b", "3b", "7b")),
    "quickstart/qwen2.5-0.5b_cpu",
    "ramp_dapo/qwen2.5-1.5b_8gpu_hermes",
}
RECIPES = recipe_names()
CPU = [r for r in RECIPES if r.startswith(("quickstart/", "lab/"))]  # our CPU platform (platform/cpu.yaml)
TRAINING = [r for r in RECIPES if r not in CPU]
RAMP = [r for r in RECIPES if r.startswith(("ramp_dapo/", "quickstart/", "lab/"))]
HERMES = [r for r in RECIPES if r.endswith("_hermes")]  # verl's tool_agent loop + our search tool


@pytest.fixture(scope="session", autouse=True)
def verl_imported():
    """``import verl`` as main_ppo does: it loads our ``verl.plugins`` entry point (agent loop, trainer mode)."""
    import verl  # noqa: F401


@lru_cache(maxsize=None)
def _compose_cached(recipe: str, overrides: tuple[str, ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    group, name = recipe.split("/")
    # main_ppo: @hydra.main(config_path=<--config-path>, version_base=None); the recipe adds verl's config dir and
    # ours through its own hydra.searchpath.
    with initialize_config_dir(config_dir=str(CONFIGS / group), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def compose(recipe: str, *overrides: str, resolve: bool = True) -> DictConfig:
    """A fresh copy of the composed recipe, resolved as verl's TaskRunner resolves it."""
    cfg = _compose_cached(recipe, tuple(overrides)).copy()
    if resolve:
        OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A Qwen2 config and a byte-level BPE tokenizer (with a chat template) trained here: what HFModelConfig and the
    reward manager need from a model directory, without downloading one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    path = tmp_path_factory.mktemp("tiny_qwen2")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["<think> I know it. </think>\n<answer> Paris | 1889 </answer>", "filler " * 8] * 50
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(path)
    Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ the set of recipes
def test_every_promised_recipe_exists():
    assert EXPECTED <= set(RECIPES), f"missing recipes: {sorted(EXPECTED - set(RECIPES))}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header_documents_its_launch(recipe):
    """Configs are launch documentation: what it trains, what must exist, the exact command, an example override."""
    text = (CONFIGS / f"{recipe}.yaml").read_text()
    header = text[: text.index("\ndefaults:")]
    assert all(line.startswith("#") for line in header.strip().splitlines()), "header must be one comment block"
    assert "Needs first" in header and "Example override" in header
    group, name = recipe.split("/")
    launch = f"python -m verl.trainer.main_ppo --config-path pkg://recipes.configs.{group} --config-name {name}"
    assert launch in header
    assert f"recipes/launch/single_node.sh {recipe}" in header


def test_recipe_packages_resolve_from_this_checkout():
    """``pkg://recipes.configs.<group>`` must resolve to these files (editable install), else edits are ignored."""
    import importlib

    for group in {r.split("/")[0] for r in RECIPES} | set(OVERLAY_GROUPS):
        module = importlib.import_module(f"recipes.configs.{group}")
        assert Path(module.__file__).resolve().parent == CONFIGS / group


# --------------------------------------------------------------------------------- verl validation + dataclasses
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_verl_startup_validation(recipe, tiny_model):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import AgentLoopConfig, FSDPActorConfig, HFModelConfig, RolloutConfig

    cfg = compose(recipe)
    # DAPO has neither a KL term (so no reference model) nor a critic.
    assert not need_reference_policy(cfg) and not need_critic(cfg)
    validate_config(cfg, use_reference_policy=False, use_critic=False)  # raises on a bad batch/parallel setting

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, FSDPActorConfig) and actor.strategy == "fsdp2"
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert isinstance(rollout, RolloutConfig) and isinstance(rollout.agent, AgentLoopConfig)
    assert rollout.response_length == cfg.data.max_response_length
    assert rollout.prompt_length == cfg.data.max_prompt_length
    algorithm = omega_conf_to_dataclass(cfg.algorithm)
    assert isinstance(algorithm, AlgoConfig) and algorithm.filter_groups.metric == cfg.algorithm.filter_groups.metric
    # verl resolves the manager from the DictConfig (its RewardManagerConfig dataclass cannot be instantiated in
    # 0.9.1: __post_init__ calls a super().__post_init__ that BaseConfig lacks), so check what verl itself does.
    assert resolve_reward_manager_cls(cfg).__name__ == "MaskSearchRewardManager"
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.checkpoint_engine)

    # The model section as the workers build it; the hub id is swapped for a local directory (no download).
    model_section = cfg.actor_rollout_ref.model.copy()
    model_section.path = str(tiny_model)
    model = omega_conf_to_dataclass(model_section)
    assert isinstance(model, HFModelConfig) and model.tokenizer is not None


@pytest.mark.parametrize("recipe", TRAINING)
def test_training_recipes_validate_on_n_nodes(recipe):
    """N x 8 GPUs is the same recipe with trainer.nnodes=N (what ray_submit.sh passes)."""
    from verl.utils.config import validate_config

    for nodes in (2, 4, 16):
        cfg = compose(recipe)
        cfg.trainer.nnodes = nodes  # = the command-line override of an existing key, without a second compose
        validate_config(cfg, use_reference_policy=False, use_critic=False)


# ----------------------------------------------------------------------------------------------- DAPO values
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_resolves_to_dapo(recipe):
    cfg = compose(recipe)
    actor, algorithm = cfg.actor_rollout_ref.actor, cfg.algorithm
    # Clip-higher, token-level loss, no KL anywhere, group-relative advantages.
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert actor.loss_agg_mode == "token-mean"
    assert actor.use_kl_loss is False and algorithm.use_kl_in_reward is False
    assert algorithm.adv_estimator == "grpo"
    # The paper's step size; the CPU recipes' tiny models trained from scratch need larger ones to move in a few steps.
    assert actor.optim.lr == pytest.approx({"quickstart/tiny_cpu": 1e-4, "lab/tiny_cpu": 2e-5}.get(recipe, 1e-6))
    # Overlong shaping: our dapo-based manager with its buffer inside the response budget.
    assert cfg.reward.reward_manager.source == "register" and cfg.reward.reward_manager.name == "masksearch"
    overlong = cfg.reward.reward_kwargs.overlong_buffer_cfg
    assert overlong.enable is True and overlong.penalty_factor == 1.0 and "log" in overlong
    assert cfg.reward.reward_kwargs.max_resp_len == cfg.data.max_response_length > overlong.len > 0
    # Groups of rollouts, generated by the agent-loop (async) rollout.
    assert cfg.actor_rollout_ref.rollout.n >= 4 and cfg.actor_rollout_ref.rollout.mode == "async"
    # Our reward function.
    fn = cfg.reward.custom_reward_function
    assert (fn.path, fn.name) == ("pkg://reward.masksearch_reward", "compute_score")
    if recipe in TRAINING:
        # Dynamic sampling on `acc` (our reward's answer credit) and the rollout sizes of a real run.
        assert algorithm.filter_groups.enable is True and algorithm.filter_groups.metric == "acc"
        assert cfg.actor_rollout_ref.rollout.n in (8, 16)
        assert list(cfg.trainer.logger) == ["console", "wandb"]
    elif recipe == "lab/tiny_cpu":
        # The lab's SFT policy answers some items right: its groups differ in `acc`, the training recipes' metric.
        assert algorithm.filter_groups.enable is True and algorithm.filter_groups.metric == "acc"
        assert cfg.actor_rollout_ref.rollout.n == 8
    elif recipe == "quickstart/tiny_cpu":
        # The demo's documented exception to the format rule (test_one_format_rule_in_every_recipe): a format bonus,
        # and filtering on `score`, since its tiny model's groups differ in format, never in recall.
        assert algorithm.filter_groups.enable is True and algorithm.filter_groups.metric == "score"
        assert fn.reward_kwargs.format_weight > 0
    else:
        # A real 0.5B model at toy scale: filtering off (its groups may all score 0 and the refill would not end).
        assert algorithm.filter_groups.enable is False
    assert cfg.trainer.project_name == "masksearch-rl"


# The one documented exception: the CPU demo pays a format bonus so its four steps have a gradient at all (its tiny
# model fills no span yet); its recipe and docs/recipes.md say that its curve is a format curve, not learning.
FORMAT_BONUS_DEMOS = {"quickstart/tiny_cpu": 0.2}


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_format_rule_in_every_recipe(recipe):
    """Format is a gate that earns nothing by itself (docs/recipes.md, "One format rule"): an ill-formed rollout
    gets no answer credit, a well-formed wrong one scores 0 -- in every recipe but the CPU demo's."""
    from omegaconf import OmegaConf

    from reward.combine import RewardConfig

    kwargs = OmegaConf.to_container(compose(recipe).reward.custom_reward_function.get("reward_kwargs") or {})
    config = RewardConfig.from_kwargs(kwargs, env={})
    assert config.format_gate is True and config.format_penalty == 0 and config.answer_weight == 1.0
    assert config.format_weight == FORMAT_BONUS_DEMOS.get(recipe, 0)


def test_experiment_names_are_distinct():
    names = [compose(r).trainer.experiment_name for r in RECIPES]
    assert len(set(names)) == len(names), names


def test_recipes_scale_with_model_size():
    for stage in ("ramp_dapo", "hotpotqa_dapo"):
        small, big = compose(f"{stage}/qwen2.5-1.5b_8gpu"), compose(f"{stage}/qwen2.5-7b_8gpu")
        assert "1.5b" in small.trainer.experiment_name and "7b" in big.trainer.experiment_name
        assert big.actor_rollout_ref.rollout.tensor_model_parallel_size > 1
        assert small.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
        tokens_big = big.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
        assert tokens_big < small.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
    for size, hub_id in {"1.5b": "Qwen2.5-1.5B", "3b": "Qwen2.5-3B", "7b": "Qwen2.5-7B"}.items():
        assert compose(f"ramp_dapo/qwen2.5-{size}_8gpu").actor_rollout_ref.model.path == f"Qwen/{hub_id}-Instruct"


# ------------------------------------------------------------------------------------ agent loop + search env
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_our_agent_loop_and_search_settings(recipe, monkeypatch):
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    from envs.agent_loop import SearchEnvConfig

    monkeypatch.setenv("MASKSEARCH_RETRIEVAL_URL", "http://retriever.test:9000")
    cfg = compose(recipe)
    loop = cfg.actor_rollout_ref.rollout.agent.default_agent_loop
    assert loop == ("tool_agent" if recipe in HERMES else "masksearch_agent") and loop in _agent_loop_registry
    env = SearchEnvConfig.from_trainer_config(cfg)  # the agent loop's own parser: unknown keys would fail here
    assert env.backend["type"] == "server" and env.backend["url"] == "http://retriever.test:9000"
    assert env.backend["timeout_s"] > 0 and env.backend["max_retries"] >= 1
    if recipe.startswith("lab/"):
        # The lab's task: one passage per search, one search (what its oracle did), the policy's text beside it.
        assert env.topk == 1 and env.max_turns == 1
        assert cfg.data.max_response_length - env.max_info_tokens >= 128
        return
    assert 1 <= env.max_turns <= 8 and env.topk == 3
    # The results of every allowed search together still leave room for the policy's own tokens.
    assert env.max_turns * env.max_info_tokens <= cfg.data.max_response_length // 2


def test_default_retrieval_url_without_environment(monkeypatch):
    monkeypatch.delenv("MASKSEARCH_RETRIEVAL_URL", raising=False)
    assert compose(TRAINING[0]).search_env.backend.url == "http://127.0.0.1:8000"


def test_web_search_backend_by_override(monkeypatch):
    """docs/recipes.md: a web API instead of the retrieval server is two overrides; the backend builds from them."""
    from envs.agent_loop import SearchEnvConfig
    from masksearch_rl.retrieval.web import make_backend

    monkeypatch.setenv("SERPER_API_KEY", "test-key")
    cfg = compose("ramp_dapo/qwen2.5-1.5b_8gpu", "search_env.backend.type=serper", "~search_env.backend.url")
    backend = make_backend(SearchEnvConfig.from_trainer_config(cfg).backend)
    assert backend.name == "serper"


def test_trainer_mode_and_agent_loop_registered_after_import_verl():
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.v1 import get_trainer_cls

    from masksearch_rl.verl_ext.curriculum_trainer import CurriculumPPOTrainer
    from masksearch_rl.verl_ext.trainer import MaskSearchPPOTrainer

    assert get_trainer_cls("masksearch_curriculum") is CurriculumPPOTrainer
    assert get_trainer_cls("masksearch_sync") is MaskSearchPPOTrainer
    assert issubclass(CurriculumPPOTrainer, MaskSearchPPOTrainer)
    assert _agent_loop_registry["masksearch_agent"]["_target_"] == "envs.agent_loop.MaskSearchAgentLoop"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.startswith("hotpotqa_dapo/")])
def test_judge_example_override_caches_in_the_run_directory(recipe):
    """The headers' judge example composes, and gives the judge an on-disk cache under the run's directory."""
    from reward.combine import RewardConfig

    text = (CONFIGS / f"{recipe}.yaml").read_text()
    command = []  # the example's command: its first line and every continuation ("\\" at the end) after it
    for line in text[text.index("# Example override:") :].splitlines()[1:]:
        line = line.lstrip("#").strip()
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(command))
    overrides = argv[argv.index(recipe) + 1 :]
    cfg = compose(recipe, *overrides)
    judge = RewardConfig.from_kwargs(cfg.reward.custom_reward_function.reward_kwargs, env={}).judge
    assert cfg.reward.custom_reward_function.reward_kwargs.qa_metric == "judge"
    assert judge["cache_dir"] == f"{cfg.trainer.default_local_dir}/judge_cache"


# ------------------------------------------------------------------------------------------------ hermes variant
HERMES_KEYS = ("data.train_files", "data.val_files", "data.tool_config_path", "actor_rollout_ref.rollout.agent",
               "actor_rollout_ref.rollout.multi_turn", "ray_kwargs.ray_init.runtime_env.env_vars",
               "trainer.experiment_name")


@pytest.mark.parametrize("recipe", HERMES)
def test_hermes_recipe_is_its_base_recipe_plus_the_hermes_keys(recipe):
    """Hydra does not let a recipe include another primary config, so the hermes recipe repeats its base's values;
    they must not drift apart."""
    base, variant = compose(recipe.removesuffix("_hermes"), resolve=False), compose(recipe, resolve=False)
    for cfg in (base, variant):
        for key in HERMES_KEYS:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent)
            with open_dict(node):
                node.pop(leaf, None)
    assert OmegaConf.to_container(variant) == OmegaConf.to_container(base)


@pytest.mark.parametrize("recipe", HERMES)
def test_hermes_recipe_tool_budget_and_reward(recipe, tiny_model, monkeypatch):
    """What the hermes recipe hands verl: the tool verl's AgentLoopWorker loads (counting the policy's tokens), a
    tool-response limit above what the tool returns, and a reward that scores the tool_agent loop's responses."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.tools.tool_registry import load_all_tools
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import resolve_config_path

    from envs.search_tool import SearchTool

    cfg = compose(recipe, f"actor_rollout_ref.model.path={tiny_model}")
    multi_turn = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout.multi_turn)
    assert multi_turn.enable and multi_turn.format == "hermes" and "tool_agent" in _agent_loop_registry
    assert cfg.data.tool_config_path == multi_turn.tool_config_path
    # Ray hands runtime_env.env_vars to every worker; the tool YAML reads the policy's tokenizer from there.
    env_vars = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars.MASKSEARCH_POLICY_TOKENIZER == str(tiny_model)
    for name, value in env_vars.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)  # the launch directory, as the recipe's header says
    (tool,) = load_all_tools(tool_config_path=resolve_config_path(multi_turn.tool_config_path), function_tool_path=None)
    assert isinstance(tool, SearchTool) and tool.tokenizer is not None and tool.tokenizer.name_or_path == str(tiny_model)
    # verl's character cut stays above the tool's own token cut (8 characters a token is far above English text's ~4)
    assert multi_turn.max_tool_response_length >= 8 * tool.settings.max_info_tokens
    assert multi_turn.max_assistant_turns == cfg.search_env.max_turns + 1  # the tag loop's search budget

    reward = get_custom_reward_fn(cfg)
    call = '<tool_call>\n{"name": "search", "arguments": {"query": "Eiffel Tower"}}\n</tool_call>'
    response = (f"I will search.\n{call}\nuser\n<tool_response>\nDoc 1 (Title: Eiffel Tower) ...\n</tool_response>"
                "\nassistant\n<answer> Paris | 1889 </answer>")
    gold = {"target": ["Paris", "1889"], "masks": ["Paris", "1889"]}
    result = _call(reward, data_source="ramp", solution_str=response, ground_truth=gold,
                   extra_info={"agent_name": cfg.actor_rollout_ref.rollout.agent.default_agent_loop})
    assert result["score"] == 1.0 and result["num_searches"] == 1


# ------------------------------------------------------------------------------------------------- curriculum
@pytest.mark.parametrize("recipe", RAMP)
def test_ramp_recipes_order_prompts_by_mask_count(recipe):
    from verl.trainer.ppo.v1 import get_trainer_cls

    from masksearch_rl.verl_ext.curriculum_trainer import CurriculumPPOTrainer, curriculum_config_from

    cfg = compose(recipe)
    assert get_trainer_cls(cfg.trainer.v1.trainer_mode) is CurriculumPPOTrainer
    assert curriculum_config_from(cfg).mode == "staged"
    assert cfg.data.train_files.endswith("ramp_hermes/train.parquet" if recipe in HERMES else "ramp/train.parquet")


@pytest.mark.parametrize("mode", ["mixed", "adaptive"])
def test_curriculum_mode_is_a_plain_group_override(mode):
    """The group is in the recipes' defaults, so another mode is chosen with curriculum=<mode> (no '+')."""
    from masksearch_rl.verl_ext.curriculum_trainer import curriculum_config_from

    cfg = compose("ramp_dapo/qwen2.5-1.5b_8gpu", f"curriculum={mode}")
    assert curriculum_config_from(cfg).mode == mode
    assert cfg.trainer.v1.trainer_mode == "masksearch_curriculum"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.startswith("hotpotqa_dapo/")])
def test_hotpotqa_recipes_start_from_stage_one(recipe):
    cfg = compose(recipe)
    assert cfg.trainer.v1.trainer_mode == "masksearch_sync" and "curriculum" not in cfg
    assert cfg.data.train_files.endswith("hotpotqa/train.parquet")
    size = recipe.split("qwen2.5-")[1].split("_")[0]
    # The default model is Stage I's merged policy, under the Stage I recipe's own checkpoint directory.
    stage1 = compose(f"ramp_dapo/qwen2.5-{size}_8gpu")
    assert cfg.actor_rollout_ref.model.path == f"{stage1.trainer.default_local_dir}/hf"


# ----------------------------------------------------------------------------------------------------- reward
def _call(fn, **kwargs):
    result = fn(**kwargs)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def test_reward_function_loads_through_verl_with_recipe_options():
    from verl.trainer.ppo.reward import get_custom_reward_fn

    ramp = get_custom_reward_fn(compose("ramp_dapo/qwen2.5-1.5b_8gpu"))
    gold = {"target": ["Paris", "1889"], "masks": ["Paris", "1889"]}
    full = _call(ramp, data_source="ramp", solution_str="<think> a </think><answer> Paris | 1889 </answer>",
                 ground_truth=gold, extra_info={})
    half = _call(ramp, data_source="ramp", solution_str="<think> a </think><answer> Paris | 1900 </answer>",
                 ground_truth=gold, extra_info={})
    assert full["score"] == 1.0 and half["score"] == pytest.approx(0.5)  # recall over spans
    assert "acc" in full  # the DAPO filter metric exists in every result

    # Stage II scores QA answers by token recall (the recipe's qa_metric), not exact match, under the commitment
    # guard: a part of the gold earns its share, an answer adding a word of its own earns nothing.
    qa = get_custom_reward_fn(compose("hotpotqa_dapo/qwen2.5-1.5b_8gpu"))
    partial = _call(qa, data_source="hotpotqa", solution_str="<think> a </think><answer> Eiffel </answer>",
                    ground_truth={"target": ["Gustave Eiffel"]}, extra_info={})
    assert partial["score"] == 0.5 and partial["em"] == 0.0
    verbose = _call(qa, data_source="hotpotqa", solution_str="<think> a </think><answer> Paris France </answer>",
                    ground_truth={"target": ["Paris"]}, extra_info={})
    assert verbose["score"] == 0.0


async def test_dapo_manager_punishes_overlong_responses_but_not_acc(tiny_model):
    """verl's own load_reward_manager builds the dapo manager from the recipe, then scores two responses that are
    both right: one short, one inside the overlong buffer."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    cfg = compose("ramp_dapo/qwen2.5-1.5b_8gpu", resolve=False)
    cfg.data.max_response_length = 64  # max_resp_len follows through its interpolation
    cfg.reward.reward_kwargs.overlong_buffer_cfg.len = 16
    OmegaConf.resolve(cfg)
    assert cfg.reward.reward_kwargs.max_resp_len == 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    manager = load_reward_manager(cfg, tokenizer)
    assert type(manager).__name__ == "MaskSearchRewardManager"

    results = {}
    for label, text in {
        "short": "<think> I know it. </think>\n<answer> Paris | 1889 </answer>",
        "long": "<think> I know it. " + "filler " * 40 + "</think>\n<answer> Paris | 1889 </answer>",
    }.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        response = torch.full((1, 64), tokenizer.pad_token_id)
        response[0, : len(ids)] = torch.tensor(ids)
        prompt = torch.tensor([[tokenizer.pad_token_id, tokenizer.eos_token_id]])
        mask = torch.cat([torch.ones(1, 2), (torch.arange(64) < len(ids)).float()[None]], dim=1).long()
        data = DataProto.from_dict(
            tensors={"prompts": prompt, "responses": response, "attention_mask": mask},
            non_tensors={
                "data_source": np.array(["ramp"], dtype=object),
                "reward_model": np.array(
                    [{"ground_truth": {"target": ["Paris", "1889"], "masks": ["Paris", "1889"]}}], dtype=object
                ),
                "extra_info": np.array([{}], dtype=object),
            },
        )
        results[label] = (len(ids), await manager.run_single(data))

    short_len, short = results["short"]
    long_len, long = results["long"]
    assert short_len <= 64 - 16 < long_len <= 64, (short_len, long_len)
    assert short["reward_score"] == 1.0 and not short["reward_extra_info"]["overlong"]
    expected_penalty = -(long_len - (64 - 16)) / 16 * 1.0
    assert long["reward_score"] == pytest.approx(1.0 + expected_penalty)
    assert bool(long["reward_extra_info"]["overlong"])
    # The filter metric ignores the length shaping: both responses count as right.
    assert short["reward_extra_info"]["acc"] == long["reward_extra_info"]["acc"] == 1.0


# ------------------------------------------------------------------------------------------------ launch scripts
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def test_launch_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"single_node.sh", "ray_head.sh", "ray_worker.sh", "ray_submit.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, cwd="/",
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


@pytest.mark.parametrize("script", ["single_node.sh", "ray_submit.sh"])
def test_launch_script_rejects_unknown_recipe(script):
    result = subprocess.run(["bash", str(LAUNCH / script), "ramp_dapo/nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "ramp_dapo/qwen2.5-1.5b_8gpu" in result.stderr  # lists what exists


def _overrides_after_config_name(argv: list[str]) -> tuple[str, str, list[str]]:
    """(--config-path, --config-name, the overrides after them) of a main_ppo command line."""
    i = argv.index("--config-name")
    return argv[argv.index("--config-path") + 1], argv[i + 1], argv[i + 2 :]


def test_single_node_script_builds_a_command_that_composes():
    argv = _dry_run(
        "single_node.sh", "ramp_dapo/qwen2.5-1.5b_8gpu", "actor_rollout_ref.rollout.n=16",
        MASKSEARCH_RETRIEVAL_URL="http://10.1.2.3:8000", MASKSEARCH_DATA_DIR="/shared/data", N_GPUS="4",
    )
    assert argv[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    config_path, name, overrides = _overrides_after_config_name(argv)
    assert (config_path, name) == ("pkg://recipes.configs.ramp_dapo", "qwen2.5-1.5b_8gpu")
    cfg = compose("ramp_dapo/qwen2.5-1.5b_8gpu", *overrides)
    assert cfg.search_env.backend.url == "http://10.1.2.3:8000"
    assert cfg.data.train_files == "/shared/data/ramp/train.parquet"
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (1, 4)
    assert cfg.actor_rollout_ref.rollout.n == 16  # the user's override comes last and wins


def test_ray_submit_script_builds_a_job_that_composes():
    argv = _dry_run(
        "ray_submit.sh", "hotpotqa_dapo/qwen2.5-7b_8gpu", "paths.stage1_model=/shared/ckpt/ramp-7b/hf",
        NNODES="4", RAY_ADDRESS="http://10.0.0.1:8265", MASKSEARCH_RETRIEVAL_URL="http://10.0.0.5:8000",
        MASKSEARCH_DATA_DIR="/shared/data", MASKSEARCH_CKPT_DIR="/shared/ckpt", WANDB_MODE="offline",
    )
    assert argv[:3] == ["ray", "job", "submit"] and "--address=http://10.0.0.1:8265" in argv
    runtime_env = next(a for a in argv if a.startswith("--runtime-env-json="))
    assert '"WANDB_MODE": "offline"' in runtime_env
    entrypoint = argv[argv.index("--") + 1 :]
    assert entrypoint[1:3] == ["-m", "verl.trainer.main_ppo"]
    config_path, name, overrides = _overrides_after_config_name(entrypoint)
    assert (config_path, name) == ("pkg://recipes.configs.hotpotqa_dapo", "qwen2.5-7b_8gpu")
    cfg = compose("hotpotqa_dapo/qwen2.5-7b_8gpu", *overrides)
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (4, 8)
    assert cfg.actor_rollout_ref.model.path == "/shared/ckpt/ramp-7b/hf"
    assert cfg.data.train_files == "/shared/data/hotpotqa/train.parquet"
    assert cfg.trainer.default_local_dir == "/shared/ckpt/masksearch-rl/hotpotqa-dapo-qwen2.5-7b-instruct"
    assert cfg.search_env.backend.url == "http://10.0.0.5:8000"


def test_ray_submit_warns_about_node_local_retrieval_url():
    result = subprocess.run(
        ["bash", str(LAUNCH / "ray_submit.sh"), "ramp_dapo/qwen2.5-3b_8gpu"], capture_output=True, text=True,
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "NNODES": "2",
             "MASKSEARCH_RETRIEVAL_URL": "http://127.0.0.1:8000"},
    )
    assert result.returncode == 0 and "node-local" in result.stderr


def test_main_ppo_accepts_the_printed_command(monkeypatch, capsys):
    """verl's real entry point (its hydra.main) on the command single_node.sh prints, run from an unrelated working
    directory; --cfg job makes hydra print the composed config and return before Ray starts."""
    from hydra.core.global_hydra import GlobalHydra
    from verl.trainer import main_ppo

    argv = _dry_run("single_node.sh", "ramp_dapo/qwen2.5-1.5b_8gpu", "actor_rollout_ref.rollout.n=16",
                    SKIP_HEALTH_CHECK="1")
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"]
    monkeypatch.chdir("/")
    monkeypatch.setattr(sys, "argv", ["main_ppo", *argv[3:], "--cfg", "job", "--resolve"])
    GlobalHydra.instance().clear()
    main_ppo.main()
    out = capsys.readouterr().out
    printed = OmegaConf.create(out[out.index("actor_rollout_ref:") :])
    assert printed.actor_rollout_ref.actor.clip_ratio_high == 0.28
    assert printed.actor_rollout_ref.rollout.n == 16
    assert printed.reward.reward_manager.name == "masksearch"
    assert printed.trainer.v1.trainer_mode == "masksearch_curriculum"
    assert printed.actor_rollout_ref.rollout.agent.default_agent_loop == "masksearch_agent"


# ------------------------------------------------------------------------------------ every key means something
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_a_recipe_sets_is_read(recipe):
    """No key in the recipe's files (the recipe, dapo_base, the groups it picks) that verl 0.9.1 and our plugins
    ignore: unknown to verl's config, a dead field of it, or outside our sections' schemas."""
    from masksearch_rl.rl.config_check import unread_keys

    assert unread_keys(recipe) == []


def test_the_key_check_finds_what_nothing_reads(tmp_path, monkeypatch):
    """Planted mistakes are caught: a dead verl field, a key verl does not have, a misspelt search_env key."""
    import masksearch_rl.rl.config_check as check

    root = tmp_path / "configs"
    (root / "demo").mkdir(parents=True)
    for name in ("dapo_base.yaml",):
        (root / name).write_text((CONFIGS / name).read_text())
    (root / "demo" / "bad.yaml").write_text(
        "defaults:\n  - dapo_base\n  - _self_\n"
        "actor_rollout_ref:\n  actor:\n    grad_clip: 0.5\n    use_torch_compile: false\n    lr_sheduler: cos\n"
        "search_env:\n  top_k: 5\n  topk: 2\n  backend:\n    anything: 1\n"
        "trainer:\n  total_training_steps: 3\n"
    )
    monkeypatch.setattr(check, "CONFIG_ROOT", root)
    problems = dict(check.unread_keys("demo/bad"))
    assert set(problems) == {"actor_rollout_ref.actor.grad_clip", "actor_rollout_ref.actor.use_torch_compile",
                             "actor_rollout_ref.actor.lr_sheduler", "search_env.top_k"}
    assert "optim.clip_grad" in problems["actor_rollout_ref.actor.grad_clip"]
    assert "fsdp_config.use_torch_compile" in problems["actor_rollout_ref.actor.use_torch_compile"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_validation_passes_are_bounded(recipe):
    """val_before_train and test_freq score a bounded sample, not the whole split (masksearch-rl eval does that)."""
    assert 0 < compose(recipe).data.val_max_samples <= 512


@pytest.mark.parametrize("script", ["single_node.sh", "ray_submit.sh"])
def test_launchers_pass_the_validation_sample_size(script):
    argv = _dry_run(script, "ramp_dapo/qwen2.5-1.5b_8gpu", VAL_MAX_SAMPLES="64")
    assert "data.val_max_samples=64" in argv
    assert not any(a.startswith("data.val_max_samples") for a in _dry_run(script, "ramp_dapo/qwen2.5-1.5b_8gpu"))
