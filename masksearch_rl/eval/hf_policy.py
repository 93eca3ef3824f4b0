"""A local Hugging Face causal LM as an :class:`envs.rollout.PolicyClient` (no server needed).

Why: checkpoints straight out of ``verl.model_merger`` can be scored without starting vLLM, e.g. on a CPU box or
for a quick look. The layout is the RL loop's: the chat template is rendered with the generation prompt and the
transcript is appended as raw text (the same as :class:`envs.rollout.CompletionPolicy`).

Concurrent episodes are batched: each ``generate`` call is queued in a
:class:`masksearch_rl.retrieval.batching.MicroBatcher` (the retrieval server's request batcher, reused as-is: its
"queries" are prompts and its "topk" is ``max_tokens``), which runs one left-padded ``model.generate`` per batch in a
worker thread. Generation stops at ``</search>`` / ``</answer>`` (transformers' ``stop_strings``) or EOS; each text
is cut after its first stop tag.

Finish reasons are read from where each row's generation ended, never from padding: a model without a pad token
pads with EOS, and models such as Qwen2.5 pad with a token that is also one of their EOS ids, so padding says
nothing. A row that holds one of the EOS ids ended there ("stop"), one that holds a stop tag ended at it ("stop",
with the tag), and any other ran out of ``max_tokens`` ("length").
"""

from __future__ import annotations

import asyncio
from typing import Any

from envs.prompts import STOP_STRINGS, find_stop
from envs.rollout import PolicyReply, Segment


class HFPolicy:
    """``HFPolicy("checkpoints/.../hf", device="cuda")``; greedy unless ``temperature`` > 0."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "auto", max_batch: int = 8,
                 wait_ms: float = 5.0, temperature: float = 0.0, top_p: float = 1.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # left padding of batched prompts only; finishes never look at it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype).to(device).eval()
        self.eos_ids = _eos_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        self.device = device
        self.max_batch, self.wait_ms = max_batch, wait_ms
        self.temperature, self.top_p = temperature, top_p
        self._batchers: dict[asyncio.AbstractEventLoop, Any] = {}
        self.name = model_path

    async def generate(
        self, messages: list[dict[str, Any]], transcript: list[Segment], *, stop: list[str], max_tokens: int
    ) -> PolicyReply:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt += "".join(segment.text for segment in transcript)
        batcher = await self._batcher()
        [[reply]] = await batcher.search([prompt], max_tokens)
        return reply

    async def _batcher(self):
        from masksearch_rl.retrieval.batching import MicroBatcher

        loop = asyncio.get_running_loop()
        if loop not in self._batchers:
            batcher = MicroBatcher(self._generate_batch, max_batch=self.max_batch, wait_ms=self.wait_ms)
            await batcher.start()
            self._batchers[loop] = batcher
        return self._batchers[loop]

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Prompts per ``model.generate`` call -> number of calls (all event loops)."""
        sizes: dict[int, int] = {}
        for batcher in self._batchers.values():
            for size, count in batcher.batch_sizes.items():
                sizes[size] = sizes.get(size, 0) + count
        return sizes

    def _generate_batch(self, prompts: list[str], max_tokens: int) -> list[list[PolicyReply]]:
        import torch

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            if self.temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            output = self.model.generate(
                **encoded, max_new_tokens=max_tokens, stop_strings=list(STOP_STRINGS), tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids or None, **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        return [[self._reply(row)] for row in new_tokens.tolist()]

    def _reply(self, row: list[int]) -> PolicyReply:
        """One row of new tokens as a reply; everything after the row's first EOS is padding."""
        end = next((i for i, token in enumerate(row) if token in self.eos_ids), None)
        text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
        found = find_stop(text)
        if found is not None:
            return PolicyReply(text[: found[0]], "stop", found[1])
        return PolicyReply(text, "stop" if end is not None else "length")

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.pop(loop, None)
        if batcher is not None:
            await batcher.close()


def _eos_ids(configured: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    """Every token that ends a turn: the generation config's EOS ids (Qwen2.5: ``<|im_end|>`` and
    ``<|endoftext|>``) and the tokenizer's."""
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer_eos] if i is not None})
