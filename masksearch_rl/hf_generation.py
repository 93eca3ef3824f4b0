"""Batched generation with a Hugging Face causal LM: the one implementation both local generators use.

Who uses it: the ``hf`` rollout backend of verl (:mod:`masksearch_rl.verl_ext.hf_rollout`, token ids for the agent
loops during RL) and :class:`masksearch_rl.eval.hf_policy.HFPolicy` (text for eval, the SFT probe and the lab).
Why one: both take many concurrent requests (agent turns) and must turn them into few padded ``model.generate``
calls, cut each row where it really ended (EOS, a stop string, its own ``max_tokens``; never at padding), and agree
on sampling. Two copies had already drifted apart.

:class:`BatchedGenerator` queues requests, groups those that sample alike (:class:`Sampling`; ``max_tokens`` may
differ, each row is cut to its own) and runs one left-padded ``generate`` per group in a worker thread, up to
``max_batch`` rows, after waiting ``batch_wait_s`` for concurrent requests to join. A failed batch fails its own
requests only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a request samples; requests batch together only when this is equal. ``temperature`` 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Sampling:
        """From verl's / vLLM's sampling-params dict (``top_k`` -1 or None: no cut; ``stop`` a string or list)."""
        top_k = params.get("top_k")
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        return cls(
            temperature=float(params.get("temperature", 1.0) or 0.0),
            top_p=float(params.get("top_p", 1.0) or 1.0),
            top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0,
            repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
            stop=tuple(stop),
            logprobs=bool(params.get("logprobs")),
        )


@dataclass
class Generated:
    """One request's new tokens, through its EOS when it has one (``ended_with_eos``)."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    ended_with_eos: bool = False


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the generation config's EOS ids (Qwen2.5: ``<|im_end|>`` and
    ``<|endoftext|>``) and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


def finished_length(tokens: list[int], eos: set[int], pad_id: int | None, stopped_by_criteria: bool) -> int:
    """How many generated tokens belong to the sequence: through its EOS, or up to the padding ``generate`` appends
    once a row has finished (by a stop string) while other rows go on."""
    for i, token in enumerate(tokens):
        if token in eos:
            return i + 1
    end = len(tokens)
    if stopped_by_criteria or pad_id is not None:
        while end > 0 and tokens[end - 1] == pad_id:
            end -= 1
    return end


class BatchedGenerator:
    """Concurrent ``await generate(prompt_ids, sampling, max_tokens)`` calls served by few batched ``generate``s."""

    def __init__(self, model: Any, tokenizer: Any, device: Any, max_batch: int = 64, batch_wait_s: float = 0.005):
        if tokenizer.pad_token_id is None:  # left padding of batched prompts only; row ends never look at it
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch = max(1, int(max_batch))
        self.batch_wait_s = batch_wait_s
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "generate_s": 0.0}
        self.batch_sizes: dict[int, int] = {}  # rows per generate call -> number of calls
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[Sampling, list[_Request]] = {}
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def generate(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int) -> Generated:
        self._bind_to_running_loop()
        request = _Request([int(t) for t in prompt_ids], max(1, int(max_tokens)),
                           asyncio.get_running_loop().create_future())
        self._queues.setdefault(sampling, []).append(request)
        self.stats["requests"] += 1
        self._wakeup.set()
        return await request.future

    def pause(self) -> None:
        """Hold new batches (verl's abort): queued requests wait until :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._wakeup is not None:
            self._wakeup.set()

    async def drain(self) -> None:
        while any(self._queues.values()):
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker, self._loop = None, None

    def _bind_to_running_loop(self) -> None:
        """Start the worker on the caller's event loop (a new loop, e.g. a second ``asyncio.run``, gets a new one)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop, self._queues = loop, {}
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        """Take queued requests in batches, forever; a failure fails that batch's requests only."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self.batch_wait_s)  # let concurrent requests join the batch
            while not self._paused and any(self._queues.values()):
                sampling = max(self._queues, key=lambda key: len(self._queues[key]))
                queue = self._queues[sampling]
                batch, self._queues[sampling] = queue[: self.max_batch], queue[self.max_batch :]
                try:
                    outputs = await asyncio.to_thread(self._generate_batch, sampling, batch)
                except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                    logger.exception("HF generation batch failed")
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(err)
                    continue
                for request, output in zip(batch, outputs):
                    if not request.future.done():
                        request.future.set_result(output)

    def _generate_batch(self, sampling: Sampling, batch: list[_Request]) -> list[Generated]:
        import torch

        started = time.perf_counter()
        pad_id = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention[row, width - len(request.prompt_ids):] = 1
        greedy = sampling.temperature <= 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(r.max_tokens for r in batch), do_sample=not greedy, pad_token_id=pad_id,
            eos_token_id=self.eos_ids or None, return_dict_in_generate=True, output_logits=sampling.logprobs,
            repetition_penalty=sampling.repetition_penalty,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.stop:
            # transformers matches stop strings on the decoded text including the prompt's tail (vLLM only looks at
            # the output); our stop tags never straddle a prompt's end (prompts end with a newline), so it is moot.
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      **kwargs)
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = None
        if sampling.logprobs:
            # Log-probabilities of the sampled tokens under the policy at the sampling temperature: the quantity the
            # trainer recomputes as old_log_prob (logits / temperature), not the top-p/top-k-warped distribution.
            logits = torch.stack(out.logits, dim=1).float()
            if not greedy:
                logits = logits / sampling.temperature
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.to(logits.device)[..., None])
            logprobs = logprobs[..., 0].cpu()
        eos = set(self.eos_ids)
        outputs = []
        for row, request in enumerate(batch):
            tokens = new_tokens[row].tolist()
            length = min(finished_length(tokens, eos, pad_id, stopped_by_criteria=bool(sampling.stop)),
                         request.max_tokens)
            ids = tokens[:length]
            outputs.append(Generated(ids, logprobs[row, :length].tolist() if logprobs is not None else None,
                                     ended_with_eos=bool(ids) and ids[-1] in eos))
            self.stats["generated_tokens"] += length
        self.stats["batches"] += 1
        self.stats["generate_s"] += time.perf_counter() - started
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        return outputs
