"""One source of search settings: ``envs.search_client.SearchSettings``' defaults (``DEFAULT_TOPK``,
``DEFAULT_MAX_INFO_TOKENS``) are what every CLI option, config dataclass and shipped yaml uses, unless a yaml
deliberately differs (listed below with its reason).

Quick and offline: reads yaml files and inspects the CLI's options; nothing is run.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml

from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK, SearchSettings
from masksearch_rl.retrieval import types as retrieval_types

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"topk": DEFAULT_TOPK, "max_info_tokens": DEFAULT_MAX_INFO_TOKENS}

# (yaml, key) -> why it differs from the typed default on purpose.
DELIBERATE = {
    ("recipes/configs/lab/tiny_cpu.yaml", "topk"): "the lab's oracle searched with one passage, so every span shows",
    ("recipes/configs/lab/tiny_cpu.yaml", "max_info_tokens"): "one passage cut to 256 tokens, as the lab's oracle",
    ("recipes/configs/quickstart/tiny_cpu.yaml", "max_info_tokens"): "a tiny CPU policy's short response budget",
    ("recipes/configs/quickstart/qwen2.5-0.5b_cpu.yaml", "max_info_tokens"): "CPU: a short response budget",
}


def _get(mapping, dotted: str):
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _search_sections():
    """Every yaml section that carries search settings: (file, section)."""
    for path in sorted((REPO / "recipes" / "configs").rglob("*.yaml")):
        section = _get(yaml.safe_load(path.read_text()) or {}, "search_env")
        if section:
            yield path.relative_to(REPO).as_posix(), section
    cot = REPO / "masksearch_rl" / "cot" / "default.yaml"
    yield cot.relative_to(REPO).as_posix(), yaml.safe_load(cot.read_text())["search"]
    tools = yaml.safe_load((REPO / "envs" / "config" / "search_tool.yaml").read_text())["tools"]
    for tool in tools:
        yield "envs/config/search_tool.yaml", tool["config"]


def test_the_typed_defaults_are_the_named_constants():
    settings = SearchSettings()
    assert (settings.topk, settings.max_info_tokens) == (DEFAULT_TOPK, DEFAULT_MAX_INFO_TOKENS) == (3, 512)
    assert retrieval_types.DEFAULT_TOPK is DEFAULT_TOPK


def test_every_yaml_search_section_carries_the_typed_defaults_unless_it_says_why():
    seen = set()
    for name, section in _search_sections():
        for key, default in DEFAULTS.items():
            if key not in section:
                continue
            seen.add((name, key))
            if (name, key) in DELIBERATE:
                assert section[key] != default, f"{name}: {key} no longer differs; drop it from DELIBERATE"
            else:
                assert section[key] == default, f"{name}: {key}={section[key]}, the typed default is {default}"
    for must in ("recipes/configs/dapo_base.yaml", "masksearch_rl/cot/default.yaml", "envs/config/search_tool.yaml"):
        assert {(must, "topk"), (must, "max_info_tokens")} <= seen, must
    stale = {entry for entry in DELIBERATE if (REPO / entry[0]).exists()} - seen
    assert not stale, f"DELIBERATE names settings no yaml carries: {stale}"


def test_config_dataclasses_default_to_the_search_settings():
    from envs.agent_loop import SearchEnvConfig
    from masksearch_rl.quickstart import QuickstartConfig
    from masksearch_rl.retrieval.server import ServerConfig
    from masksearch_rl.sft.oracle import OracleConfig
    from masksearch_rl.sft.warmup import ProbeConfig

    for cls in (SearchEnvConfig, OracleConfig, ProbeConfig, QuickstartConfig):
        defaults = {f.name: f.default for f in fields(cls)}
        for key, default in DEFAULTS.items():
            if key in defaults:
                assert defaults[key] == default, (cls.__name__, key)
    assert ServerConfig().default_topk == DEFAULT_TOPK


def _option_defaults(command) -> dict[str, object]:
    return {param.name: param.default for param in command.params if isinstance(param, typer.core.TyperOption)}


@pytest.mark.parametrize("path", [("eval", "run"), ("selfevolve", "iterate"), ("sft", "oracle"), ("sft", "warmup"), ("search",),
                                  ("serve",)])
def test_cli_options_default_to_the_search_settings(path):
    from masksearch_rl.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    defaults = _option_defaults(command)
    checked = 0
    for key, default in {**DEFAULTS, "default_topk": DEFAULT_TOPK}.items():
        if key in defaults:
            assert defaults[key] == default, (path, key, defaults[key])
            checked += 1
    assert checked, f"{path} has no search option: {sorted(defaults)}"
