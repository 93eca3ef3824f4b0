"""A local Hugging Face causal LM as an :class:`envs.rollout.PolicyClient` (no server needed).

Why: checkpoints straight out of ``verl.model_merger`` can be scored without starting vLLM, e.g. on a CPU box or
for a quick look. Layouts (``layout``): ``"continue"`` (default), the RL loop's -- the chat template is rendered with
the generation prompt and the transcript appended as raw text (as :class:`envs.rollout.CompletionPolicy` does); or
``"turns"``, the SFT data's -- each policy turn an assistant message and each information block a ``tool`` message
(as :meth:`envs.rollout.Episode.to_messages` renders trajectories).

Concurrent episodes are batched by :class:`masksearch_rl.hf_generation.BatchedGenerator`, the project's one batched
HF generation (the ``hf`` RL rollout backend uses it too): generation stops at ``</search>`` / ``</answer>``
(transformers' ``stop_strings``) or EOS, each row is cut where it really ended (never at padding: a model without a
pad token pads with EOS, and Qwen2.5 pads with a token that is also one of its EOS ids), and each text is cut after
its first stop tag. A row that ended with EOS or a stop tag finished with "stop", any other ran out of
``max_tokens`` ("length").
"""

from __future__ import annotations

from typing import Any

from envs.prompts import STOP_STRINGS, find_stop
from envs.rollout import PolicyReply, Segment, transcript_messages
from masksearch_rl.hf_generation import BatchedGenerator, Generated, Sampling

LAYOUTS = ("continue", "turns")


class HFPolicy:
    """``HFPolicy("checkpoints/.../hf", device="cuda")``; greedy unless ``temperature`` > 0."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "auto", max_batch: int = 8,
                 wait_ms: float = 5.0, temperature: float = 0.0, top_p: float = 1.0, layout: str = "continue"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if layout not in LAYOUTS:
            raise ValueError(f"HFPolicy layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype).to(device).eval()
        self.generator = BatchedGenerator(self.model, self.tokenizer, device, max_batch=max_batch,
                                          batch_wait_s=wait_ms / 1000)
        self.sampling = Sampling(temperature=temperature, top_p=top_p, stop=tuple(STOP_STRINGS))
        self.name = model_path

    async def generate(
        self, messages: list[dict[str, Any]], transcript: list[Segment], *, stop: list[str], max_tokens: int
    ) -> PolicyReply:
        if self.layout == "turns":
            chat = [*messages, *transcript_messages(transcript)]
            prompt = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        else:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt += "".join(segment.text for segment in transcript)
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self._reply(await self.generator.generate(prompt_ids, self.sampling, max_tokens))

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Prompts per ``model.generate`` call -> number of calls."""
        return dict(self.generator.batch_sizes)

    def _reply(self, generated: Generated) -> PolicyReply:
        ids = generated.token_ids[:-1] if generated.ended_with_eos else generated.token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        found = find_stop(text)
        if found is not None:
            return PolicyReply(text[: found[0]], "stop", found[1])
        return PolicyReply(text, "stop" if generated.ended_with_eos else "length")

    async def aclose(self) -> None:
        await self.generator.close()
