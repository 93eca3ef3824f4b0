"""One way to configure (masksearch_rl/configs.py): every section read through it rejects an unknown key, naming it,
and builds its dataclass from plain dicts and OmegaConf nodes alike."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from envs.agent_loop import SearchEnvConfig
from envs.search_client import SearchSettings
from masksearch_rl.configs import from_mapping, plain_mapping
from masksearch_rl.curriculum.sampler import CurriculumConfig
from masksearch_rl.distributed.engine import RayEngineConfig
from masksearch_rl.llm import LLMConfig
from reward.combine import RewardConfig

LOADERS = {
    "search settings": (lambda m: SearchSettings.from_mapping(m), {"topk": 2}),
    "search_env": (lambda m: SearchEnvConfig.from_trainer_config({"search_env": m}), {"max_turns": 2}),
    "curriculum": (lambda m: CurriculumConfig.from_mapping(m), {"mode": "staged"}),
    "llm": (lambda m: LLMConfig.from_dict(m), {"model": "m"}),
    "reward kwargs": (lambda m: RewardConfig.from_kwargs(m, env={}), {"answer_weight": 1.0}),
    "reward format": (lambda m: RewardConfig.from_kwargs({"format": m}, env={}), {}),
    "reward judge": (lambda m: RewardConfig.from_kwargs({"judge": m}, env={}), {"model": "judge"}),
    "ray engine": (lambda m: RayEngineConfig.from_mapping(m), {"workers": 1}),
}


def test_cot_config_rejects_an_unknown_key_naming_it(tmp_path):
    import typer

    from masksearch_rl.cot.cli import load_config

    paths = {"input": str(tmp_path / "items.jsonl"), "out": str(tmp_path / "out.jsonl")}
    assert load_config(None, ["max_rounds=3"], **paths).max_rounds == 3
    with pytest.raises(typer.BadParameter, match=r"unknown cot config key.*max_roundz"):
        load_config(None, ["max_roundz=3"], **paths)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_an_unknown_key_is_an_error_naming_it(name):
    load, good = LOADERS[name]
    load(good)  # the known keys load
    with pytest.raises(ValueError, match=r"unknown .*\bmisspelt_key\b") as err:
        load({**good, "misspelt_key": 1})
    assert "known:" in str(err.value)


def test_curriculum_names_the_key_by_its_path():
    with pytest.raises(ValueError, match=r"\['curriculum\.stage_order'\]"):
        CurriculumConfig.from_mapping({"stage_order": [1, 2]})


def test_omegaconf_nodes_load_like_dicts():
    node = OmegaConf.create({"topk": 2, "max_info_tokens": "${oc.decode:'7'}"})
    assert plain_mapping(node) == {"topk": 2, "max_info_tokens": 7}
    assert SearchSettings.from_mapping(node) == SearchSettings(topk=2, max_info_tokens=7)
    assert plain_mapping(None) == {}
    with pytest.raises(TypeError, match="expected a mapping"):
        plain_mapping([("topk", 2)])


def test_values_are_still_validated_by_the_dataclass():
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        from_mapping(SearchSettings, {"topk": 0}, "search setting")
