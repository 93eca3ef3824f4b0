"""Small Qwen2-architecture models built from a config, with a tokenizer trained locally on our corpus.

No weights can be downloaded here, yet every loading path in training must be the real one
(``AutoTokenizer/AutoModelForCausalLM.from_pretrained``). So we write a genuine HF model directory: a byte-level BPE
tokenizer trained on the synthetic world's passages (plus the tag vocabulary and a ChatML template), and a randomly
initialised ``Qwen2ForCausalLM`` of a chosen size. ``tiny`` (~0.3M parameters) trains in seconds on a CPU;
``qwen2.5-0.5b`` has Qwen2.5-0.5B's shape (with our smaller vocabulary unless ``vocab_size`` is given) for GPU timing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from masksearch_rl.jsonl import atomic_path

TAG_TEXT = "<think> </think> <search> </search> <information> </information> <answer> </answer>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None = None  # None: the trained tokenizer's size


SHAPES = {
    "tiny": ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "mini": ModelShape(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2),
    "small": ModelShape(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
    # Qwen2.5-0.5B's transformer (24 layers, d=896, GQA 14/2); the vocabulary is ours unless overridden.
    "qwen2.5-0.5b": ModelShape(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer (any text round-trips) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_with_tags(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _with_tags(texts: Iterable[str]) -> Iterator[str]:
    # The tags are frequent enough in the training texts that each becomes a few tokens at most.
    for _ in range(50):
        yield TAG_TEXT
    yield from texts


def build_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    shape: str = "tiny",
    vocab_size: int = 2000,
    seed: int = 0,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write an HF model directory (tokenizer + random-weight Qwen2) to ``out_dir``; returns it.

    Written atomically: a killed build leaves no half model behind, and an existing directory is reused.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / "masksearch_model.json").write_text(
            json.dumps({"shape": shape, "seed": seed, "parameters": model.num_parameters()}, indent=2)
        )
    return out_dir


def corpus_texts(corpus_jsonl: Path, limit: int = 5000) -> Iterator[str]:
    """Passage texts of a ``{"id","contents"}`` corpus, for tokenizer training."""
    from masksearch_rl.jsonl import iter_jsonl

    for i, (_, record) in enumerate(iter_jsonl(corpus_jsonl)):
        if i >= limit:
            break
        yield record["contents"]
