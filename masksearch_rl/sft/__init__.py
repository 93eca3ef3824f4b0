"""The SFT stage: trajectory JSONL -> SFT parquet, and the DeepSpeed ZeRO-3 alternative to verl's FSDP trainer.

export.py            kept trajectories (CoT construction, self-evolve) -> train/val parquet for MultiTurnSFTDataset
deepspeed_runner.py  HF Trainer + DeepSpeed on the same parquet, dataset class and loss mask as verl's sft_trainer
cli.py               ``register(app)``: ``masksearch-rl sft export``
"""
