"""One way to read a config section into a dataclass: unknown keys are an error naming them (a misspelt key must
not silently do nothing), values go to the dataclass, whose ``__post_init__`` validates them.

Used by ``SearchSettings.from_mapping`` (and ``search_env``), ``CurriculumConfig.from_mapping``,
``RayEngineConfig.from_mapping``, the CoT config (``cot build``), ``LLMConfig.from_dict``, ``RewardConfig.from_kwargs``
(and its ``format`` and ``judge`` sections). A base utility: imports nothing from the project.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def plain_mapping(mapping: Any) -> dict[str, Any]:
    """A plain dict of a mapping or an OmegaConf node (resolved); ``None`` gives ``{}``."""
    if mapping is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        DictConfig = ()  # noqa: N806
    if DictConfig and isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)  # type: ignore[return-value]
    if not isinstance(mapping, Mapping):
        raise TypeError(f"expected a mapping, got {type(mapping).__name__}")
    return dict(mapping)


def reject_unknown(cls: type, values: Mapping[str, Any], what: str, prefix: str | None = None) -> None:
    """Raise ``ValueError("unknown <what>(s) [names]; known: [...]")`` for keys that are not fields of ``cls``;
    with ``prefix`` the names are dotted (``curriculum.mode``)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        names = [f"{prefix}.{key}" for key in unknown] if prefix else unknown
        raise ValueError(f"unknown {what}(s) {names}; known: {known}")


def from_mapping(cls: type[T], mapping: Any, what: str, prefix: str | None = None) -> T:
    """``cls(**mapping)`` after :func:`plain_mapping` and :func:`reject_unknown`."""
    values = plain_mapping(mapping)
    reject_unknown(cls, values, what, prefix)
    return cls(**values)
