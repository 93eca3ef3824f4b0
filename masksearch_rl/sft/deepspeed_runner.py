"""SFT with DeepSpeed ZeRO-3 (HF Trainer), the alternative to verl's FSDP ``sft_trainer``.

Why: verl 0.9.1's SFT trainer has engines fsdp/megatron/torchtitan/veomni/automodel but no DeepSpeed, and the
MaskSearch authors trained their SFT stage with DeepSpeed (LLaMA-Factory). This runner reads the *same* hydra recipe
(recipes/configs/sft/...), builds the training set with verl's own ``create_sft_dataset`` (MultiTurnSFTDataset:
same chat template, same truncation, same loss mask -- information/tool turns 0, assistant tokens 1) and turns the
loss mask into HF labels (-100 where the mask is 0), so the two backends train on identical tokens.

Launch (8 GPUs; ``sft_backend=deepspeed`` selects recipes/configs/sft/sft_backend/deepspeed.yaml)::

    torchrun --nproc_per_node=8 -m masksearch_rl.sft.deepspeed_runner \
        --config-path <repo>/recipes/configs/sft/stage1_ramp --config-name qwen2.5-7b_8gpu sft_backend=deepspeed

or ``recipes/launch/sft_torchrun.sh stage1_ramp/qwen2.5-7b_8gpu sft_backend=deepspeed``. ``deepspeed`` is imported
only here, at start-up, with a clear error when it is missing (``pip install -e ".[gpu]"``).
With ``masksearch_sft.deepspeed_config=null`` the same runner trains with plain HF Trainer (DDP or one CPU process):
what the CPU test uses.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def labels_from_loss_mask(input_ids: Any, loss_mask: Any) -> Any:
    """HF labels: the token where verl's loss mask is 1, ``IGNORE_INDEX`` elsewhere (HF shifts them itself)."""
    import torch

    return torch.where(loss_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


class CausalLMView:
    """verl's MultiTurnSFTDataset seen as HF causal-LM examples (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = self.dataset[index]
        input_ids = item["input_ids"]
        attention_mask = item.get("attention_mask", torch.ones_like(input_ids))
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": labels_from_loss_mask(input_ids, item["loss_mask"])}


def pad_collate(pad_token_id: int):
    """Right-pad a batch to its longest example (labels with IGNORE_INDEX)."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(example["input_ids"]) for example in batch)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in batch:
            pad = longest - len(example["input_ids"])
            for key, value in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
                out[key].append(torch.cat([example[key], torch.full((pad,), value, dtype=example[key].dtype)]))
        return {key: torch.stack(values) for key, values in out.items()}

    return collate


def build_datasets(config: Any, tokenizer: Any) -> tuple[CausalLMView, CausalLMView | None]:
    """Train/val sets through verl's own ``create_sft_dataset`` (identical tokens and loss mask to the FSDP path).

    The examples are unpadded (``pad_mode=no_padding``); batches are padded by :func:`pad_collate`.
    """
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.sft_trainer import create_sft_dataset

    data = OmegaConf.create(OmegaConf.to_container(config.data, resolve=True))
    with open_dict(data):
        data.pad_mode = "no_padding"
    train = create_sft_dataset(data.train_files, data, tokenizer, None, max_samples=data.get("train_max_samples", -1))
    val = None
    if data.get("val_files"):
        val = create_sft_dataset(data.val_files, data, tokenizer, None, max_samples=data.get("val_max_samples", -1))
    return CausalLMView(train), (CausalLMView(val) if val is not None else None)


def training_arguments(config: Any, world_size: int) -> dict[str, Any]:
    """HF ``TrainingArguments`` keywords from the recipe (global batch, lr schedule, epochs, DeepSpeed json)."""
    ms = config.masksearch_sft
    micro = int(config.data.micro_batch_size_per_gpu)
    global_batch = int(config.data.train_batch_size)
    if global_batch % (micro * world_size):
        raise ValueError(
            f"data.train_batch_size={global_batch} is not a multiple of micro_batch_size_per_gpu={micro} x "
            f"world size {world_size}"
        )
    scheduler = str(config.optim.get("lr_scheduler_type") or "constant")
    args = {
        "output_dir": str(config.trainer.default_local_dir),
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": micro,
        "gradient_accumulation_steps": global_batch // (micro * world_size),
        "learning_rate": float(config.optim.lr),
        "weight_decay": float(config.optim.weight_decay),
        "adam_beta1": float(config.optim.betas[0]),
        "adam_beta2": float(config.optim.betas[1]),
        "max_grad_norm": float(config.optim.clip_grad),
        "warmup_ratio": float(config.optim.get("lr_warmup_steps_ratio") or 0.0),
        "lr_scheduler_type": "constant_with_warmup" if scheduler == "constant" else scheduler,
        "num_train_epochs": float(config.trainer.total_epochs),
        "max_steps": int(config.trainer.total_training_steps or -1),
        "seed": int(config.trainer.seed),
        "bf16": bool(ms.bf16),
        "gradient_checkpointing": bool(config.model.enable_gradient_checkpointing),
        "logging_steps": 1,
        "save_strategy": "epoch" if ms.save_every_epoch else "no",
        "report_to": [b for b in config.trainer.logger if b == "wandb"] or "none",
        "run_name": str(config.trainer.experiment_name),
        "remove_unused_columns": False,
        "use_cpu": str(config.trainer.device) == "cpu",
        "dataloader_num_workers": 0,
    }
    if ms.deepspeed_config:
        args["deepspeed"] = resolve_deepspeed_config(str(ms.deepspeed_config))
    return args


def resolve_deepspeed_config(path: str) -> str:
    """A DeepSpeed json path; ``pkg://recipes.configs.sft.sft_backend/zero3.json`` is looked up in our package."""
    if path.startswith("pkg://"):
        package, _, name = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"deepspeed config {path}: package {package!r} not found")
        path = str(Path(list(spec.submodule_search_locations)[0]) / name)
    if not Path(path).is_file():
        raise FileNotFoundError(f"deepspeed config {path} does not exist")
    return path


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            "sft_backend=deepspeed needs the deepspeed package (pip install -e '.[gpu]', or pip install deepspeed); "
            "or set masksearch_sft.deepspeed_config=null for plain HF Trainer"
        )


def train(config: Any) -> dict[str, Any]:
    """Run SFT with HF Trainer (+ DeepSpeed when configured); returns the final train metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    if config.masksearch_sft.deepspeed_config:
        require_deepspeed()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_path = os.path.expanduser(str(config.model.path))
    tokenizer = AutoTokenizer.from_pretrained(config.model.get("tokenizer_path") or model_path,
                                              trust_remote_code=bool(config.model.trust_remote_code))
    train_set, val_set = build_datasets(config, tokenizer)
    if "wandb" in list(config.trainer.logger):
        # HF's W&B callback reads the project only from the environment (else it logs to "huggingface").
        os.environ.setdefault("WANDB_PROJECT", str(config.trainer.project_name))
    # Built after TrainingArguments so that ZeRO-3 partitions the weights while loading them.
    arguments = TrainingArguments(**training_arguments(config, world_size))
    dtype = "bfloat16" if config.masksearch_sft.bf16 else "float32"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                 trust_remote_code=bool(config.model.trust_remote_code))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=pad_collate(pad_id))
    result = trainer.train(resume_from_checkpoint=_last_checkpoint(arguments.output_dir))
    trainer.save_model(os.path.join(arguments.output_dir, "hf_model"))
    tokenizer.save_pretrained(os.path.join(arguments.output_dir, "hf_model"))
    metrics = dict(result.metrics)
    if val_set is not None:
        metrics.update(trainer.evaluate())
    if not math.isfinite(metrics.get("train_loss", 0.0)):
        raise RuntimeError(f"SFT diverged: {metrics}")
    return metrics


def _last_checkpoint(output_dir: str) -> str | None:
    """Resume from the newest ``checkpoint-*`` in ``output_dir`` (model, optimizer, scheduler, RNG, data position)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def main() -> None:
    import hydra

    @hydra.main(config_path=None, config_name=None, version_base=None)
    def _entry(config) -> None:
        if config.get("masksearch_sft", {}).get("backend") != "deepspeed":
            logger.warning("recipe's masksearch_sft.backend is %r; running the DeepSpeed/HF runner anyway",
                           config.get("masksearch_sft", {}).get("backend"))
        print(train(config))

    _entry()


if __name__ == "__main__":
    main()
