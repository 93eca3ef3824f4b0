"""Our SFT entry point: ``[torchrun ...] python -m masksearch_rl.sft.train <hydra overrides>``.

Same configs, same command line and, for the default backend, the same trainer as ``torchrun -m
verl.trainer.sft_trainer`` (verl's config ``sft_trainer_engine`` by default; ``--config-path/--config-name`` pick one
of our recipes). Works under torchrun and as a plain single process (the rendezvous variables default to one local
rank). What it adds, so that every SFT run ends the same way whatever the backend and platform:

* ``masksearch_sft.backend`` picks the trainer: ``fsdp`` (verl's SFTTrainer) or ``deepspeed``
  (:mod:`masksearch_rl.sft.deepspeed_runner`, HF Trainer + ZeRO-3), so launchers need not parse overrides;
* the trained model is always at ``<trainer.default_local_dir>/hf_model``: the DeepSpeed runner writes it there, and
  after verl's trainer rank 0 links it to the newest ``global_step_<N>/huggingface`` (written when
  ``checkpoint.save_contents`` has ``hf_model``, as our recipes set). Stage II recipes and vLLM load that path;
* the CPU platform (below).

Why a separate entry: verl 0.9.1's ``run_sft`` opens its process group as ``"cpu:gloo,{device}:{backend}"``, which on
our CPU platform reads ``"cpu:gloo,cpu:gloo"`` and torch rejects it (a device type named twice); and verl's
``initialize_global_process_group`` does not skip an already-open group. So on the CPU platform we open a plain gloo
group (:func:`masksearch_rl.verl_ext.workers.ensure_cpu_process_group`, which also registers verl's FSDP engine for
the ``cpu`` device) and then drive verl's own ``SFTTrainer`` exactly as ``run_sft`` does. On an accelerator this
module calls verl's ``run_sft`` itself, unchanged.

Where the model ends up: with ``checkpoint.save_contents`` containing ``hf_model`` (our quickstart recipe does),
verl's FSDP checkpoint manager writes a full Hugging Face model directory (weights, config, tokenizer, chat template)
to ``<trainer.default_local_dir>/global_step_<N>/huggingface`` at each save and at the last step;
:func:`final_hf_model_dir` finds the newest one (verl's tracker file ``latest_checkpointed_iteration.txt``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # written by verl's CheckpointHandler, atomically, last


def _default_rendezvous() -> None:
    """Single-process defaults for the variables torchrun would set (verl reads them; so does env:// init)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)


def run(config) -> None:
    """Train under ``config`` (a composed ``sft_trainer_engine`` config) with the backend it names."""
    backend = (config.get("masksearch_sft") or {}).get("backend", "fsdp")
    if backend == "deepspeed":
        from masksearch_rl.sft.deepspeed_runner import train

        logger.info("DeepSpeed/HF runner: %s", train(config))
        return
    if backend != "fsdp":
        raise ValueError(f"masksearch_sft.backend must be 'fsdp' or 'deepspeed', got {backend!r}")
    _run_verl(config)
    if int(os.environ.get("RANK", "0")) == 0:
        linked = link_final_hf_model(config.trainer.default_local_dir)
        logger.info("final model: %s", linked or "none (checkpoint.save_contents lacks hf_model?)")


def _run_verl(config) -> None:
    from omegaconf import open_dict
    from verl.trainer import sft_trainer
    from verl.utils.device import auto_set_device, get_device_name

    auto_set_device(config)
    if get_device_name() != "cpu":
        sft_trainer.run_sft(config)
        return

    from verl.utils.distributed import destroy_global_process_group

    from masksearch_rl.verl_ext.workers import ensure_cpu_process_group

    with open_dict(config):
        # verl's trainer places its metric tensors on trainer.device; on the CPU platform that must be "cpu".
        config.trainer.device = "cpu"
    ensure_cpu_process_group()
    try:
        trainer = sft_trainer.SFTTrainer(config=config)
        trainer.fit()
    finally:
        destroy_global_process_group()


def final_hf_model_dir(checkpoint_dir: str | Path) -> Path | None:
    """The Hugging Face model of the newest checkpoint under verl's ``trainer.default_local_dir``, if any."""
    checkpoint_dir = Path(checkpoint_dir)
    tracker = checkpoint_dir / TRACKER_FILE
    if not tracker.is_file():
        return None
    step = tracker.read_text().strip()
    hf_dir = checkpoint_dir / f"global_step_{step}" / "huggingface"
    has_weights = any(hf_dir.glob("*.safetensors")) or any(hf_dir.glob("*.bin"))
    return hf_dir if (hf_dir / "config.json").is_file() and has_weights else None


FINAL_MODEL_LINK = "hf_model"


def link_final_hf_model(checkpoint_dir: str | Path) -> Path | None:
    """Point ``<checkpoint_dir>/hf_model`` at the newest checkpoint's HF model (a relative symlink, swapped in with
    one rename so a reader never sees it missing); None when no checkpoint has one."""
    checkpoint_dir = Path(checkpoint_dir)
    hf_dir = final_hf_model_dir(checkpoint_dir)
    if hf_dir is None:
        return None
    link = checkpoint_dir / FINAL_MODEL_LINK
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not our link; move it away")
    tmp = checkpoint_dir / f".{FINAL_MODEL_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(hf_dir.relative_to(checkpoint_dir), target_is_directory=True)
    os.replace(tmp, link)
    return link


def main() -> None:
    import hydra

    _default_rendezvous()
    # verl's plugins (our CPU platform among them) load on `import verl`, before hydra parses anything.
    import verl  # noqa: F401

    @hydra.main(config_path="pkg://verl.trainer.config", config_name="sft_trainer_engine", version_base=None)
    def _entry(config) -> None:
        run(config)

    _entry()


if __name__ == "__main__":
    main()
