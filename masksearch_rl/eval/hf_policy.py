"""A local Hugging Face causal LM as an :class:`envs.rollout.PolicyClient` (no server needed).

Why: checkpoints straight out of ``verl.model_merger`` can be scored without starting vLLM, e.g. on a CPU box or
for a quick look. The layout is the RL loop's: the chat template is rendered with the generation prompt and the
transcript is appended as raw text (the same as :class:`envs.rollout.CompletionPolicy`).

Concurrent episodes are batched: each ``generate`` call is queued in a
:class:`masksearch_rl.retrieval.batching.MicroBatcher` (the retrieval server's request batcher, reused as-is: its
"queries" are prompts and its "topk" is ``max_tokens``), which runs one left-padded ``model.generate`` per batch in a
worker thread. Generation stops at ``</search>`` / ``</answer>`` (transformers' ``stop_strings``) or EOS; each text
is cut after its first stop tag.
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
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype).to(device).eval()
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
                pad_token_id=self.tokenizer.pad_token_id, **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        replies = []
        for row in new_tokens.tolist():
            generated = [t for t in row if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            found = find_stop(text)
            if found is not None:
                replies.append([PolicyReply(text[: found[0]], "stop", found[1])])
            elif self.tokenizer.eos_token_id in generated or len(generated) < max_tokens:
                replies.append([PolicyReply(text, "stop")])
            else:
                replies.append([PolicyReply(text, "length")])
        return replies

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.pop(loop, None)
        if batcher is not None:
            await batcher.close()
