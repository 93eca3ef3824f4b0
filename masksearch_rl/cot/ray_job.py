"""``cot build --engine ray``: the CoT job on the Ray Data engine (:mod:`masksearch_rl.distributed`).

:class:`CotProcessor` wraps :func:`masksearch_rl.cot.pipeline.construct` and ``attempt`` (the code the asyncio
engine runs) for a Ray Data worker; :func:`run_cot_ray` is what the command does around the engine: its input
shards, its output files (``<out>``, ``<out>.errors.jsonl``, the summary), its summary.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.distributed.command import add_llm_counts, engine_summary, work_dir
from masksearch_rl.distributed.engine import (
    Failure,
    Output,
    RayEngineConfig,
    export_outputs,
    file_fingerprint,
    merge_failures,
    output_ids,
    prepare_input,
    ray_session,
    run_job,
)
from masksearch_rl.jsonl import BadLines, atomic_path


class CotProcessor:
    """``cot build``: a task -> its ``trajectory`` record, or a failure (``backend``, ``parse_error``,
    ``task_error``) exactly as :func:`masksearch_rl.cot.pipeline.attempt` classifies it."""

    def __init__(self, config: Any):  # masksearch_rl.cot.pipeline.CotConfig
        from envs.search_client import shared_backend
        from masksearch_rl.cot.pipeline import Roles

        self.config = config
        self.counts: Counter = Counter()
        self.roles = Roles.from_config(config)
        self.backend = shared_backend(config.search_settings.backend)
        self._slots: asyncio.Semaphore | None = None

    async def process(self, items: list[tuple[str, dict[str, Any]]]) -> list[Output | Failure]:
        from masksearch_rl.cot import pipeline as cot
        from masksearch_rl.cot.tasks import task_from_json

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.concurrency)  # tasks in flight in this worker

        async def one(record: dict[str, Any]) -> Output | Failure:
            task = task_from_json(record)
            async with self._slots:
                outcome = await cot.attempt(task, lambda: cot.construct(task, self.roles, self.backend, self.config))
            if isinstance(outcome, cot.TaskFailure):
                self.counts[cot.FAILURE_COUNTS[outcome.kind]] += 1
                return Failure(task.id, outcome.kind, outcome.error, outcome.traceback)
            cot.count_record(self.counts, outcome)
            return Output(task.id, "trajectory", outcome)

        outcomes = await asyncio.gather(*(one(record) for _, record in items))
        add_llm_counts(self.counts, list(self.roles.clients().values()))
        self.counts["judge_failures"] = self.roles.judge.stats["failures"]
        return list(outcomes)


def run_cot_ray(config: Any, tracker: Any = None) -> dict[str, Any]:
    """``cot build --engine ray``: the summary has the asyncio engine's keys (``run``, ``file``, ...) plus ``ray``."""
    from masksearch_rl.cot.pipeline import FAILURE_COUNTS, STATUSES, file_counts
    from masksearch_rl.cot.tasks import iter_tasks, task_to_json

    engine = RayEngineConfig.from_mapping(config.ray)
    out = Path(config.out)
    work = work_dir(engine, out, [out])
    bad = BadLines()

    def records():
        for number, task in enumerate(iter_tasks(config.input, bad)):
            if config.limit is not None and number >= config.limit:
                break
            yield task.id, task_to_json(task)

    fingerprint = {"input": file_fingerprint(config.input), "limit": config.limit}
    with ray_session(engine):
        manifest = prepare_input(work, fingerprint, records, engine.shard_rows, lambda: {"bad_lines": bad.summary()})
        done_before = len(output_ids(work))
        llm_configs = [config.role_config(role) for role in ("planner", "rewriter", "observer")]
        result = run_job("cot", work, CotProcessor, config, engine, llm_configs + [_judge_config(config)], tracker)
        export = export_outputs(work, {"trajectory": out})
    errors_path = out.with_name(out.name + ".errors.jsonl")
    pending = merge_failures(work, errors_path, export.ids)
    counts = Counter(result.counts)
    run = {"processed": sum(counts[s] for s in STATUSES) + sum(counts[c] for c in FAILURE_COUNTS.values()),
           "kept": counts["kept"], "correct": counts["correct"], "judged_wrong": counts["wrong"],
           "max_turns": counts["max_turns"], "parse_errors": counts["parse_error"],
           "backend_errors": counts["backend_error"], "task_errors": counts["task_error"],
           "judged_by_fallback": counts["judged_by_fallback"], "skipped_done": done_before,
           "seconds": result.seconds, "stopped": result.error}
    summary = {"run": run, "file": file_counts(out), "errors_pending": pending,
               "bad_input_lines": manifest["details"].get("bad_lines", BadLines().summary()),
               "llm": {k: counts[k] for k in ("llm_calls", "prompt_tokens", "completion_tokens")},
               "judge": {"failures": counts["judge_failures"]}, "out": str(out), "errors_file": str(errors_path),
               "ray": engine_summary(result, engine, work, manifest, export.duplicates)}
    with atomic_path(out.with_name(out.name + ".summary.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _judge_config(config: Any) -> Any:
    from masksearch_rl.llm import LLMConfig
    from reward.judge import JUDGE_LLM_DEFAULTS

    return LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.llm.get("default", {}), **config.llm.get("judge", {})})
