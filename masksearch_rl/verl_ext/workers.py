"""verl's training workers made to start on any platform, the CPU included.

verl 0.9.1 opens each training worker's process group with ``f"cpu:gloo,{device}:{collective backend}"``
(``verl.utils.distributed.initialize_global_process_group_ray``). On the CPU platform that reads
``"cpu:gloo,cpu:gloo"``, which torch rejects (a device type named twice). verl skips the call when a process group
already exists, so our worker opens a plain gloo group first, from the same ``RANK``/``WORLD_SIZE``/``MASTER_*``
variables verl's worker group sets. On accelerators nothing changes.

verl's ``ActorRolloutRefWorker`` names its inner worker classes as class attributes (``actor_worker_cls``,
``ref_worker_cls``) so subclasses can swap them; our trainer modes put :class:`PlatformActorRolloutRefWorker` into the
role-to-worker mapping (:mod:`masksearch_rl.verl_ext.trainer`). verl's FSDP engine is registered for the CPU device
here too (``EngineRegistry`` keys engines by device; verl registers cuda and npu only).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed
from verl.utils.device import get_device_name
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

logger = logging.getLogger(__name__)

# verl's FSDP engines run unchanged on the CPU (gloo collectives, fp32/bf16 CPU kernels): register them for it.
EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(FSDPEngineWithLMHead)
EngineRegistry.register(model_type="value_model", backend=["fsdp", "fsdp2"], device="cpu")(FSDPEngineWithValueHead)


def ensure_cpu_process_group() -> bool:
    """Open the default gloo process group on the CPU platform if none is open; True if this call opened it."""
    if get_device_name() != "cpu" or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group(
        backend="gloo",
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        timeout=timedelta(seconds=int(os.environ.get("MASKSEARCH_DIST_TIMEOUT_S", 1800))),
    )
    logger.info("opened gloo process group: rank %d of %d", torch.distributed.get_rank(),
                torch.distributed.get_world_size())
    return True


class PlatformTrainingWorker(TrainingWorker):
    """verl's TrainingWorker; on the CPU platform its process group is opened as plain gloo first."""

    def __init__(self, config):
        ensure_cpu_process_group()
        super().__init__(config)


class PlatformActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker whose inner training workers start on the CPU platform too."""

    actor_worker_cls = PlatformTrainingWorker
    ref_worker_cls = PlatformTrainingWorker
