"""Does a small Qwen2 learn to copy (form an induction head) on a CPU budget? The learning lab's open question.

Each example: three random token sequences from an ``--alphabet``-token alphabet, then one of them again; the loss is
taken on the repeat only (from its second token: the first says which sequence repeats). A model that copies drives
it towards 0; one that does not stays near ln(alphabet), the loss of guessing within the alphabet. docs/lab.md
records what these runs measured.

    python benchmarks/copy_drill.py --steps 3000 --lr 3e-3 --batch 64 --alphabet 64 --layers 2 --hidden 128 --heads 8
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 2000


def drill(rng: random.Random, alphabet: int) -> tuple[list[int], list[int]]:
    """Token ids and the loss mask of one example (1 where the token is to be copied)."""
    sequences = [[rng.randrange(10, 10 + alphabet) for _ in range(rng.randrange(5, 16))] for _ in range(3)]
    repeat = sequences[rng.randrange(3)]
    ids = [token for sequence in sequences for token in sequence] + repeat
    mask = [0] * (len(ids) - len(repeat)) + [0] + [1] * (len(repeat) - 1)
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--alphabet", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    print(f"guessing within the alphabet: ln {args.alphabet} = {math.log(args.alphabet):.3f} nats/token", flush=True)
    started, recent = time.perf_counter(), []
    for step in range(args.steps):
        batch = [drill(rng, args.alphabet) for _ in range(args.batch)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((args.batch, width), dtype=torch.long)
        mask = torch.zeros((args.batch, width))
        attention = torch.zeros((args.batch, width), dtype=torch.long)
        for row, (tokens, copy) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = torch.tensor(copy, dtype=torch.float)
            attention[row, : len(tokens)] = 1
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        losses = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        weights = mask[:, 1:].reshape(-1)
        loss = (losses * weights).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        recent = (recent + [loss.item()])[-100:]
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} copy loss {sum(recent) / len(recent):.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
