"""SFT warm-up for the quickstart: oracle RAMP trajectories -> verl's SFT trainer (CPU) -> an HF model directory.

Why: RL on a model that never writes the tag protocol gets a format reward of zero on every rollout and nothing to
learn from. A few hundred SFT steps on oracle trajectories (masksearch_rl.sft.oracle) teach the tiny quickstart
model the ``<think>/<search>/<answer>`` layout, so the RL stage starts with some well-formed rollouts.

``run_sft_warmup`` runs verl's real trainer (``python -m masksearch_rl.sft.train``, recipe
``recipes/configs/sft/quickstart/tiny_cpu.yaml``) in a subprocess with ``VERL_PLATFORM=cpu``, its output streamed to
``out_dir/train.log``. Layout of ``out_dir``::

    data/          trajectories.jsonl, train.parquet, val.parquet, summary.json   (oracle data)
    checkpoints/   verl's checkpoints (global_step_<N>/ with huggingface/), resumed after a kill
    hydra/         hydra's run directory (the composed config)
    train.log      the trainer's stdout and stderr
    model/         the warmed-up HF model (written last, atomically; its presence means done)

``probe_format`` measures what the warm-up is for: greedy generation on held-out RAMP prompts, played the way the RL
agent loop plays it (policy text up to ``</search>``, the real search results appended as an ``<information>``
block in the same assistant turn, until ``</answer>``), scored with reward/format.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK
from masksearch_rl.jsonl import atomic_path
from masksearch_rl.sft.oracle import OracleConfig, write_oracle_sft

RECIPE_NAME = "tiny_cpu"
DONE_FILE = "masksearch_sft.json"
# Hydra overrides per training layout: "rl" = the RL rollout's token layout, "chat" = verl's chat rendering.
LAYOUTS = {
    "rl": ("data.custom_cls.path=pkg://masksearch_rl.sft.rl_layout_dataset", "data.custom_cls.name=RLLayoutSFTDataset"),
    "chat": (),
}


def recipe_dir() -> Path:
    """recipes/configs/sft/quickstart inside the installed package."""
    import recipes.configs.sft

    return Path(recipes.configs.sft.__file__).resolve().parent / "quickstart"


def trainer_command(
    train_dir: Path, val_dir: Path, model_dir: Path, checkpoint_dir: Path, hydra_dir: Path, steps: int,
    overrides: Sequence[str] = (), config_name: str = RECIPE_NAME,
) -> list[str]:
    """The ``python -m masksearch_rl.sft.train`` command line for the quickstart recipe."""
    save_freq = max(10, steps // 4)  # intermediate checkpoints: a killed warm-up resumes from the last one
    return [
        sys.executable, "-m", "masksearch_rl.sft.train",
        "--config-path", str(recipe_dir()), "--config-name", config_name,
        f"data.train_files={train_dir / 'train.parquet'}",
        f"data.val_files={val_dir / 'val.parquet'}",
        f"model.path={model_dir}",
        f"trainer.default_local_dir={checkpoint_dir}",
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={save_freq}",
        f"hydra.run.dir={hydra_dir}",
        *overrides,
    ]


def run_sft_warmup(
    ramp_items: Path,
    index_dir: Path,
    model_dir: Path,
    out_dir: Path,
    steps: int = 300,
    *,
    oracle: OracleConfig | None = None,
    layout: str = "rl",
    device: str = "cpu",
    overrides: Sequence[str] = (),
    timeout_s: float | None = None,
) -> Path:
    """Warm ``model_dir`` up on oracle trajectories of ``ramp_items``; returns the trained HF model dir.

    ``oracle`` shapes the data (default: information budgeted in the model's own tokens, as the RL env does);
    ``layout="rl"`` trains on the RL rollout's token layout (:mod:`masksearch_rl.sft.rl_layout_dataset`), ``"chat"``
    on verl's own MultiTurnSFTDataset rendering. Skips everything when ``out_dir/model`` is complete; otherwise
    reuses the oracle data if present and resumes verl's training from its last checkpoint. ``device="cpu"`` runs
    verl on our CPU platform (``VERL_PLATFORM=cpu``); anything else leaves verl's platform detection alone.
    ``overrides`` are extra hydra overrides for the recipe (e.g. ``["optim.lr=1e-3"]``). Raises ``RuntimeError``
    naming the log on failure.
    """

    out_dir, model_dir = Path(out_dir), Path(model_dir)
    final = out_dir / "model"
    if (final / DONE_FILE).is_file():
        return final
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    oracle = oracle or OracleConfig(tokenizer=str(model_dir))
    data_dir = out_dir / "data"
    if not (data_dir / "summary.json").is_file():
        write_oracle_sft(ramp_items, index_dir, data_dir, oracle)
    return run_sft(data_dir, model_dir, out_dir, steps, [f"trainer.seed={oracle.seed}", *LAYOUTS[layout], *overrides],
                   device=device, timeout_s=timeout_s, meta={"seed": oracle.seed, "layout": layout})


# Extra overrides per SFT backend of masksearch_rl.sft.train: verl's SFT trainer (FSDP2), or the HF Trainer runner
# without DeepSpeed -- much faster for a tiny model on a CPU, where verl's engine spends its time on per-op overhead.
BACKENDS = {
    "fsdp": (),
    "hf": ("sft_backend=deepspeed", "masksearch_sft.deepspeed_config=null", "masksearch_sft.bf16=false"),
}


def run_sft(
    data_dir: Path, model_dir: Path, out_dir: Path, steps: int, overrides: Sequence[str] = (), *,
    backend: str = "fsdp", device: str = "cpu", timeout_s: float | None = None, meta: dict[str, Any] | None = None,
) -> Path:
    """Train ``model_dir`` on ``data_dir/{train,val}.parquet`` through ``masksearch_rl.sft.train`` (the quickstart
    recipe plus ``overrides``; ``backend``: :data:`BACKENDS`) for ``steps`` steps; the model lands at
    ``out_dir/model`` (kept when already complete).

    The trainer's checkpoints under ``out_dir/checkpoints`` make a killed run resume; its output goes to
    ``out_dir/train.log``. Raises ``RuntimeError`` naming the log on failure.
    """
    from masksearch_rl.sft.train import FINAL_MODEL_LINK, final_hf_model_dir

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    out_dir, model_dir, data_dir = Path(out_dir), Path(model_dir), Path(data_dir)
    final = out_dir / "model"
    if (final / DONE_FILE).is_file():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out_dir / "checkpoints"
    command = trainer_command(data_dir.resolve(), data_dir.resolve(), model_dir.resolve(), checkpoint_dir.resolve(),
                              (out_dir / "hydra").resolve(), steps, [*BACKENDS[backend], *overrides])
    env = dict(os.environ)
    if device == "cpu":
        env["VERL_PLATFORM"] = "cpu"
    log_path = out_dir / "train.log"
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                    cwd=str(out_dir))
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"SFT ran past {timeout_s:g} s; see {log_path}") from err
    if result.returncode != 0:
        raise RuntimeError(f"SFT failed (exit {result.returncode}); see {log_path}:\n{_tail(log_path)}")
    if backend == "fsdp":
        hf_dir = final_hf_model_dir(checkpoint_dir)
        if hf_dir is None or hf_dir.parent.name != f"global_step_{steps}":
            hf_dir = None
    else:  # the HF runner writes the model there itself when training ends
        hf_dir = checkpoint_dir / FINAL_MODEL_LINK
        hf_dir = hf_dir if (hf_dir / "config.json").is_file() else None
    if hf_dir is None:
        raise RuntimeError(f"SFT finished but wrote no HF model for step {steps} under {checkpoint_dir}; "
                           f"see {log_path}")
    export_hf_model(hf_dir, final, {"steps": steps, "backend": backend, **(meta or {}), "source": str(hf_dir),
                                    "base_model": str(model_dir), "train_s": round(time.perf_counter() - started, 1)})
    return final


def export_hf_model(hf_dir: Path, out: Path, meta: dict[str, Any]) -> Path:
    """Copy verl's ``huggingface/`` checkpoint to ``out`` (atomically) with a config whose dtype is the weights'.

    verl writes ``config.json`` from a bfloat16 template while the weights keep the training dtype (fp32 here);
    ``from_pretrained`` with ``dtype="auto"`` would otherwise load fp32 weights as bfloat16.
    """
    with atomic_path(out) as tmp:
        shutil.copytree(hf_dir, tmp)
        dtype = _weights_dtype(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        if dtype is not None:
            config["dtype"] = dtype
            config_path.write_text(json.dumps(config, indent=2))
        (tmp / DONE_FILE).write_text(json.dumps(meta, indent=2))
    return out


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weights_dtype(model_dir: Path) -> str | None:
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                return _SAFETENSORS_DTYPES.get(str(handle.get_slice(name).get_dtype()).upper())
    return None


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


# ------------------------------------------------------------------------------------------------ format probe
@dataclass(frozen=True)
class ProbeConfig:
    """RL-like greedy rollouts: ``response_length`` and ``topk``/``max_info_tokens`` as in the quickstart RL run."""

    num_prompts: int = 20
    response_length: int = 512
    max_turn_tokens: int = 96
    max_searches: int = 4
    topk: int = DEFAULT_TOPK
    max_info_tokens: int = DEFAULT_MAX_INFO_TOKENS
    # "continue": the RL agent loop's layout (information as raw tokens inside the assistant turn);
    # "turns": the SFT data's layout (information as a tool chat turn, then a new assistant turn).
    layout: str = "continue"
    # 0: greedy; > 0: sampling at this temperature (the RL rollout samples at 1.0), seeded by ``seed``.
    temperature: float = 0.0
    seed: int = 0
    # Hide each item's source passage from the probe's searches, as the RL environment does with hide_source.
    hide_source: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("continue", "turns"):
            raise ValueError(f"layout must be 'continue' or 'turns', got {self.layout!r}")


def probe_format(
    model_dir: Path, items: list[dict[str, Any]], index_dir: Path, config: ProbeConfig = ProbeConfig()
) -> dict[str, Any]:
    """RL-style episodes of ``model_dir`` on ``items``; returns the well-formed share and examples.

    Each item is one episode of :func:`envs.rollout.run_episode` -- the episode rule RL follows
    (:class:`envs.episode.EpisodeRules`) -- with the local model as the policy (:class:`masksearch_rl.eval.hf_policy.HFPolicy`,
    in ``config.layout``) and searches answered from the real index with the environment's own formatting. The
    response, cut to ``response_length`` tokens as the RL loop cuts it, is scored with ``reward.format.check_format``.
    """
    import asyncio

    import torch

    from envs.prompts import RAMP_INSTRUCTION, ramp_messages
    from envs.rollout import make_search_env, run_episode
    from masksearch_rl.eval.hf_policy import HFPolicy
    from masksearch_rl.ramp.source import source_exclusion
    from reward.format import check_format

    torch.manual_seed(config.seed)
    policy = HFPolicy(str(model_dir), temperature=config.temperature, layout=config.layout, max_batch=1)
    search = make_search_env({"backend": {"type": "local", "index_dir": str(index_dir)}, "topk": config.topk,
                              "max_info_tokens": config.max_info_tokens}, tokenizer=policy.tokenizer)

    async def episodes() -> list[Any]:
        try:
            done = []
            for item in items[: config.num_prompts]:  # one at a time: seeded sampling stays reproducible
                messages = ramp_messages(item["query"], instruction=item.get("instruction") or RAMP_INSTRUCTION)
                exclusion = source_exclusion(item) if config.hide_source else None
                done.append(await run_episode(policy, search, messages, max_turns=config.max_searches,
                                              max_new_tokens=config.max_turn_tokens, exclusion=exclusion))
            return done
        finally:
            await policy.aclose()

    results = []
    for item, episode in zip(items, asyncio.run(episodes())):
        ids = policy.tokenizer.encode(episode.raw, add_special_tokens=False)[: config.response_length]
        response = policy.tokenizer.decode(ids)
        result = check_format(response, num_masks=int(item["num_masks"]))
        results.append({"id": item["id"], "ok": result.ok, "reason": result.reason.label,
                        "num_searches": result.num_searches, "answer": result.answer, "response": response[:600]})
    ok = sum(r["ok"] for r in results)
    reasons = dict(Counter(r["reason"] for r in results))
    return {"prompts": len(results), "well_formed": ok, "well_formed_rate": ok / max(1, len(results)),
            "reasons": reasons, "examples": results[:3]}
