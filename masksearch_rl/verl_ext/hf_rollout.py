"""A Hugging Face transformers rollout backend for verl 0.9.1 (``actor_rollout_ref.rollout.name=hf``).

verl's rollout backends (vLLM, SGLang, TensorRT-LLM) need a GPU. This one serves generation with
``transformers``' ``generate`` on any device the platform names (CPU here, a GPU where vLLM is not installed), through
the same three extension points the built-in backends use:

* :class:`HFReplica` (``RolloutReplicaRegistry``): starts one :class:`HFGenerationServer` Ray actor per replica on the
  node of its training workers, as vLLM's replica starts its HTTP server actor;
* :class:`HFGenerationServer`: token-in/token-out ``generate`` for the agent loops (the interface
  ``LLMServerClient`` calls), micro-batching concurrent requests with equal sampling settings into one padded
  ``model.generate``; stop strings, per-request ``max_tokens``, log-probs of the sampled tokens, greedy validation;
* :class:`HFServerAdapter` (verl's rollout registry, ``BaseRollout``): lives in each training worker and pushes the
  trainer's weights to its replica's server after every step (``checkpoint_engine.backend=naive``), so rollouts are
  always on-policy.

Throughput is far below vLLM's (no paged KV cache, no continuous batching): this backend exists so that the real
trainer runs where vLLM cannot, and for tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generator, Optional

import ray
import torch
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

from masksearch_rl.hf_generation import BatchedGenerator, Sampling

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
_SERVER_PREFIX = "hf_rollout_server_"


def server_actor_name(replica_rank: int, name_suffix: str = "") -> str:
    """The Ray actor name of a replica's server; the training worker's adapter finds its server by it."""
    return f"{_SERVER_PREFIX}{replica_rank}{name_suffix}"


class HFGenerationServer:
    """Token-in/token-out generation with an HF causal LM; one per rollout replica (a Ray actor).

    Requests arrive concurrently from many agent loops; :class:`masksearch_rl.hf_generation.BatchedGenerator` (the
    project's one batched HF generation) serves them in batches of up to ``max_num_seqs``, grouped by sampling
    settings, so a batch of agent turns costs one forward pass per token instead of one per request.
    """

    def __init__(self, config: Any, model_config: Any, replica_rank: int, device: str, batch_wait_s: float = 0.005):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        self.config = omega_conf_to_dataclass(config)
        self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        # The context a request may fill: verl's own bound when set, else the prompt plus the response budget.
        self.max_model_len = int(self.config.max_model_len or self.config.prompt_length + self.config.response_length)
        self.replica_rank = replica_rank
        self.device = torch.device(device)
        self.batch_wait_s = batch_wait_s
        self.global_steps: Optional[int] = None
        self.model = None
        self.tokenizer = None
        self.generator: Optional[BatchedGenerator] = None

    # ---------------------------------------------------------------- lifecycle
    async def launch_server(self) -> None:
        """Load the tokenizer and the model (from the same path as the trainer), then start serving."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.model_config.local_path
        trust = bool(getattr(self.model_config, "trust_remote_code", False))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        dtype = _torch_dtype(getattr(self.config, "dtype", "bfloat16"), self.device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust)
        self.model.to(self.device).eval()
        self.generator = BatchedGenerator(self.model, self.tokenizer, self.device,
                                          max_batch=int(self.config.max_num_seqs or 64), batch_wait_s=self.batch_wait_s)
        logger.info("HF rollout server %d ready on %s (%s, %s)", self.replica_rank, self.device, path, dtype)

    def get_server_address(self) -> str:
        # verl keys its load balancer by address; this server speaks Ray calls only, so the address is a name.
        return f"{ROLLOUT_NAME}://{server_actor_name(self.replica_rank)}"

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], global_steps: Optional[int]) -> int:
        """Load a chunk of the trainer's weights (HF parameter names); returns how many tensors were loaded."""
        # state_dict names tied weights under each alias (lm_head.weight and embed_tokens.weight).
        targets = self.model.state_dict(keep_vars=True)
        loaded = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = targets.get(name)
                if target is None:
                    raise KeyError(f"HF rollout: the trainer sent weight {name!r}, which the rollout model lacks")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                loaded += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return loaded

    @property
    def stats(self) -> dict[str, float]:
        """Requests, batches, generated tokens and generate seconds so far."""
        return self.generator.stats if self.generator is not None else {}

    async def stats_snapshot(self) -> dict[str, float]:
        return dict(self.generator.stats) if self.generator is not None else {}

    # Replica control calls verl makes on every backend. Weights and the (per-call) KV cache live with this actor
    # for its whole life, so sleeping frees nothing; pausing is honoured by holding new batches.
    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        self.generator.pause()
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        if self.generator is not None:
            self.generator.resume()

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wait_for_requests_to_drain(self) -> None:
        if self.generator is not None:
            await self.generator.drain()

    # ---------------------------------------------------------------- generation
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None:
            raise ValueError("HF rollout: multi-modal inputs are not supported")
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"HF rollout: prompt of {len(prompt_ids)} tokens leaves no room within max_model_len {self.max_model_len}"
            )
        max_tokens = min(int(sampling_params.get("max_tokens") or self.config.response_length), room)
        out = await self.generator.generate(prompt_ids, Sampling.from_params(sampling_params), max_tokens)
        return TokenOutput(token_ids=out.token_ids, log_probs=out.log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    # bf16 matmuls on CPU are slow and lose precision against the fp32 trainer; CPU rollouts run in fp32.
    if device.type == "cpu":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(
        str(name), torch.float32
    )


class HFReplica(RolloutReplica):
    """One HF generation server per replica, placed on the node of the replica's training workers."""

    async def launch_servers(self) -> None:
        from verl.utils.device import get_device_name

        if self.nnodes != 1:
            raise ValueError(
                f"HF rollout: a replica must fit one node (tensor/data/pipeline parallel size {self.world_size} > "
                f"{self.gpus_per_node} devices per node)"
            )
        node_id = None
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        device = get_device_name()
        options: dict[str, Any] = {
            "name": server_actor_name(self.replica_rank, self.name_suffix),
            "max_concurrency": self.max_concurrency,
            "num_cpus": 0,
        }
        if node_id is not None:
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        if device == "cuda":
            # Share the training worker's GPU (hybrid engine), as vLLM's server actor does.
            from verl.plugin.platform import get_platform

            gpu = await self.workers[0].__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_accelerator_ids()["GPU"][0]
            )
            options["runtime_env"] = {
                "env_vars": {
                    "CUDA_VISIBLE_DEVICES": str(gpu),
                    **{var: "1" for var in get_platform().ray_noset_envvars()},
                }
            }
        server = ray.remote(HFGenerationServer).options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank, device=device
        )
        await server.launch_server.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = await server.get_server_address.remote()

    def rollout_worker_use_gpu(self) -> bool:
        return False


class HFServerAdapter(BaseRollout):
    """The training worker's side: forwards the trainer's weights to this replica's HF server after each step."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any):
        super().__init__(config, model_config, device_mesh, *args, **kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        world *= self.config.pipeline_model_parallel_size
        self.replica_rank = rank // world
        # Only the first rank of a replica talks to its server; every rank still walks the weight generator,
        # which gathers each full tensor across the FSDP group.
        self.is_leader = rank % world == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: Optional[int] = None,
        bucket_bytes: int = 256 << 20,
        **kwargs: Any,
    ) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"HF rollout: weight wire format {wire_format!r} is not supported (use named_tensors)")
        if kwargs.get("peft_config") is not None:
            raise ValueError("HF rollout: LoRA adapters are not supported; set actor_rollout_ref.model.lora.merge=true")
        pending: list[ray.ObjectRef] = []
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in weights:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if not self.is_leader:
                continue
            tensor = tensor.detach().to("cpu", copy=True)
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                pending.append(self._server_handle().update_weights.remote(bucket, None))
                bucket, size = [], 0
        if self.is_leader:
            pending.append(self._server_handle().update_weights.remote(bucket, global_steps))
            await asyncio.gather(*pending)


RolloutReplicaRegistry.register(ROLLOUT_NAME, lambda: HFReplica)
# verl looks the worker-side adapter up by (name, mode) in this table (verl.workers.rollout.base.get_rollout_class).
# verl 0.9.1 offers a public registration for replicas (above) but none for adapters: this module-level table is the
# only way in, so it is written here, once; switch to a public call when verl grows one.
_ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFServerAdapter"
