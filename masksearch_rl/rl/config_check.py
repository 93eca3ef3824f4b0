"""Keys a recipe writes that nothing reads.

A hydra launch is the user's contract: a key that verl 0.9.1 and our plugins ignore (``actor.grad_clip`` is a field
of verl's FSDPActorConfig that no code reads; the engine clips with ``actor.optim.clip_grad``) lets a user change a
value and see nothing happen. :func:`unread_keys` lists, for one recipe, every leaf key its own YAML files set
(the recipe, dapo_base.yaml and the config groups it picks: curriculum/*, platform/*) that

* belongs to none of our sections' schemas (``search_env``: :class:`envs.agent_loop.SearchEnvConfig`;
  ``curriculum``: :class:`masksearch_rl.curriculum.sampler.CurriculumConfig`; ``masksearch_tracking``) and is not
  under a prefix verl reads untyped (:data:`UNTYPED`, each with why);
* is absent from verl's own composed default config (``ppo_trainer``), or
* is in it but no verl code reads it: a known dead field (:data:`DEAD`), or a leaf name that appears nowhere in
  verl's source outside its config definitions (the check that found ``grad_clip``).
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from masksearch_rl.rl.launch import CONFIG_ROOT

# Keys verl (or our code) reads without a typed schema: every key under these prefixes is allowed.
UNTYPED = {
    "hydra.": "hydra's own settings (search path, run directory)",
    "paths.": "ours: values the recipe itself interpolates (${paths.data_dir}), read by nothing else",
    "ray_kwargs.ray_init.": "verl passes the mapping to ray.init(**ray_init) as it is",
    "reward.reward_kwargs.": "the reward manager's constructor kwargs (dapo/masksearch: overlong_buffer_cfg, "
                             "max_resp_len)",
    "reward.custom_reward_function.reward_kwargs.": "our compute_score options, checked (unknown keys fail) by "
                                                    "reward.combine.RewardConfig",
    "search_env.backend.": "our search backend's options, checked by masksearch_rl.retrieval.web.make_backend",
    "actor_rollout_ref.model.override_config.": "HFModelConfig.override_config: a dict verl applies to the model's "
                                                "HF config (attn_implementation is read by name)",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.": "a dict the FSDP engine reads by name (param_dtype, "
                                                            "reduce_dtype, buffer_dtype)",
}
# Fields of verl's config dataclasses that no verl 0.9.1 code reads, and what to set instead.
DEAD = {
    "actor_rollout_ref.actor.grad_clip": "verl's engine clips with actor_rollout_ref.actor.optim.clip_grad",
    "actor_rollout_ref.actor.use_torch_compile": "the FSDP engine reads actor_rollout_ref.actor.fsdp_config."
                                                "use_torch_compile",
}
# Config files of verl: a leaf name found only there is defined but not read.
_VERL_CONFIG_DIRS = ("workers/config", "trainer/config")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _group_file(entry: Any) -> Path | None:
    """Our config file a defaults-list entry names (None for verl's own and for _self_)."""
    if isinstance(entry, str):
        name = entry.lstrip("/")
        path = CONFIG_ROOT / f"{name}.yaml"
        return path if path.is_file() else None
    if isinstance(entry, dict) and len(entry) == 1:
        group, option = next(iter(entry.items()))
        path = CONFIG_ROOT / str(group).lstrip("/+") / f"{option}.yaml"
        return path if path.is_file() else None
    return None


def recipe_files(recipe: str) -> list[Path]:
    """The recipe's file and every file of ours its defaults list pulls in (depth first)."""
    files: list[Path] = []

    def visit(path: Path) -> None:
        if path in files:
            return
        files.append(path)
        data = yaml.safe_load(path.read_text()) or {}
        for entry in data.get("defaults") or []:
            child = _group_file(entry)
            if child is not None:
                visit(child)

    visit(CONFIG_ROOT / f"{recipe}.yaml")
    return files


def recipe_keys(recipe: str) -> dict[str, Path]:
    """Every leaf key the recipe's own files set, with the file that sets it (all our files merge at the root)."""
    keys: dict[str, Path] = {}
    for path in recipe_files(recipe):
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("defaults", None)
        for key in _flatten(data):
            keys.setdefault(key, path)
    return keys


@lru_cache(maxsize=1)
def verl_default_keys() -> frozenset[str]:
    """Leaf keys of verl's own ``ppo_trainer`` config (and every prefix of them)."""
    import verl.trainer.config
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(verl.trainer.config.__file__).parent), version_base=None):
        cfg = compose("ppo_trainer")
    leaves = _flatten(OmegaConf.to_container(cfg, resolve=False))
    prefixes = {leaf.rsplit(".", i)[0] for leaf in leaves for i in range(leaf.count(".") + 1)}
    return frozenset(leaves) | frozenset(prefixes)


@lru_cache(maxsize=1)
def _verl_source() -> str:
    import verl

    root = Path(verl.__file__).parent
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*.py")
                     if not any(part in p.relative_to(root).as_posix() for part in _VERL_CONFIG_DIRS))


def _read_by_verl(leaf_name: str) -> bool:
    return re.search(rf"\b{re.escape(leaf_name)}\b", _verl_source()) is not None


def _our_schemas() -> dict[str, set[str]]:
    from envs.agent_loop import SearchEnvConfig
    from masksearch_rl.curriculum.sampler import CurriculumConfig
    from masksearch_rl.verl_ext.trainer import TRACKING_DEFAULTS

    return {"search_env": {f.name for f in dataclasses.fields(SearchEnvConfig)},
            "curriculum": {f.name for f in dataclasses.fields(CurriculumConfig)},
            "masksearch_tracking": set(TRACKING_DEFAULTS)}


def unread_keys(recipe: str) -> list[tuple[str, str]]:
    """``(key, why)`` for every key the recipe's files set that nothing reads (module docstring); [] when clean."""
    schemas = _our_schemas()
    known = verl_default_keys()
    problems = []
    for key, path in recipe_keys(recipe).items():
        where = path.relative_to(CONFIG_ROOT)
        if any(key.startswith(prefix) for prefix in UNTYPED):
            continue
        section, _, rest = key.partition(".")
        if section in schemas:
            if rest.split(".")[0] not in schemas[section]:
                problems.append((key, f"{where}: not a field of our {section} section {sorted(schemas[section])}"))
            continue
        if key in DEAD:
            problems.append((key, f"{where}: no verl code reads it; {DEAD[key]}"))
        elif key not in known:
            problems.append((key, f"{where}: not a key of verl 0.9.1's config"))
        elif not _read_by_verl(key.rsplit(".", 1)[-1]):
            problems.append((key, f"{where}: defined by verl's config but read by no verl code"))
    return problems
