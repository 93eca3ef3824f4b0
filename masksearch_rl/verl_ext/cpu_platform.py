"""A CPU platform for verl 0.9.1: train and roll out on machines without an accelerator.

verl reaches the hardware only through ``verl.plugin.platform.get_platform()`` (device name, the ``torch.<device>``
module, the collective backend, the Ray resource). Registering a platform named ``cpu`` makes the whole trainer run
on CPU: FSDP over gloo, Ray workers scheduled on CPU slots, no CUDA calls. It is picked by ``VERL_PLATFORM=cpu`` or,
when no accelerator is present, by verl's own auto-detection (the built-in platforms report themselves unavailable
first, and ours is registered after them).

``device_module`` stands in for ``torch.cuda``: verl calls a handful of its functions (synchronize, empty_cache,
memory statistics, RNG state, ``mem_get_info``); :class:`CpuDeviceModule` answers them with CPU meanings.
"""

from __future__ import annotations

import contextlib
import logging
import os
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"
CPU = torch.device("cpu")


class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        return None

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class CpuDeviceModule(ModuleType):
    """The subset of the ``torch.cuda`` API that verl calls, answered for the CPU.

    Memory figures are the process's resident set and the machine's memory, so verl's memory logs stay meaningful.
    RNG state is the CPU generator's (what ``torch.manual_seed`` seeds).
    """

    def __init__(self) -> None:
        super().__init__("masksearch_rl.verl_ext.cpu_device")
        self.memory = SimpleNamespace(
            _set_allocator_settings=lambda settings: None,
            _record_memory_history=lambda *args, **kwargs: None,
            _dump_snapshot=lambda *args, **kwargs: None,
        )

    # device management
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> torch.device:
        return CPU

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def get_device_capability(device: Any = None) -> tuple[Optional[int], Optional[int]]:
        return None, None

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True

    # RNG
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    # memory
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return psutil.Process().memory_info().rss

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return psutil.Process().memory_info().rss

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return psutil.Process().memory_info().rss

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return psutil.Process().memory_info().rss

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @staticmethod
    def memory_stats(device: Any = None) -> dict:
        return {}

    # streams and events: CPU work is synchronous, so these are inert
    @staticmethod
    def current_stream(device: Any = None) -> Any:
        return _NullStream()

    @staticmethod
    def stream(stream: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    Stream = _NullStream
    Event = _NullEvent


_DEVICE_MODULE = CpuDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl's platform interface on the CPU: device "cpu", gloo collectives, Ray CPU slots."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Auto-detection reaches us only after the accelerator platforms said no; say yes only when torch sees no
        # accelerator either, so a GPU machine never falls back to the CPU by accident.
        return not torch.cuda.is_available()

    def current_device(self) -> torch.device:
        # verl uses the "device id" as a device: `.to(get_device_id())`, `device=get_device_id()`. An int would mean
        # "accelerator number N" to torch, which fails without one; the CPU device works in every such place.
        return CPU

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors holding a (logical) GPU slot; CPU torch ignores it.
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # verl counts devices only as Ray "GPU"/"NPU" resources (RayResourcePool, ResourcePoolManager's capacity
        # check), so on a CPU machine each training rank holds one *logical* Ray GPU: start Ray with
        # ray_kwargs.ray_init.num_gpus=<ranks per node> (recipes/configs/quickstart does). Nothing runs on a GPU.
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def cpu_platform_selected() -> bool:
    """True when verl will run (or runs) on our CPU platform in this process."""
    from verl.plugin.platform import get_platform

    if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME:
        return True
    return get_platform().device_name == "cpu"
