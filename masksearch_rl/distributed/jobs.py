"""What each command does around the Ray engine: its input shards, its processor, its output files, its summary.

The files a command exports are the ones its asyncio engine writes (``ramp generate``: ``<out>``,
``<out>.dropped.jsonl``; ``cot build``: ``<out>``; self-evolve: ``iter_<i>/teacher.jsonl``; each with
``.errors.jsonl`` and a summary), rewritten from the job's parquet output after every run: one record per id, sorted
by id. Everything else lives in the work directory (``<out>.ray/`` unless ``ray.work_dir`` says otherwise). One
output is written by one engine: an output the asyncio engine started is refused here (its records would be
replaced by the export), so finish it with ``--engine asyncio`` or start a new one.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.distributed.engine import (
    JobResult,
    RayEngineConfig,
    WorkDir,
    export_outputs,
    file_fingerprint,
    fingerprint_of_ids,
    grouped,
    merge_failures,
    output_ids,
    prepare_input,
    ray_session,
    run_job,
)
from masksearch_rl.jsonl import BadLines, atomic_path


def _work_dir(engine: RayEngineConfig, out: str | Path, exports: list[Path]) -> WorkDir:
    work = WorkDir(Path(engine.work_dir or f"{out}.ray"))
    if not work.root.exists():
        started = [str(p) for p in exports if p.exists() and p.stat().st_size]
        if started:
            raise ValueError(f"{', '.join(started)} already hold(s) records written by the asyncio engine; the Ray "
                             "engine would replace them. Finish that output with --engine asyncio, or write to a new "
                             "--out.")
    work.root.mkdir(parents=True, exist_ok=True)
    return work


def _engine_summary(result: JobResult, engine: RayEngineConfig, work: WorkDir, manifest: dict[str, Any],
                    duplicates: int) -> dict[str, Any]:
    elapsed = max(result.seconds, 1e-9)
    tokens = result.counts.get("prompt_tokens", 0) + result.counts.get("completion_tokens", 0)
    return {"engine": "ray", "work_dir": str(work.root), "workers": engine.workers, "batch_size": engine.batch_size,
            "seconds": result.seconds, "items_per_s": round((result.done + result.failed) / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1), "error": result.error, "input_rows": manifest["rows"],
            "input_reused": manifest["reused"], "duplicate_output_ids": duplicates, "endpoint_budget": result.budget}


# ----------------------------------------------------------------------------------------------------- ramp
def generate_ramp_ray(config: Any, tracker: Any = None) -> dict[str, Any]:
    """``ramp generate --engine ray``: the summary has the asyncio engine's ``run``/``totals`` keys plus ``ray``."""
    from masksearch_rl.distributed.processors import RampProcessor
    from masksearch_rl.ramp.pipeline import _describe_config, iter_passages, summarize_outputs

    engine = RayEngineConfig.from_mapping(config.ray)
    out, dropped = Path(config.out), Path(config.dropped_path)
    work = _work_dir(engine, out, [out, dropped])
    bad = BadLines()

    def records():
        for passage, source in iter_passages(config, bad):
            yield passage.id, {"id": passage.id, "title": passage.title, "text": passage.text,
                               "entities": passage.entities, "source": source}

    fingerprint = {"corpus": file_fingerprint(config.corpus), "corpus_format": config.corpus_format,
                   "chunk_words": config.chunk_words, "limit": config.limit, "source": config.source}
    with ray_session(engine):
        manifest = prepare_input(work, fingerprint, records, engine.shard_rows, lambda: {"bad_lines": bad.summary()})
        done_before = len(output_ids(work))
        result = run_job("ramp", work, RampProcessor, config, engine, [config.llm] if config.llm else [], tracker)
        export = export_outputs(work, {"item": out, "dropped": dropped})
    pending = merge_failures(work, f"{out}.errors.jsonl", export.ids)
    counts = result.counts
    run = {
        "passages_read": manifest["rows"], "skipped_done": done_before,
        "duplicate_ids": manifest["duplicate_ids"], "items": counts.get("out:item", 0),
        "dropped": counts.get("out:dropped", 0), "llm_errors": counts.get("failed:backend", 0),
        "parse_rejects": counts.get("failed:parse_error", 0),
        "mask_histogram": grouped(counts, "mask_histogram"), "drop_reasons": grouped(counts, "drop_reasons"),
        "candidate_rejects": grouped(counts, "candidate_rejects"),
        "span_types_masked": grouped(counts, "span_types_masked"),
        "stopped": result.error, "bad_lines": manifest["details"].get("bad_lines", BadLines().summary()),
        "elapsed_s": result.seconds, "errors_pending": pending,
        "passages_per_s": round((result.done + result.failed) / result.seconds, 1) if result.seconds else None,
    }
    summary = {"run": run, "totals": summarize_outputs(out), "config": _describe_config(config),
               "ray": _engine_summary(result, engine, work, manifest, export.duplicates)}
    with atomic_path(config.summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------------------ cot
def run_cot_ray(config: Any, tracker: Any = None) -> dict[str, Any]:
    """``cot build --engine ray``: the summary has the asyncio engine's keys (``run``, ``file``, ...) plus ``ray``."""
    from masksearch_rl.cot.pipeline import FAILURE_COUNTS, STATUSES, file_counts
    from masksearch_rl.cot.tasks import iter_tasks, task_to_json
    from masksearch_rl.distributed.processors import CotProcessor

    engine = RayEngineConfig.from_mapping(config.ray)
    out = Path(config.out)
    work = _work_dir(engine, out, [out])
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
               "ray": _engine_summary(result, engine, work, manifest, export.duplicates)}
    with atomic_path(out.with_name(out.name + ".summary.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _judge_config(config: Any) -> Any:
    from masksearch_rl.llm import LLMConfig
    from reward.judge import JUDGE_LLM_DEFAULTS

    return LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.llm.get("default", {}), **config.llm.get("judge", {})})


# ------------------------------------------------------------------------------------------------ selfevolve
def run_teacher_ray(config: Any, tasks: list, teacher_path: Path, tracker: Any = None) -> Any:
    """The teacher step of a self-evolve iteration on Ray; exports ``teacher.jsonl`` (+ ``.errors.jsonl``)."""
    from masksearch_rl.cot.tasks import task_to_json
    from masksearch_rl.distributed.processors import TeacherProcessor
    from masksearch_rl.llm import LLMConfig
    from masksearch_rl.selfevolve.iteration import TeacherRun
    from reward.judge import JUDGE_LLM_DEFAULTS

    engine = RayEngineConfig.from_mapping(config.ray)
    work = _work_dir(engine, teacher_path, [teacher_path])
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
    summary = _engine_summary(result, engine, work, manifest, export.duplicates)
    summary["seconds_total"] = round(time.perf_counter() - started, 3)
    return TeacherRun(counts, pending, llm, {}, summary)
