"""Perplexity-based masking: mask the spans a language model finds hardest to predict.

The paper's harder RAMP variant scores candidate spans with a small causal LM and masks the ones with the highest
loss: spans that can't be guessed from the surrounding text force the agent to search. We score every candidate
of a passage with *one* forward pass over the unmasked passage: a span's score is the mean token loss
(-log p(token | everything before it)) over the tokens that overlap the span. Passages are batched (right-padded,
so real tokens keep their positions); CPU works for small models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PplConfig:
    model_path: str
    device: str = "cpu"
    batch_size: int = 4
    max_length: int = 512  # tokens; spans beyond it score -inf (never preferred)
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on GPU


class PplScorer:
    """Loads a Hugging Face causal LM and tokenizer (a local path or hub id resolvable offline)."""

    def __init__(self, config: PplConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{config.model_path}: PPL masking needs a fast tokenizer (it maps tokens to characters)")
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        if config.dtype == "auto":
            dtype = torch.float32 if config.device == "cpu" else torch.bfloat16
        else:
            dtype = getattr(torch, config.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype).to(config.device)
        self.model.eval()

    def token_losses(self, texts: Sequence[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """Per text: character offsets of each token and its loss (NaN for the first token, which has no context)."""
        torch = self._torch
        results: list[tuple[list[tuple[int, int]], list[float]]] = []
        for begin in range(0, len(texts), self.config.batch_size):
            batch = list(texts[begin : begin + self.config.batch_size])
            encoded = self.tokenizer(
                batch,
                return_offsets_mapping=True,
                truncation=True,
                max_length=self.config.max_length,
                padding=True,
                return_tensors="pt",
            )
            offsets = encoded.pop("offset_mapping").tolist()
            ids = encoded["input_ids"].to(self.config.device)
            mask = encoded["attention_mask"].to(self.config.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
                )  # loss[b, t] predicts token t+1
            loss = loss.cpu().tolist()
            lengths = mask.sum(dim=1).tolist()
            for row in range(len(batch)):
                n = int(lengths[row])
                row_losses = [math.nan] + loss[row][: n - 1]
                results.append(([tuple(o) for o in offsets[row][:n]], row_losses))
        return results

    def span_scores(self, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]) -> list[list[float]]:
        """Mean token loss of each ``(start, end)`` character span of each text; -inf when no scored token overlaps
        it (truncated away)."""
        scores = []
        for (offsets, losses), text_spans in zip(self.token_losses(texts), spans):
            scores.append([_mean_overlap(offsets, losses, start, end) for start, end in text_spans])
        return scores

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"model_path": cfg.model_path, "device": cfg.device, "batch_size": cfg.batch_size}


def _mean_overlap(offsets: list[tuple[int, int]], losses: list[float], start: int, end: int) -> float:
    values = [
        loss
        for (tok_start, tok_end), loss in zip(offsets, losses)
        if tok_end > tok_start and tok_start < end and start < tok_end and not math.isnan(loss)
    ]
    return sum(values) / len(values) if values else -math.inf
