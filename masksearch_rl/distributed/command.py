"""What every command's Ray job shares, whatever its items are: the work directory (and the one-engine-per-output
rule), the ``ray`` section of its summary, and the helpers its processor uses to count LLM calls and to turn an
item's exception into a failure.

Each command's own job and processor live with the command (``masksearch_rl.ramp.ray_job``,
``masksearch_rl.cot.ray_job``, ``masksearch_rl.selfevolve.ray_job``): this package knows nothing about them.

The files a command exports are the ones its asyncio engine writes, rewritten from the job's parquet output after
every run: one record per id, sorted by id. Everything else lives in the work directory (``<out>.ray/`` unless
``ray.work_dir`` says otherwise). One output is written by one engine: an output the asyncio engine started is
refused here (its records would be replaced by the export), so finish it with ``--engine asyncio`` or start a new
one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.distributed.engine import Failure, JobResult, RayEngineConfig, WorkDir


def work_dir(engine: RayEngineConfig, out: str | Path, exports: list[Path]) -> WorkDir:
    """The job's work directory, created; refused when one of ``exports`` was started by the asyncio engine."""
    work = WorkDir(Path(engine.work_dir or f"{out}.ray"))
    if not work.root.exists():
        started = [str(p) for p in exports if p.exists() and p.stat().st_size]
        if started:
            raise ValueError(f"{', '.join(started)} already hold(s) records written by the asyncio engine; the Ray "
                             "engine would replace them. Finish that output with --engine asyncio, or write to a new "
                             "--out.")
    work.root.mkdir(parents=True, exist_ok=True)
    return work


def engine_summary(result: JobResult, engine: RayEngineConfig, work: WorkDir, manifest: dict[str, Any],
                   duplicates: int) -> dict[str, Any]:
    """The ``ray`` section of a command's summary."""
    elapsed = max(result.seconds, 1e-9)
    tokens = result.counts.get("prompt_tokens", 0) + result.counts.get("completion_tokens", 0)
    return {"engine": "ray", "work_dir": str(work.root), "workers": engine.workers, "batch_size": engine.batch_size,
            "seconds": result.seconds, "items_per_s": round((result.done + result.failed) / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1), "error": result.error, "input_rows": manifest["rows"],
            "input_reused": manifest["reused"], "duplicate_output_ids": duplicates, "endpoint_budget": result.budget}


# --------------------------------------------------------------------------------------- for processors
def add_llm_counts(counts: Counter, clients: list[Any]) -> None:
    """Running token and call totals of the worker's LLM clients (each client counted once)."""
    unique = {id(c): c for c in clients}.values()
    for name in ("calls", "prompt_tokens", "completion_tokens"):
        counts[name if name != "calls" else "llm_calls"] = sum(c.stats[name] for c in unique)


async def guarded(item_id: str, work: Any) -> Any:
    """``await work``, or a ``task_error`` failure when it raises: one item's bug must not end the job."""
    try:
        return await work
    except Exception as err:
        return task_error(item_id, err)


def task_error(item_id: str, err: Exception) -> Failure:
    import traceback

    return Failure(item_id, "task_error", f"{type(err).__name__}: {err}",
                   "".join(traceback.format_exception(type(err), err, err.__traceback__)))
