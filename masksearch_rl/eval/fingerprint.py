"""What a resumed ``eval run`` must share with the run that started its output directory.

Why: ``predictions.jsonl`` is resumed by question key alone, so re-running into the same ``--out`` with another
policy, model, turn limit, search setup or judge would silently put two configurations into one table. The first
run stores the settings that change predictions or their scores in ``<out>/run_config.json``; a later run with
different ones is refused with the keys that differ, unless forced (then the old predictions are kept, the new
settings stored, and the changed keys listed in ``run_config.json`` and in ``results.json`` as ``mixed_settings``). Options that only change how requests are sent
or shown (timeouts, retries, concurrency, key variable names, cache, device, limit, W&B, plots, progress) are left
out, so a resume may change them freely.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from masksearch_rl.jsonl import atomic_path
from masksearch_rl.tracking import flatten

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_config.json"
# Settings of how a request is sent, not of what comes back.
TRANSPORT_KEYS = frozenset({"timeout_s", "max_retries", "concurrency", "api_key_env", "cache_dir", "search_timeout_s"})


class FingerprintedRun(Protocol):
    """What a fingerprint reads of a run's config (``eval.runner.EvalConfig`` has it; this module needs no runner)."""

    policy: Any
    max_turns: int
    search: Mapping[str, Any]
    judge: Mapping[str, Any] | None


class ConfigMismatch(ValueError):
    """The output directory's predictions were made with other settings."""


def fingerprint(config: FingerprintedRun) -> dict[str, Any]:
    """Flat ``{"policy.llm.model": ..., "max_turns": ..., "search.topk": ..., "judge.model": ...}`` of a run's
    config, with defaults filled in (spelling a default out is no change) and a local model as its absolute path."""
    from envs.search_client import SearchSettings
    from masksearch_rl.llm import LLMConfig
    from reward.judge import JUDGE_LLM_DEFAULTS

    policy = config.policy
    described: dict[str, Any] = {"kind": policy.kind, "max_new_tokens": policy.max_new_tokens,
                                 "temperature": policy.temperature}
    if policy.kind == "hf":
        local = Path(policy.model)
        described["model"] = str(local.resolve()) if local.exists() else policy.model
    else:  # the same LLMConfig build_policy makes
        described["llm"] = asdict(LLMConfig.from_dict({"temperature": policy.temperature, **policy.llm}))
        if policy.kind == "completions":
            described["tokenizer"] = policy.tokenizer
    settings = {
        "policy": described,
        "max_turns": config.max_turns,
        "search": asdict(SearchSettings.from_mapping(config.search)),
        "judge": asdict(LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge})) if config.judge else None,
    }
    flat = {name: value for name, value in flatten(settings, sep=".") if name.rpartition(".")[2] not in TRANSPORT_KEYS}
    return json.loads(json.dumps(flat, default=str))


def check_fingerprint(out_dir: str | Path, current: Mapping[str, Any], *, resuming: bool,
                      force: bool = False) -> list[str]:
    """Compare ``current`` with the settings stored in ``out_dir``, then store it. Returns the keys in which the
    directory's predictions mix settings (every forced change so far). A difference while ``resuming`` (there are
    predictions to mix with) raises :class:`ConfigMismatch` unless ``force``."""
    path = Path(out_dir) / FINGERPRINT_FILE
    stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if not resuming:
        stored = {"settings": dict(current), "mixed": []}
    elif stored is None:
        logger.warning("%s: predictions without %s (an older run): their settings cannot be checked", out_dir, path.name)
        stored = {"settings": dict(current), "mixed": []}
    before = stored["settings"]
    changed = sorted(k for k in before.keys() | current.keys() if before.get(k, _UNSET) != current.get(k, _UNSET))
    if changed and not force:
        differences = "; ".join(f"{k}: {_show(before, k)} then, {_show(current, k)} now" for k in changed)
        raise ConfigMismatch(
            f"{out_dir}: its predictions were made with other settings ({differences}). Use a new --out, or --force "
            "to resume anyway (the old predictions are kept)"
        )
    if changed:
        logger.warning("%s: resuming with changed settings (forced): %s", out_dir, ", ".join(changed))
    record = {"settings": dict(current), "mixed": sorted({*stored["mixed"], *changed})}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    return record["mixed"]


_UNSET = object()


def _show(values: Mapping[str, Any], key: str) -> str:
    if key not in values:
        return "unset"
    text = repr(values[key])
    return text if len(text) <= 60 else text[:57] + "..."
