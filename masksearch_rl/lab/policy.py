"""The lab's policy: a tiny Qwen2 that can search and copy, built once (reproducible from the lab's seed).

Why three steps: a randomly initialised model that sees only SFT's few answer tokens per trajectory never learns
to copy within a CPU budget (0% answer accuracy after 1,000 SFT steps, issue 13's probe). The information block
of an oracle trajectory, though, is the masked passage again with its masks filled in: predicting it is copy
practice on nearly every token. So:

1. ``init``: a byte-level BPE tokenizer trained on the world and the prompt templates, and a random Qwen2
   (:mod:`masksearch_rl.tiny_model`);
2. ``pretrain``: next-token loss on *every* token of the oracle trajectories (prompt, searches, information,
   answers) -- :class:`~masksearch_rl.sft.rl_layout_dataset.RLLayoutPretrainDataset`;
3. ``sft``: loss on the policy's own tokens only (:class:`~masksearch_rl.sft.rl_layout_dataset.RLLayoutSFTDataset`).

Both steps run our SFT entry (``python -m masksearch_rl.sft.train``, the quickstart SFT recipe) with the backend
``LabConfig.sft_backend``: by default the HF Trainer runner, which trains this small a model on a CPU several times
faster than verl's FSDP engine (same datasets, same loss mask, same recipe).

Then :func:`copy_diagnostics` measures, on held-out items, what RL will start from: answer accuracy of full
episodes, how often the model's query is the oracle's, accuracy when the oracle's search and results are forced
in (can it copy once it sees the passage?), and QA accuracy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import atomic_path, read_jsonl
from masksearch_rl.lab.config import LabConfig
from masksearch_rl.lab.data import QA_SOURCE, RAMP_SOURCE, LabPaths

LAYOUT_DATASET = "pkg://masksearch_rl.sft.rl_layout_dataset"


def template_texts() -> list[str]:
    """The fixed text of every prompt and oracle thought, so the tokenizer learns them as few tokens."""
    from envs.prompts import RAMP_ANSWER_HINT, RAMP_INSTRUCTION, SYSTEM_PROMPT
    from masksearch_rl.sft.oracle import FIXED_THOUGHTS, QA_THOUGHTS

    return [SYSTEM_PROMPT, RAMP_INSTRUCTION, RAMP_ANSWER_HINT, *FIXED_THOUGHTS.values(), *QA_THOUGHTS.values(),
            "Question:", "Text:"]


def init_policy(cfg: LabConfig, paths: LabPaths, out: Path) -> Path:
    """Tokenizer + random-weight model at ``out`` (kept when already there)."""
    from masksearch_rl.tiny_model import build_tiny_model, corpus_texts

    def texts():
        for _ in range(20):
            yield from template_texts()
        yield from corpus_texts(paths.corpus, limit=cfg.passages)

    return build_tiny_model(out, texts(), shape=cfg.model_shape, vocab_size=cfg.vocab_size, seed=cfg.seed)


def train_policy(cfg: LabConfig, paths: LabPaths, init_dir: Path, out: Path) -> Path:
    """Copy pre-training then SFT through our SFT entry; returns the SFT model directory."""
    from masksearch_rl.sft.warmup import run_sft

    common = [f"trainer.seed={cfg.seed}", f"data.train_batch_size={cfg.batch_size}",
              f"data.micro_batch_size_per_gpu={cfg.batch_size}", "data.use_dynamic_bsz=false",
              f"data.custom_cls.path={LAYOUT_DATASET}"]
    pretrained = init_dir
    if cfg.pretrain_steps > 0:
        pretrained = run_sft(paths.sft, init_dir, out / "pretrain", cfg.pretrain_steps, [
            *common, "data.custom_cls.name=RLLayoutPretrainDataset", f"optim.lr={cfg.pretrain_lr}"],
            backend=cfg.sft_backend, meta={"stage": "copy pre-training"})
    return run_sft(paths.sft, pretrained, out / "sft", cfg.sft_steps, [
        *common, "data.custom_cls.name=RLLayoutSFTDataset", f"optim.lr={cfg.sft_lr}"],
        backend=cfg.sft_backend, meta={"stage": "sft"})


# ------------------------------------------------------------------------------------------------ diagnostics
def copy_diagnostics(cfg: LabConfig, paths: LabPaths, model_dir: Path, out: Path) -> dict[str, Any]:
    """Greedy episodes of ``model_dir`` on held-out RAMP items and questions, written to ``out`` (kept when there).

    ``ramp_acc`` / ``qa_acc``: the reward's answer credit (``acc``) of whole episodes, the search answered from the
    lab's index as in RL; ``format_rate``: well-formed episodes; ``query_is_oracle``: the first query equals the
    oracle's; ``query_names_subject``: it contains the item's subject (its title); ``forced_acc``: the answer's
    credit when the oracle's search and its results are forced in before the model answers.
    """
    if out.is_file():
        return json.loads(out.read_text())
    result = asyncio.run(_diagnose(cfg, paths, model_dir))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


async def _diagnose(cfg: LabConfig, paths: LabPaths, model_dir: Path) -> dict[str, Any]:
    from envs.prompts import information_block, qa_messages, ramp_messages
    from envs.rollout import Segment, make_search_env, run_episode
    from masksearch_rl.eval.hf_policy import HFPolicy
    from masksearch_rl.sft.oracle import FIXED_THOUGHTS, opening_query
    from reward.masksearch_reward import compute_score_sync

    policy = HFPolicy(str(model_dir), max_batch=16, wait_ms=20.0)
    settings = {"backend": {"type": "local", "index_dir": str(paths.index)}, "topk": cfg.topk,
                "max_info_tokens": cfg.max_info_tokens}
    search = make_search_env(settings, tokenizer=policy.tokenizer)
    items = read_jsonl(paths.items / "ramp_val.jsonl")[: cfg.diagnostics_items]
    questions = read_jsonl(paths.items / "qa_val.jsonl")[: cfg.diagnostics_items]

    def ramp_score(item: dict, response: str) -> dict[str, float]:
        truth = {"target": item["masks"], "masks": item["masks"], "masked_passage": item["query"]}
        return compute_score_sync(RAMP_SOURCE, response, truth)

    async def ramp_episode(item: dict) -> dict[str, Any]:
        messages = ramp_messages(item["query"])
        episode = await run_episode(policy, search, messages, max_turns=2, max_new_tokens=96)
        scored = ramp_score(item, episode.raw)
        oracle = opening_query(item["query"], cfg.opening_words)
        first = episode.searches[0] if episode.searches else ""
        # Forced: the oracle's first turn and its real results, then the model's answer turn.
        outcome = await search.search(oracle)
        forced = [Segment("policy", f"<think> {FIXED_THOUGHTS['first']} </think>\n<search> {oracle} </search>"),
                  Segment("info", information_block(outcome.text))]
        reply = await policy.generate(messages, forced, stop=["</answer>"], max_tokens=96)
        forced_scored = ramp_score(item, "".join(s.text for s in forced) + reply.text)
        return {"acc": scored["acc"], "format": scored["format"], "searches": episode.search_count,
                "query_is_oracle": float(" ".join(first.split()) == oracle),
                "query_names_subject": float(bool(first) and item["title"].lower() in first.lower()),
                "forced_acc": forced_scored["acc"], "num_masks": item["num_masks"], "raw": episode.raw[-400:]}

    async def qa_episode(question: dict) -> dict[str, Any]:
        episode = await run_episode(policy, search, qa_messages(question["question"]), max_turns=2, max_new_tokens=96)
        scored = compute_score_sync(QA_SOURCE, episode.raw, {"target": [question["answer"]]})
        return {"acc": scored["acc"], "format": scored["format"], "searches": episode.search_count,
                "query_is_oracle": float(bool(episode.searches) and episode.searches[0] == question["question"])}

    try:
        ramp = await asyncio.gather(*(ramp_episode(item) for item in items))
        qa = await asyncio.gather(*(qa_episode(question) for question in questions))
    finally:
        await policy.aclose()

    def mean(rows: list[dict], key: str) -> float:
        return round(sum(row[key] for row in rows) / max(1, len(rows)), 4)

    by_masks: dict[str, float] = {}
    for k in sorted({row["num_masks"] for row in ramp}):
        by_masks[str(k)] = mean([row for row in ramp if row["num_masks"] == k], "acc")
    return {
        "model": str(model_dir),
        "ramp": {"items": len(ramp), **{key: mean(ramp, key) for key in (
            "acc", "format", "searches", "query_is_oracle", "query_names_subject", "forced_acc")},
            "acc_by_num_masks": by_masks, "examples": [row["raw"] for row in ramp[:3]]},
        "qa": {"questions": len(qa), **{key: mean(qa, key) for key in ("acc", "format", "searches",
                                                                       "query_is_oracle")}},
    }
