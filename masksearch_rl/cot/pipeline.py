"""Multi-agent CoT trajectory construction (``masksearch-rl cot build``): tasks in, labelled trajectories out.

Reads top to bottom: open the output (ids already there are skipped) -> stream tasks -> per task, concurrently:
Planner -> rounds of (Rewriter -> search -> Observer) until the Observer answers or ``max_rounds`` is reached ->
judge the answer against the gold -> render the trajectory in our tag protocol -> append the record -> summary.

Files, for ``--out trajectories.jsonl``:
  ``trajectories.jsonl``               one record per finished task (see :func:`make_record`), append-only
  ``trajectories.jsonl.errors.jsonl``  tasks that failed (not recorded above, so the next run retries them), with the
                                       cause: ``kind: backend`` (an endpoint, the search or the judge failed after
                                       retries, or sent an unusable reply), ``kind: parse_error`` (a role's replies
                                       never parsed, its correction turns included) or ``kind: task_error`` (an
                                       unexpected exception, with its traceback). Pruned at the end of each run: ids
                                       written since are dropped, so it lists only what is still failing
  ``trajectories.jsonl.summary.json``  counts for this run and for the whole output file

Statuses: ``correct`` (judged right), ``wrong`` (judged wrong), ``max_turns`` (no answer within ``max_rounds``).
``keep`` marks what goes to SFT: correct trajectories, or every answered one with ``keep: answered``. Backend errors,
parse errors (a role that never gave usable JSON: a fact about that reply, not about the task, so a later run may
well get a usable one; unusable replies are never cached) and task errors (any other exception while building one
task) are counted, logged to the errors file and retried on the next run; one task's failure never stops the
others. A failed judge call is a backend error unless ``judge_fallback`` is
on: then the answer is graded by exact match, the record's ``judge`` says ``by: answer_match, fallback: true`` and the
summary counts ``judged_by_fallback`` (exact match marks a right paraphrase wrong, so it is off by default).

The trajectory: each round is one policy turn ``<think> plan / findings </think> <search> sub-query </search>``
followed by an ``<information>`` turn holding the merged results of the Rewriter's keyword queries; the last turn is
``<think> findings </think> <answer> … </answer>``. Chat messages for verl's MultiTurnSFTDataset come from
:func:`envs.rollout.transcript_messages` (information turns in role ``info_role``, loss-masked).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from envs.prompts import answer_block, information_block
from envs.rollout import Segment, transcript_messages
from envs.search_client import SearchSettings, results_text, shared_backend
from masksearch_rl.cot import agents
from masksearch_rl.jsonl import BadLines, ErrorLog, ResumableJsonlWriter, atomic_path, iter_jsonl
from masksearch_rl.llm import LLMClient, LLMConfig, LLMError
from masksearch_rl.retrieval.types import Hit, SearchBackend, SearchError

logger = logging.getLogger(__name__)

ROLES = ("planner", "rewriter", "observer", "judge")
STATUSES = ("correct", "wrong", "max_turns")  # of a record; a task that fails has none (FAILURE_COUNTS)
KEEP_MODES = ("correct", "answered")


@dataclass
class CotConfig:
    """One construction run. ``llm.default`` holds shared endpoint settings, ``llm.<role>`` per-role overrides
    (:class:`~masksearch_rl.llm.LLMConfig` fields; keys come from the env variable named in ``api_key_env``)."""

    input: str
    out: str
    llm: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # envs.search_client.SearchSettings fields
    max_rounds: int = 6
    min_queries: int = 3
    max_queries: int = 5
    max_docs: int = 5  # merged results shown per round
    fallback_after: int = 2  # failed rounds before the Observer may answer from its own knowledge
    parse_retries: int = 1
    keep: str = "correct"
    min_judge_score: float = 1.0
    judge_fallback: bool = False  # a failed judge call: False = backend error (retried), True = exact match, marked
    info_role: str = "tool"
    concurrency: int = 16  # tasks in flight
    limit: int | None = None
    max_backend_errors: int = 1000  # stop early (progress kept) after this many failed tasks (any kind)
    progress: bool = True
    engine: str = "asyncio"  # asyncio (this module) | ray (Ray Data: masksearch_rl.distributed)
    ray: dict[str, Any] = field(default_factory=dict)  # RayEngineConfig fields, for engine "ray"

    def __post_init__(self) -> None:
        from masksearch_rl.distributed.engine import RayEngineConfig, check_engine

        check_engine(self.engine)
        RayEngineConfig.from_mapping(self.ray)
        self.input, self.out = os.fspath(self.input), os.fspath(self.out)
        unknown = set(self.llm) - {"default", *ROLES}
        if unknown:
            raise ValueError(f"cot llm: unknown role(s) {sorted(unknown)}; known: default, {', '.join(ROLES)}")
        if self.keep not in KEEP_MODES:
            raise ValueError(f"cot keep must be one of {KEEP_MODES}, got {self.keep!r}")
        for name in ("max_rounds", "min_queries", "max_queries", "max_docs", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"cot {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queries < self.min_queries:
            raise ValueError(f"cot max_queries ({self.max_queries}) < min_queries ({self.min_queries})")
        if self.parse_retries < 0 or self.fallback_after < 0:
            raise ValueError("cot parse_retries and fallback_after must be >= 0")
        self.search_settings = SearchSettings.from_mapping(self.search)  # validates now, not mid-run

    def role_config(self, role: str) -> LLMConfig:
        return LLMConfig.from_dict({**self.llm.get("default", {}), **self.llm.get(role, {})})


class BackendFailure(RuntimeError):
    """An LLM endpoint or the search backend failed after its retries: the task is retried on the next run."""


class UnusableReplies(BackendFailure):
    """A role's replies never parsed (correction turns included): the task is retried on the next run."""


@dataclass
class TaskFailure:
    """Why a task gave no record (the next run retries it): ``kind`` is ``backend``, ``parse_error`` or
    ``task_error`` (an unexpected exception, with its ``traceback``)."""

    kind: str
    error: str
    traceback: str | None = None


FAILURE_COUNTS = {"backend": "backend_error", "parse_error": "parse_error", "task_error": "task_error"}


# ---------------------------------------------------------------------------------------------------- search
async def merged_search(
    backend: SearchBackend, queries: list[str], settings: SearchSettings, max_docs: int
) -> tuple[str, list[Hit]]:
    """Search every query, merge the result lists round-robin (best of each first), drop repeats, cap at
    ``max_docs``; returns the formatted text (cut to ``settings.max_info_tokens`` words) and the hits."""
    try:
        results = await asyncio.wait_for(backend.search(list(queries), settings.topk), settings.search_timeout_s)
    except asyncio.TimeoutError as err:
        raise BackendFailure(f"search: {backend.name} gave no answer within {settings.search_timeout_s:g} s") from err
    except SearchError as err:
        raise BackendFailure(f"search: {err}") from err
    merged: list[Hit] = []
    seen: set[str] = set()
    for rank in range(max((len(r) for r in results), default=0)):
        for hits in results:
            if rank < len(hits) and hits[rank].id not in seen:
                seen.add(hits[rank].id)
                merged.append(hits[rank])
    merged = merged[:max_docs]
    return results_text(merged, settings.max_info_tokens), merged


# ----------------------------------------------------------------------------------------------------- judge
async def label_answer(
    judge: Any, task: Any, answer: str, use_fallback: bool = False
) -> tuple[float, dict[str, Any]]:
    """Score ``answer`` for ``task`` with the LLM judge (mean of per-blank verdicts).

    A failed judge call (endpoint down, unparseable verdict) raises :class:`BackendFailure`, so the task is retried
    later rather than labelled by a weaker grader for good. With ``use_fallback`` it is graded by exact match per
    blank instead and the returned record says so (``fallback: True``). Returns the score and what to record.
    """
    from reward.answer_match import score_answer, score_spans, split_spans
    from reward.judge import JudgeItem

    spans = tuple(split_spans(answer)) if task.kind == "ramp" else None
    verdict = await judge.grade(JudgeItem(golds=task.golds, answer=answer, spans=spans, question=task.text))
    if verdict.score is not None:
        return verdict.score, {"by": "judge", "fallback": False, "score": verdict.score,
                               "correct": list(verdict.correct)}
    if not use_fallback:
        raise BackendFailure(f"judge: {verdict.error}")
    if task.kind == "ramp":
        score = score_spans(answer, [list(g) for g in task.golds], masked_passage=task.masked_passage).mean.em
    else:
        score = score_answer(answer, list(task.golds[0])).em
    return score, {"by": "answer_match", "fallback": True, "score": score, "judge_error": verdict.error}


# ------------------------------------------------------------------------------------------------ the agents
@dataclass
class Roles:
    planner: LLMClient
    rewriter: LLMClient
    observer: LLMClient
    judge: Any  # reward.judge.Judge

    @classmethod
    def from_config(cls, config: CotConfig) -> Roles:
        from reward.judge import JUDGE_LLM_DEFAULTS, Judge

        clients: dict[str, LLMClient] = {}  # roles with identical settings share a client (and its limit)

        def client(cfg: LLMConfig) -> LLMClient:
            key = json.dumps(asdict(cfg), sort_keys=True, default=str)
            if key not in clients:
                clients[key] = LLMClient(cfg)
            return clients[key]

        judge_cfg = LLMConfig.from_dict(
            {**JUDGE_LLM_DEFAULTS, **config.llm.get("default", {}), **config.llm.get("judge", {})}
        )
        return cls(client(config.role_config("planner")), client(config.role_config("rewriter")),
                   client(config.role_config("observer")), Judge(client(judge_cfg)))

    def clients(self) -> dict[str, LLMClient]:
        return {"planner": self.planner, "rewriter": self.rewriter, "observer": self.observer,
                "judge": self.judge.client}

    async def aclose(self) -> None:
        for c in {id(c): c for c in self.clients().values()}.values():
            await c.aclose()


async def construct(task: Any, roles: Roles, backend: SearchBackend, config: CotConfig) -> dict[str, Any]:
    """Run the agents on one task and return its record; raises :class:`BackendFailure` on endpoint errors."""
    log: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        return await _construct(task, roles, backend, config, log, started)
    except LLMError as err:
        raise BackendFailure(f"llm: {err}") from err
    except agents.ParseError as err:
        raise UnusableReplies(str(err)) from err


async def _construct(task, roles, backend, config, log, started) -> dict[str, Any]:
    settings = config.search_settings
    segments: list[Segment] = []
    plan = await agents.ask_role(roles.planner, "planner", agents.planner_messages(task.text), agents.parse_plan,
                                 config.parse_retries, log)
    pending = list(plan.sub_queries)
    think = plan.plan
    findings: list[str] = []
    failures = 0
    for round_number in range(1, config.max_rounds + 1):
        sub_query = pending.pop(0) if pending else task.text
        queries = await agents.ask_role(
            roles.rewriter, "rewriter", agents.rewriter_messages(task.text, sub_query, config.min_queries),
            lambda text: agents.parse_queries(text, config.min_queries, config.max_queries),
            config.parse_retries, log,
        )
        observation, hits = await merged_search(backend, queries, settings, config.max_docs)
        log.append({"role": "search", "queries": queries, "hit_ids": [h.id for h in hits]})
        segments.append(Segment("policy", f"<think> {think} </think>\n<search> {sub_query} </search>"))
        segments.append(Segment("info", information_block(observation)))
        obs = await agents.ask_role(
            roles.observer, "observer",
            agents.observer_messages(
                task.text, plan.plan, findings, sub_query, observation, round_number, task.num_masks,
                own_knowledge=failures >= config.fallback_after, force_answer=round_number == config.max_rounds,
            ),
            agents.parse_observation, config.parse_retries, log,
        )
        failures += not obs.found
        findings.append(obs.summary or obs.think)
        think = " ".join(part for part in (obs.summary, obs.think) if part)
        if obs.action == "answer":
            segments.append(Segment("policy", f"<think> {think} </think>\n{answer_block(obs.answer)}"))
            score, judged = await label_answer(roles.judge, task, obs.answer, config.judge_fallback)
            status = "correct" if score >= config.min_judge_score else "wrong"
            reason = "" if status == "correct" else f"judged {score:.2f} < {config.min_judge_score}"
            return make_record(task, status, reason, segments, obs.answer, judged, log, started, config)
        if obs.action == "search":
            pending.insert(0, obs.sub_query)
        else:  # replan with what was found
            plan = await agents.ask_role(
                roles.planner, "planner", agents.planner_messages(task.text, "\n".join(f"- {f}" for f in findings)),
                agents.parse_plan, config.parse_retries, log,
            )
            pending = list(plan.sub_queries)
            think = f"{think} New plan: {plan.plan}"
    return make_record(task, "max_turns", f"no answer within {config.max_rounds} rounds", segments, None, None, log,
                       started, config)


def make_record(task, status, reason, segments, answer, judged, log, started, config) -> dict[str, Any]:
    """The output record: ids, labels, the SFT chat ``messages``, the tag-format ``response`` and the agent log."""
    keep = status == "correct" or (config.keep == "answered" and answer is not None)
    return {
        "id": task.id,
        "data_source": task.data_source,
        "kind": task.kind,
        "status": status,
        "reason": reason,
        "keep": keep,
        "answer": answer,
        "gold": [list(g) for g in task.golds],
        "num_masks": task.num_masks,
        "judge": judged,
        "num_searches": sum(seg.kind == "info" for seg in segments),
        "messages": [*map(dict, task.prompt), *transcript_messages(segments, config.info_role)],
        "response": "".join(seg.text for seg in segments),
        "log": log,
        "latency_s": round(time.perf_counter() - started, 3),
        "generator": "agents",
    }


# ----------------------------------------------------------------------------------------------------- the job
def run_cot(config: CotConfig, tracker: Any = None) -> dict[str, Any]:
    """Run (or resume) a construction job; returns the summary (also written next to the output).
    ``tracker`` receives the Ray engine's progress (the asyncio engine shows a progress bar)."""
    if config.engine == "ray":
        from masksearch_rl.cot.ray_job import run_cot_ray

        return run_cot_ray(config, tracker)
    return asyncio.run(_run(config))


async def build_and_write(
    task: Any, build: Callable[[], Awaitable[dict[str, Any]]], writer: ResumableJsonlWriter, errors: ErrorLog,
    counts: Counter, count: Callable[[Counter, dict[str, Any]], None] | None = None,
) -> bool:
    """Build ``task``'s record with ``build()`` and append it to ``writer``, counting a new one with ``count``
    (default :func:`count_record`).

    A failure (see :func:`attempt`) is counted under :data:`FAILURE_COUNTS` and logged to ``errors`` instead of
    raised, so one task never ends the run and the next run retries it. Returns False when the task failed. Shared
    by ``cot build`` and the self-evolve iteration.
    """
    outcome = await attempt(task, build)
    if isinstance(outcome, TaskFailure):
        counts[FAILURE_COUNTS[outcome.kind]] += 1
        errors.add(task.id, outcome.kind, outcome.error, outcome.traceback)
        return False
    if writer.write(outcome):
        (count or count_record)(counts, outcome)
    return True


async def attempt(task: Any, build: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any] | TaskFailure:
    """``build()``'s record, or the :class:`TaskFailure` that says why there is none: ``parse_error``
    (:class:`UnusableReplies`), ``backend`` (any other :class:`BackendFailure`) or ``task_error`` (any other
    exception: one task's bug must not end the run). Both engines (this module's and Ray Data's) call it."""
    try:
        return await build()
    except UnusableReplies as err:
        return TaskFailure("parse_error", str(err))
    except BackendFailure as err:
        return TaskFailure("backend", str(err))
    except Exception as err:
        logger.exception("task %s failed", task.id)
        return TaskFailure("task_error", f"{type(err).__name__}: {err}", traceback.format_exc())


async def _run(config: CotConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from masksearch_rl.cot.tasks import iter_tasks

    out = Path(config.out)
    bad = BadLines()
    run_counts: Counter = Counter()
    roles = Roles.from_config(config)
    backend = shared_backend(config.search_settings.backend)
    writer = ResumableJsonlWriter(out, key="id")
    errors_path = out.with_name(out.name + ".errors.jsonl")
    errors = ErrorLog(errors_path, writer.done)
    started = time.perf_counter()
    bar = tqdm(desc="cot", unit="task", disable=not config.progress, mininterval=1.0)
    stop = asyncio.Event()
    try:
        with errors, writer:  # the writer closes (fsync) first, then the error log is pruned against it
            semaphore = asyncio.Semaphore(config.concurrency)

            async def one(task) -> None:
                try:
                    if stop.is_set():
                        return
                    build = lambda: construct(task, roles, backend, config)
                    if not await build_and_write(task, build, writer, errors, run_counts):
                        failures = sum(run_counts[key] for key in FAILURE_COUNTS.values())
                        if failures >= config.max_backend_errors:
                            logger.error("stopping: %d failed tasks (max_backend_errors)", failures)
                            stop.set()
                finally:
                    semaphore.release()
                    bar.update(1)

            pending: set[asyncio.Task] = set()
            for number, task in enumerate(iter_tasks(config.input, bad)):
                if config.limit is not None and number >= config.limit:
                    break
                if task.id in writer.done:
                    run_counts["skipped_done"] += 1
                    continue
                await semaphore.acquire()
                if stop.is_set():
                    semaphore.release()
                    break
                job = asyncio.create_task(one(task))
                pending.add(job)
                job.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
    finally:
        bar.close()
        await roles.aclose()
    summary = {
        "run": {"processed": sum(run_counts[s] for s in STATUSES) + sum(run_counts[c] for c in FAILURE_COUNTS.values()),
                "kept": run_counts["kept"], "correct": run_counts["correct"], "judged_wrong": run_counts["wrong"],
                "max_turns": run_counts["max_turns"], "parse_errors": run_counts["parse_error"],
                "backend_errors": run_counts["backend_error"], "task_errors": run_counts["task_error"],
                "judged_by_fallback": run_counts["judged_by_fallback"], "skipped_done": run_counts["skipped_done"],
                "seconds": round(time.perf_counter() - started, 2)},
        "file": file_counts(out),
        "errors_pending": errors.pending,
        "bad_input_lines": bad.summary(),
        "llm": {role: dict(client.stats) for role, client in roles.clients().items()},
        "judge": dict(roles.judge.stats),
        "out": str(out),
        "errors_file": str(errors_path),
    }
    with atomic_path(out.with_name(out.name + ".summary.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


RECORD_COLUMNS = ("id", "kind", "prompt", "searches", "information", "answer", "gold", "status", "reason", "judge",
                  "keep", "num_searches")


def record_table(path: str | Path, limit: int = 20) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of a W&B table of the first ``limit`` trajectory records in ``path`` (``cot build`` and
    self-evolve write the same record): the question, the searches, what came back, the answer and its labels."""
    from masksearch_rl.eval.trajectories import parse_response

    rows = []
    for _, record in iter_jsonl(path, bad=BadLines()):
        if len(rows) >= limit:
            break
        parsed = parse_response(str(record.get("response", "")))
        users = [m.get("content") for m in record.get("messages", []) if m.get("role") == "user"]
        rows.append([record.get("id"), record.get("kind"), users[0] if users else None, parsed["searches"],
                     parsed["information"], record.get("answer"), record.get("gold"), record.get("status"),
                     record.get("reason"), record.get("judge"), record.get("keep"), record.get("num_searches")])
    return list(RECORD_COLUMNS), rows


def file_counts(path: str | Path) -> dict[str, int]:
    """Counts over a whole output file, by status, how many records are kept and how many were graded by the
    exact-match fallback (recounted, never carried: correct after any number of resumes)."""
    counts: Counter = Counter()
    if Path(path).exists():
        for _, record in iter_jsonl(path, bad=BadLines()):
            count_record(counts, record)
    return dict(counts)


def count_record(counts: Counter, record: dict[str, Any]) -> None:
    """Add one trajectory record to ``counts``: ``records``, one per ``status``, ``kept``, ``judged_by_fallback``.
    The one definition for a run's counts and a whole file's recount."""
    counts["records"] += 1
    counts[str(record.get("status"))] += 1
    counts["kept"] += bool(record.get("keep"))
    counts["judged_by_fallback"] += bool((record.get("judge") or {}).get("fallback"))
