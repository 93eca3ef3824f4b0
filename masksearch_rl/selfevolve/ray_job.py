"""The teacher step of ``selfevolve iterate --engine ray`` on the Ray Data engine (:mod:`masksearch_rl.distributed`).

:class:`TeacherProcessor` wraps :func:`masksearch_rl.selfevolve.iteration.teacher_record` (the code the asyncio
engine runs) for a Ray Data worker; :func:`run_teacher_ray` runs it over an iteration's fresh items and exports
``iter_<i>/teacher.jsonl`` (+ ``.errors.jsonl``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.distributed.command import add_llm_counts, engine_summary, work_dir
from masksearch_rl.distributed.engine import (
    Failure,
    Output,
    RayEngineConfig,
    export_outputs,
    fingerprint_of_ids,
    merge_failures,
    output_ids,
    prepare_input,
    ray_session,
    run_job,
)


class TeacherProcessor:
    """``selfevolve iterate``'s teacher step: a fresh item -> the teacher's judged ``trajectory`` record, or a failure
    (teacher, search or judge outage: ``backend``; a bug: ``task_error``)."""

    def __init__(self, config: Any):  # masksearch_rl.selfevolve.iteration.IterationConfig
        from envs.rollout import ChatPolicy, make_search_env
        from masksearch_rl.llm import LLMClient, LLMConfig
        from reward.judge import JUDGE_LLM_DEFAULTS, Judge

        self.config = config
        self.counts: Counter = Counter()
        self.teacher = LLMClient(LLMConfig.from_dict(config.teacher))
        self.judge = Judge(LLMClient(LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge})))
        self.policy = ChatPolicy(self.teacher, mode=config.chat_mode, info_role=config.info_role)
        self.search = make_search_env(config.search)
        self._slots: asyncio.Semaphore | None = None

    async def process(self, items: list[tuple[str, dict[str, Any]]]) -> list[Output | Failure]:
        from masksearch_rl.cot import pipeline as cot
        from masksearch_rl.cot.tasks import task_from_json
        from masksearch_rl.selfevolve import iteration

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.concurrency)

        async def one(record: dict[str, Any]) -> Output | Failure:
            task = task_from_json(record)
            async with self._slots:
                outcome = await cot.attempt(task, lambda: iteration.teacher_record(
                    task, self.policy, self.search, self.judge, self.config))
            if isinstance(outcome, cot.TaskFailure):
                self.counts[cot.FAILURE_COUNTS[outcome.kind]] += 1
                return Failure(task.id, outcome.kind, outcome.error, outcome.traceback)
            iteration.count_teacher_record(self.counts, outcome)
            return Output(task.id, "trajectory", outcome)

        outcomes = await asyncio.gather(*(one(record) for _, record in items))
        add_llm_counts(self.counts, [self.teacher, self.judge.client])
        return list(outcomes)


def run_teacher_ray(config: Any, tasks: list, teacher_path: Path, tracker: Any = None) -> Any:
    """The teacher step of a self-evolve iteration on Ray; exports ``teacher.jsonl`` (+ ``.errors.jsonl``)."""
    from masksearch_rl.cot.tasks import task_to_json
    from masksearch_rl.llm import LLMConfig
    from masksearch_rl.selfevolve.iteration import TeacherRun
    from reward.judge import JUDGE_LLM_DEFAULTS

    engine = RayEngineConfig.from_mapping(config.ray)
    work = work_dir(engine, teacher_path, [teacher_path])
    started = time.perf_counter()
    fingerprint = {"iteration": config.iteration, "items": fingerprint_of_ids(t.id for t in tasks)}
    llm_configs = [LLMConfig.from_dict(config.teacher), LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge})]
    with ray_session(engine):
        manifest = prepare_input(work, fingerprint, lambda: ((t.id, task_to_json(t)) for t in tasks),
                                 engine.shard_rows)
        done_before = len(output_ids(work))
        result = run_job(f"selfevolve-iter{config.iteration}", work, TeacherProcessor, config, engine, llm_configs,
                         tracker)
        export = export_outputs(work, {"trajectory": teacher_path})
    pending = merge_failures(work, teacher_path.with_name(teacher_path.name + ".errors.jsonl"), export.ids)
    counts = Counter({k: v for k, v in result.counts.items() if ":" not in k})
    counts["skipped_done"] = done_before
    llm = {k: counts[k] for k in ("llm_calls", "prompt_tokens", "completion_tokens")}
    summary = engine_summary(result, engine, work, manifest, export.duplicates)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return TeacherRun(counts, pending, llm, {}, summary)
