"""One Self-Evolve iteration, given a teacher served behind an OpenAI-compatible endpoint (e.g. vLLM).

Reads top to bottom: D_T (the current trajectory set, JSONL) -> the fresh items (pool items whose id is in neither
D_T nor any earlier iteration's attempts) -> the teacher rolls each out in our tag protocol
(:func:`envs.rollout.run_episode`, real searches) -> the judge labels the answer (as in ``cot build``) -> records
appended to ``<work_dir>/iter_<i>/teacher.jsonl`` (resumable) -> kept ones merged with D_T into
``iter_<i>/dataset.jsonl`` (dedupe by id and content) -> ``iter_<i>/sft/{train,val}.parquet`` -> ``iter_<i>/stats.json``.

Teacher records use the ``cot build`` schema (``status`` correct / wrong / max_turns / parse_error, ``keep``,
``messages``, ``response``, ``log``), ``generator: teacher_iter<i>``, plus ``format`` (``ok`` or why the response
breaks the tag protocol, :func:`reward.format.check_format` with one span per mask for RAMP). ``keep`` needs both a
judged-correct answer and ``format: ok``: the judge reads only the answer, and SFT on a malformed trajectory teaches
the malformation.

What is not recorded (so the next run retries it), but counted and logged with its cause to
``iter_<i>/teacher.jsonl.errors.jsonl`` (pruned of ids that later succeed): a teacher endpoint failure, a search that
failed (backend down or erroring: its error text in an ``<information>`` block would be trained on), a judge failure
(unless ``judge_fallback``), and any unexpected exception (``task_error``, with its traceback). The rollout's own
notices for the policy's moves (search limit reached, empty or over-long query) are not failures: the first is
normal, the others make the record ``format`` not ok.

``stats.json``: ``teacher`` is recounted from the whole ``teacher.jsonl`` (right after any number of resumes),
``run`` is what this process did.

Curriculum (``curriculum``: :class:`~masksearch_rl.curriculum.sampler.CurriculumConfig` fields, ``staged`` or
``mixed``): the fresh items are taken in the RL sampler's order over the pool (``staged``: one-mask items first, so
early rounds distil the easy items and later rounds the harder ones; each round continues down the schedule past
what earlier rounds attempted), the round's SFT export follows the same schedule (:func:`masksearch_rl.sft.export
.export_sft`), and ``stats.json`` records it (``curriculum``: the settings, the fresh items per mask count, the SFT
rows per stage).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.rollout import LIMIT_NOTICES
from envs.search_client import EMPTY_QUERY_ERROR, QUERY_TOO_LONG_ERROR
from masksearch_rl.cot import pipeline as cot  # module attributes: tests patch cot.label_answer
from masksearch_rl.jsonl import BadLines, ErrorLog, ResumableJsonlWriter, atomic_path, iter_jsonl, write_jsonl

logger = logging.getLogger(__name__)

FINISH_TO_STATUS = {"answer": None, "search_limit": "max_turns", "length": "max_turns", "no_tag": "parse_error"}
# Turn.search_error values that envs.search_client sets for the policy's own bad queries (-> the record's format);
# with envs.rollout's LIMIT_NOTICES they are the policy's moves, and any other search error is a failed backend.
QUERY_ERRORS = {EMPTY_QUERY_ERROR: "empty_query", QUERY_TOO_LONG_ERROR: "query_too_long"}


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
    judge_fallback: bool = False  # a failed judge call: False = backend error (retried), True = exact match, marked
    concurrency: int = 32
    val_fraction: float = 0.02
    seed: int = 0
    curriculum: dict[str, Any] | None = None  # CurriculumConfig fields (mode staged | mixed); None: pool order
    engine: str = "asyncio"  # the teacher step: asyncio (one process) | ray (Ray Data, masksearch_rl.distributed)
    ray: dict[str, Any] = field(default_factory=dict)  # RayEngineConfig fields
    progress: bool = True

    def __post_init__(self) -> None:
        from masksearch_rl.distributed.engine import RayEngineConfig, check_engine

        if self.iteration < 1 or self.num_items < 1:
            raise ValueError("selfevolve iteration and num_items must be >= 1")
        check_engine(self.engine)
        RayEngineConfig.from_mapping(self.ray)  # fails now, not after the items are chosen
        if self.curriculum is not None:
            mode = self.curriculum_config().mode
            if mode not in ("staged", "mixed"):
                raise ValueError(f"selfevolve curriculum.mode must be staged or mixed, got {mode!r}")

    def curriculum_config(self) -> Any:
        from masksearch_rl.curriculum.sampler import CurriculumConfig

        return None if self.curriculum is None else CurriculumConfig.from_mapping(self.curriculum)

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
    """The first ``num_items`` pool items not in ``exclude``: in pool order, or in the curriculum's."""
    from masksearch_rl.cot.tasks import iter_tasks

    curriculum = config.curriculum_config()
    if curriculum is None:
        candidates = iter_tasks(config.items, bad)
    else:
        from masksearch_rl.curriculum.sampler import data_order

        pool = list(iter_tasks(config.items, bad))
        missing = [task.id for task in pool if task.num_masks is None]
        if missing:
            raise ValueError(f"a curriculum orders items by mask count, but {len(missing)} pool item(s) have none "
                             f"(QA records), e.g. id {missing[0]!r}")
        candidates = (pool[i] for i in data_order([task.num_masks for task in pool], curriculum).indices)
    chosen, seen = [], set()
    for task in candidates:
        if task.id not in exclude and task.id not in seen:
            seen.add(task.id)
            chosen.append(task)
            if len(chosen) >= config.num_items:
                break
    return chosen


def run_iteration(config: IterationConfig, tracker: Any = None) -> dict[str, Any]:
    """Run (or resume) one iteration: choose the fresh items, run the teacher step on the configured engine
    (``tracker`` receives the Ray engine's progress), merge, export SFT data, write ``stats.json``."""
    started = time.perf_counter()
    out_dir = config.iter_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = BadLines()
    base = [r for _, r in iter_jsonl(config.dataset, bad=bad, required=("id",))] if config.dataset else []
    exclude = {str(r["id"]) for r in base} | attempted_ids(Path(config.work_dir), config.iteration)
    tasks = fresh_tasks(config, exclude, bad)
    teacher_path = out_dir / "teacher.jsonl"
    if config.engine == "ray":
        from masksearch_rl.selfevolve.ray_job import run_teacher_ray

        teacher = run_teacher_ray(config, tasks, teacher_path, tracker)
    else:
        teacher = asyncio.run(_run_teacher(config, tasks, teacher_path))
    return _finish(config, base, tasks, teacher, bad, started)


async def teacher_record(task: Any, policy: Any, search: Any, judge: Any, config: IterationConfig) -> dict[str, Any]:
    """Roll the teacher out on ``task``, judge and format-check it; the record to write.

    Raises ``BackendFailure`` when the teacher endpoint, a search or the judge failed: such a trajectory says more
    about the outage than about the teacher, so it is retried rather than recorded.
    """
    from envs.rollout import run_episode
    from reward.format import check_format

    episode = await run_episode(policy, search, list(task.prompt), config.max_turns, config.max_new_tokens)
    if episode.finish == "policy_error":
        raise cot.BackendFailure(f"teacher: {'; '.join(episode.errors)}")
    failed_searches = [t.search_error for t in episode.turns
                       if t.search_error and t.search_error not in LIMIT_NOTICES and t.search_error not in QUERY_ERRORS]
    if failed_searches:
        raise cot.BackendFailure(f"search: {failed_searches[0]} ({len(failed_searches)} failed search(es))")
    status = FINISH_TO_STATUS[episode.finish]
    judged, reason = None, f"finish={episode.finish}"
    if status is None:
        score, judged = await cot.label_answer(judge, task, episode.answer or "", config.judge_fallback)
        status = "correct" if score >= config.min_judge_score else "wrong"
        reason = "" if status == "correct" else f"judged {score:.2f} < {config.min_judge_score}"
    result = check_format(episode.raw, num_masks=task.num_masks)
    fmt = result.reason.label
    bad_queries = [QUERY_ERRORS[t.search_error] for t in episode.turns if t.search_error in QUERY_ERRORS]
    if result.ok and bad_queries:
        fmt = bad_queries[0]
    keep = status == "correct" and fmt == "ok"
    if status == "correct" and not keep:
        reason = f"format: {fmt}"
    return {
        "id": task.id, "data_source": task.data_source, "kind": task.kind, "status": status, "reason": reason,
        "keep": keep, "format": fmt, "answer": episode.answer, "gold": [list(g) for g in task.golds],
        "num_masks": task.num_masks,
        "judge": judged, "num_searches": episode.search_count, "messages": episode.to_messages(config.info_role),
        "response": episode.raw, "log": episode.to_dict()["turns"], "latency_s": round(episode.latency_s, 3),
        "generator": f"teacher_iter{config.iteration}",
    }


@dataclass
class TeacherRun:
    """What the teacher step of one run did: its counts (``count_teacher_record`` plus failures and
    ``skipped_done``), the ids still failing, and the LLM clients' counters."""

    counts: Counter
    errors_pending: int
    teacher_llm: dict[str, Any]
    judge: dict[str, Any]
    engine: dict[str, Any] = field(default_factory=dict)


async def _run_teacher(config: IterationConfig, tasks: list, teacher_path: Path) -> TeacherRun:
    from tqdm import tqdm

    from envs.rollout import ChatPolicy, make_search_env
    from masksearch_rl.llm import LLMClient, LLMConfig
    from reward.judge import JUDGE_LLM_DEFAULTS, Judge

    teacher = LLMClient(LLMConfig.from_dict(config.teacher))
    judge = Judge(LLMClient(LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge})))
    policy = ChatPolicy(teacher, mode=config.chat_mode, info_role=config.info_role)
    search = make_search_env(config.search)
    run: Counter = Counter()
    writer = ResumableJsonlWriter(teacher_path)
    errors = ErrorLog(teacher_path.with_name(teacher_path.name + ".errors.jsonl"), writer.done)
    semaphore = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(tasks), desc=f"self-evolve iter {config.iteration}", disable=not config.progress)

    async def one(task) -> None:
        async with semaphore:
            await cot.build_and_write(task, lambda: teacher_record(task, policy, search, judge, config), writer, errors,
                                      run, count_teacher_record)

    try:
        with errors, writer:  # the writer closes (fsync) first, then the error log is pruned against it
            pending = [t for t in tasks if t.id not in writer.done]
            run["skipped_done"] = len(tasks) - len(pending)
            bar.update(run["skipped_done"])
            jobs = [asyncio.create_task(one(t)) for t in pending]
            for job in asyncio.as_completed(jobs):
                await job
                bar.update(1)
    finally:
        bar.close()
        await teacher.aclose()
        await judge.client.aclose()
    return TeacherRun(run, errors.pending, dict(teacher.stats), dict(judge.stats))


def _finish(config: IterationConfig, base: list[dict], tasks: list, teacher: TeacherRun, bad: BadLines,
            started: float) -> dict[str, Any]:
    """Merge the kept teacher records into D_T, export SFT data, write and return ``stats.json``."""
    from masksearch_rl.sft.export import export_sft

    out_dir = config.iter_dir
    teacher_path = out_dir / "teacher.jsonl"
    merged = merge_iteration(base, teacher_path, out_dir / "dataset.jsonl")
    if merged["total"]:
        sft = export_sft([out_dir / "dataset.jsonl"], out_dir / "sft", config.val_fraction, config.seed,
                         curriculum=config.curriculum_config())
    else:  # nothing kept yet (e.g. every item failed on a backend): still write the stats, there is no SFT data
        sft = {"train": 0, "val": 0}
    whole: Counter = Counter()
    if teacher_path.exists():
        for _, record in iter_jsonl(teacher_path, bad=BadLines()):
            count_teacher_record(whole, record)
    run = teacher.counts
    stats = {
        "iteration": config.iteration,
        "fresh_items": len(tasks),
        "teacher": _named(whole),  # the whole teacher.jsonl, recounted
        "run": {**_named(run), "backend_errors": run["backend_error"], "task_errors": run["task_error"],
                "skipped_done": run["skipped_done"]},  # this process only
        "errors_pending": teacher.errors_pending,
        "merge": merged,
        "sft": {k: sft[k] for k in ("train", "val")},
        "teacher_llm": teacher.teacher_llm,
        "judge": teacher.judge,
        "bad_input_lines": bad.summary(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if teacher.engine:
        stats["engine"] = teacher.engine
    if config.curriculum is not None:
        by_k = Counter(task.num_masks for task in tasks)
        stats["curriculum"] = {**config.curriculum,
                               "fresh_items_by_num_masks": {str(k): by_k[k] for k in sorted(by_k)},
                               "sft": sft.get("curriculum")}
    with atomic_path(out_dir / "stats.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2))
    return stats


def count_teacher_record(counts: Counter, record: dict[str, Any]) -> None:
    """Add one teacher record to ``counts`` (this run's records and the whole file's recount): ``cot build``'s
    counts plus ``format_rejected``, judged correct but not kept for its format."""
    cot.count_record(counts, record)
    counts["format_rejected"] += record.get("status") == "correct" and record.get("format", "ok") != "ok"


def _named(counts: Counter) -> dict[str, int]:
    return {"records": counts["records"], "correct": counts["correct"], "judged_wrong": counts["wrong"],
            "max_turns": counts["max_turns"], "parse_errors": counts["parse_error"], "kept": counts["kept"],
            "format_rejected": counts["format_rejected"], "judged_by_fallback": counts["judged_by_fallback"]}


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
