"""One Self-Evolve iteration, given a teacher served behind an OpenAI-compatible endpoint (e.g. vLLM).

Reads top to bottom: D_T (the current trajectory set, JSONL) -> the fresh items (pool items whose id is in neither
D_T nor any earlier iteration's attempts) -> the teacher rolls each out in our tag protocol
(:func:`envs.rollout.run_episode`, real searches) -> the judge labels the answer (as in ``cot build``) -> records
appended to ``<work_dir>/iter_<i>/teacher.jsonl`` (resumable) -> kept ones merged with D_T into
``iter_<i>/dataset.jsonl`` (dedupe by id and content) -> ``iter_<i>/sft/{train,val}.parquet`` -> ``iter_<i>/stats.json``.

Teacher records use the ``cot build`` schema (``status`` correct / wrong / max_turns / parse_error, ``keep``,
``messages``, ``response``, ``log``), ``generator: teacher_iter<i>``. Endpoint failures are not recorded (retried on
the next run) and counted as backend errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import BadLines, ResumableJsonlWriter, atomic_path, iter_jsonl, write_jsonl

FINISH_TO_STATUS = {"answer": None, "search_limit": "max_turns", "length": "max_turns", "no_tag": "parse_error"}


@dataclass
class IterationConfig:
    iteration: int
    items: str  # RAMP items pool (JSONL)
    work_dir: str
    teacher: dict[str, Any]  # LLMConfig fields of the served teacher
    judge: dict[str, Any]  # LLMConfig fields of the judge
    dataset: str | None = None  # D_T of the previous iteration (None: start from nothing)
    search: dict[str, Any] = field(default_factory=dict)
    num_items: int = 1000
    max_turns: int = 4
    max_new_tokens: int = 1024
    chat_mode: str = "turns"  # how the teacher sees the transcript (envs.rollout.ChatPolicy)
    info_role: str = "tool"
    min_judge_score: float = 1.0
    concurrency: int = 32
    val_fraction: float = 0.02
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iteration < 1 or self.num_items < 1:
            raise ValueError("selfevolve iteration and num_items must be >= 1")

    @property
    def iter_dir(self) -> Path:
        return Path(self.work_dir) / f"iter_{self.iteration}"


def attempted_ids(work_dir: Path, before: int) -> set[str]:
    """Ids any earlier iteration already gave the teacher: fresh items are never re-used."""
    ids: set[str] = set()
    for i in range(1, before):
        path = work_dir / f"iter_{i}" / "teacher.jsonl"
        if path.exists():
            ids.update(str(r["id"]) for _, r in iter_jsonl(path, bad=BadLines(), required=("id",)))
    return ids


def fresh_tasks(config: IterationConfig, exclude: set[str], bad: BadLines) -> list:
    from masksearch_rl.cot.tasks import iter_tasks

    chosen = []
    for task in iter_tasks(config.items, bad):
        if task.id not in exclude:
            chosen.append(task)
            if len(chosen) >= config.num_items:
                break
    return chosen


def run_iteration(config: IterationConfig) -> dict[str, Any]:
    return asyncio.run(_run(config))


async def _run(config: IterationConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from envs.rollout import ChatPolicy, make_search_env, run_episode
    from masksearch_rl.cot.pipeline import BackendFailure, label_answer
    from masksearch_rl.llm import LLMClient, LLMConfig
    from reward.judge import JUDGE_LLM_DEFAULTS, Judge

    started = time.perf_counter()
    out_dir = config.iter_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = BadLines()
    base = [r for _, r in iter_jsonl(config.dataset, bad=bad, required=("id",))] if config.dataset else []
    exclude = {str(r["id"]) for r in base} | attempted_ids(Path(config.work_dir), config.iteration)
    tasks = fresh_tasks(config, exclude, bad)
    teacher = LLMClient(LLMConfig.from_dict(config.teacher))
    judge = Judge(LLMClient(LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge})))
    policy = ChatPolicy(teacher, mode=config.chat_mode, info_role=config.info_role)
    search = make_search_env(config.search)
    counts: Counter = Counter()
    writer = ResumableJsonlWriter(out_dir / "teacher.jsonl")
    semaphore = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(tasks), desc=f"self-evolve iter {config.iteration}", disable=not config.progress)

    async def one(task) -> None:
        async with semaphore:
            episode = await run_episode(policy, search, list(task.prompt), config.max_turns, config.max_new_tokens)
            if episode.finish == "policy_error":
                counts["backend_error"] += 1
                return
            status = FINISH_TO_STATUS[episode.finish]
            judged = None
            if status is None:
                try:
                    score, judged = await label_answer(judge, task, episode.answer or "", True)
                except BackendFailure:
                    counts["backend_error"] += 1
                    return
                status = "correct" if score >= config.min_judge_score else "wrong"
            record = {
                "id": task.id, "data_source": task.data_source, "kind": task.kind, "status": status,
                "reason": "" if status == "correct" else f"finish={episode.finish}", "keep": status == "correct",
                "answer": episode.answer, "gold": [list(g) for g in task.golds], "judge": judged,
                "num_searches": episode.search_count, "messages": episode.to_messages(config.info_role),
                "response": episode.raw, "log": episode.to_dict()["turns"], "latency_s": round(episode.latency_s, 3),
                "generator": f"teacher_iter{config.iteration}",
            }
            if writer.write(record):
                counts[status] += 1

    try:
        with writer:
            pending = [t for t in tasks if t.id not in writer.done]
            counts["skipped_done"] = len(tasks) - len(pending)
            bar.update(counts["skipped_done"])
            jobs = [asyncio.create_task(one(t)) for t in pending]
            for job in asyncio.as_completed(jobs):
                await job
                bar.update(1)
    finally:
        bar.close()
        await teacher.aclose()
        await judge.client.aclose()
    merged = merge_iteration(base, out_dir / "teacher.jsonl", out_dir / "dataset.jsonl")
    from masksearch_rl.sft.export import export_sft

    sft = export_sft([out_dir / "dataset.jsonl"], out_dir / "sft", config.val_fraction, config.seed)
    stats = {
        "iteration": config.iteration,
        "fresh_items": len(tasks),
        "teacher": {"correct": counts["correct"], "judged_wrong": counts["wrong"], "max_turns": counts["max_turns"],
                    "parse_errors": counts["parse_error"], "backend_errors": counts["backend_error"],
                    "skipped_done": counts["skipped_done"]},
        "merge": merged,
        "sft": {k: sft[k] for k in ("train", "val")},
        "teacher_llm": dict(teacher.stats),
        "judge": dict(judge.stats),
        "bad_input_lines": bad.summary(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    with atomic_path(out_dir / "stats.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2))
    return stats


def merge_iteration(base: list[dict], new_path: Path, out: Path) -> dict[str, int]:
    """D_T(i) = D_T(i-1) + the kept new trajectories whose id and content are both new; written atomically."""
    from masksearch_rl.sft.export import trajectory_key

    ids = {str(r["id"]) for r in base}
    contents = {trajectory_key(r) for r in base if "messages" in r}
    merged, added, duplicates = list(base), 0, 0
    for _, record in iter_jsonl(new_path, bad=BadLines(), required=("id", "messages")):
        if not record.get("keep"):
            continue
        key = trajectory_key(record)
        if str(record["id"]) in ids or key in contents:
            duplicates += 1
            continue
        ids.add(str(record["id"]))
        contents.add(key)
        merged.append(record)
        added += 1
    write_jsonl(out, merged)
    return {"previous": len(base), "added": added, "duplicates": duplicates, "total": len(merged)}
