"""The Ray Data engine: input shards -> ``map_batches`` over worker actors -> output shards, resumable.

A job, top to bottom (:func:`run_job`):

1. **Ray** (:func:`ray_session`): the cluster at ``$RAY_ADDRESS`` when set (``ray job submit`` sets it), else a local
   Ray started for this command: object store capped, no dashboard, enough logical CPUs for the workers plus Ray
   Data's checkpoint filter and its read/write tasks (at least 4: with fewer, a resumed job waits forever for a CPU
   for the filter, even on a 2-core machine).
2. **Input** (:func:`prepare_input`): the command's items as parquet shards ``input/part-*.parquet`` with columns
   ``id`` (unique string) and ``record`` (the item as JSON), written once (atomically) and reused while the source
   is unchanged. Parquet, not JSON lines: Ray Data's checkpoint filter needs Arrow blocks.
3. **Map**: ``map_batches`` with :class:`ItemWorker` actors, each wrapping one :class:`Processor` (the command's own
   per-item code, e.g. :class:`masksearch_rl.ramp.ray_job.RampProcessor`). A processor returns an :class:`Output` or a
   :class:`Failure` per item. Failures are not emitted: they go to ``failures/<worker>.jsonl``, so they are not
   checkpointed and the next run retries them. Every LLM request of every worker passes the endpoint budget
   (:mod:`masksearch_rl.distributed.budget`).
4. **Write** with Ray Data's checkpointing (``CheckpointConfig(id_column="id")``, kept after success):
   ``output/*.parquet`` (``id``, ``kind``, ``record``) and ``checkpoint/``. Ray writes a pending checkpoint before
   each data file and commits it after, and a rerun first deletes data files whose checkpoint never committed, then
   skips the ids already committed: a killed driver or a failed job loses no finished item and redoes none.
5. **Export** (:func:`export_outputs`): the records of committed output files only, one per id (the first file, in
   name order, wins), sorted by id, into the command's usual JSONL files, so the output does not depend on
   scheduling and nothing downstream changes. Memory-bounded: ids and sizes first, then records range by range.
6. **Failures** (:func:`merge_failures`): the side files, less the ids that succeeded since, into the command's
   ``<out>.errors.jsonl``.

Progress (items, failures, items/s, tokens/s, and the endpoint budget's use) goes to stderr and, when the command
tracks a run, to W&B every ``progress_interval_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from masksearch_rl.configs import from_mapping
from masksearch_rl.jsonl import atomic_path

logger = logging.getLogger(__name__)

ENGINES = ("asyncio", "ray")
_SCHEMA_COLUMNS = ("id", "kind", "record")


@dataclass
class RayEngineConfig:
    """Settings of ``--engine ray`` (``ray.*`` in a command's config)."""

    workers: int = 2  # worker actors (each runs one processor; LLM work is concurrent inside each)
    cpus_per_worker: float = 1.0
    batch_size: int = 64  # items per map batch
    tasks_per_worker: int = 4  # batches a worker has in flight at once
    rows_per_file: int = 1024  # output rows per file: a crash redoes at most about this many finished items
    shard_rows: int = 10_000  # input rows per parquet shard
    work_dir: str | None = None  # default: <out>.ray next to the output; on a cluster: a shared file system
    num_cpus: int | None = None  # local Ray's logical CPUs (default: workers + 3, at least 4)
    object_store_mb: int = 1024  # local Ray's object store
    max_failures: int | None = None  # stop the job (work kept) after this many failed items in one run
    progress_interval_s: float = 10.0
    progress_bars: bool = False  # Ray Data's own progress bars

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "tasks_per_worker", "rows_per_file", "shard_rows", "object_store_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"ray.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0 or self.progress_interval_s <= 0:
            raise ValueError("ray.cpus_per_worker and ray.progress_interval_s must be > 0")
        if self.num_cpus is not None and self.num_cpus < self.local_cpus_needed():
            raise ValueError(f"ray.num_cpus={self.num_cpus} is too few: {self.workers} worker(s) need "
                             f"{self.local_cpus_needed()} (the checkpoint filter and the read/write tasks need theirs)")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> RayEngineConfig:
        return from_mapping(cls, values, "ray option", prefix="ray")

    def local_cpus_needed(self) -> int:
        return max(4, math.ceil(self.workers * self.cpus_per_worker) + 3)


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


# ----------------------------------------------------------------------------------------------------------- Ray
@contextmanager
def ray_session(config: RayEngineConfig) -> Iterator[None]:
    """Ray for one command: an existing ``ray.init`` of this process is used as it is; else the cluster at
    ``$RAY_ADDRESS``; else a local Ray, stopped again when the command ends."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=config.num_cpus or config.local_cpus_needed(),
                 object_store_memory=config.object_store_mb * 1024 * 1024, include_dashboard=False,
                 log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------- work dir
@dataclass(frozen=True)
class WorkDir:
    """One job's files: ``input/`` shards, ``output/`` and ``checkpoint/`` (Ray Data's), ``failures/`` side files."""

    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def failures(self) -> Path:
        return self.root / "failures"


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies an input file's content cheaply: its path, size and modification time."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def prepare_input(
    work: WorkDir, fingerprint: dict[str, Any], records: Callable[[], Iterable[tuple[str, dict]]], shard_rows: int,
    details: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``records()`` (``(id, record)`` pairs) as input shards, unless the shards there came from the same
    ``fingerprint``; returns the manifest (``rows``, ``duplicate_ids``: repeats of an id, dropped, ``details()``).

    The shards are written to a temporary directory and renamed into place, so a kill leaves the old input or the
    new one. Ids are what checkpoints and exports key on, so only the first record of an id is kept.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest_path = work.input / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("fingerprint") == fingerprint:
            return {**manifest, "reused": True}
    schema = pa.schema([("id", pa.string()), ("record", pa.string())])
    rows = duplicates = shards = 0
    seen: set[str] = set()
    with atomic_path(work.input) as tmp:
        tmp.mkdir(parents=True)
        ids: list[str] = []
        blobs: list[str] = []

        def flush() -> None:
            nonlocal shards
            if ids:
                pq.write_table(pa.table({"id": ids, "record": blobs}, schema=schema),
                               tmp / f"part-{shards:05d}.parquet")
                shards += 1
                ids.clear()
                blobs.clear()

        for item_id, record in records():
            item_id = str(item_id)
            if item_id in seen:
                duplicates += 1
                continue
            seen.add(item_id)
            ids.append(item_id)
            blobs.append(json.dumps(record, ensure_ascii=False))
            rows += 1
            if len(ids) >= shard_rows:
                flush()
        flush()
        manifest = {"fingerprint": fingerprint, "rows": rows, "duplicate_ids": duplicates, "shards": shards,
                    "details": details() if details else {}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {**manifest, "reused": False}


def fingerprint_of_ids(ids: Iterable[str]) -> str:
    return hashlib.sha256("\x1f".join(ids).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- workers
@dataclass
class Output:
    """One item's result: ``kind`` says which export file it belongs to (e.g. ``item`` / ``dropped``)."""

    id: str
    kind: str
    record: dict[str, Any]


@dataclass
class Failure:
    """One item that gave no result this run (retried by the next): ``kind`` is the cause's class."""

    id: str
    kind: str
    error: str
    traceback: str | None = None


class Processor(Protocol):
    """A command's per-item code, built once per worker from its config: ``process`` returns one outcome per item
    (``(id, record)`` pairs in, in any order out); ``counts`` holds running totals (records by status, tokens ...)
    that the worker reports as they grow."""

    counts: Counter

    async def process(self, items: list[tuple[str, dict[str, Any]]]) -> list[Output | Failure]: ...


class JobStopped(RuntimeError):
    """Too many items failed in this run (``max_failures``): the job stops, its finished work kept."""


class ItemWorker:
    """The Ray Data UDF: one per worker actor. Runs the processor on each batch (its event loop lives in the actor,
    so connection pools persist), logs failures to its own side file, reports counts, returns the outputs."""

    def __init__(self, processor_cls: type, processor_config: Any, progress: Any, budget: Any, failures_dir: str):
        from masksearch_rl.llm import set_endpoint_gate

        if budget is not None:
            from masksearch_rl.distributed.budget import BudgetGate

            set_endpoint_gate(BudgetGate(budget))
        import ray

        self.processor: Processor = processor_cls(processor_config)
        self.progress = progress
        progress.register.remote(ray.get_runtime_context().current_actor)  # so the job can end it (run_job)
        self.failures_path = Path(failures_dir) / f"{uuid.uuid4().hex}.jsonl"
        self.reported: Counter = Counter()

    async def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        ids = [str(i) for i in batch.column("id").to_pylist()]
        items = list(zip(ids, (json.loads(r) for r in batch.column("record").to_pylist())))
        outcomes = await self.processor.process(items)
        if sorted(o.id for o in outcomes) != sorted(ids):
            raise RuntimeError(f"{type(self.processor).__name__} returned outcomes for other ids than it was given")
        outputs = [o for o in outcomes if isinstance(o, Output)]
        failures = [o for o in outcomes if isinstance(o, Failure)]
        if failures:
            self._log_failures(failures)
        delta = Counter(f"out:{o.kind}" for o in outputs)
        delta.update(f"failed:{f.kind}" for f in failures)
        counts = self.processor.counts
        delta.update({key: value - self.reported[key] for key, value in counts.items() if value != self.reported[key]})
        self.reported = Counter(counts)
        if await self.progress.add.remote(dict(delta)):
            raise JobStopped("stopping: too many failed items in this run (ray.max_failures); finished work is "
                             "kept, run again to continue")
        table = {"id": [o.id for o in outputs], "kind": [o.kind for o in outputs],
                 "record": [json.dumps(o.record, ensure_ascii=False) for o in outputs]}
        return pa.table(table, schema=pa.schema([(c, pa.string()) for c in _SCHEMA_COLUMNS]))

    def _log_failures(self, failures: list[Failure]) -> None:
        self.failures_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.failures_path, "a", encoding="utf-8") as handle:
            for failure in failures:
                entry = {k: v for k, v in asdict(failure).items() if v is not None}
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _progress_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Running counts of one job, summed over its workers; says when ``max_failures`` is reached."""

        def __init__(self, max_failures: int | None):
            self.counts: Counter = Counter()
            self.max_failures = max_failures
            self.workers: list[Any] = []

        def register(self, worker: Any) -> None:
            self.workers.append(worker)

        def worker_handles(self) -> list[Any]:
            return list(self.workers)

        def add(self, delta: dict[str, int]) -> bool:
            self.counts.update(delta)
            failed = sum(v for k, v in self.counts.items() if k.startswith("failed:"))
            return self.max_failures is not None and failed >= self.max_failures

        def snapshot(self) -> dict[str, int]:
            return dict(self.counts)

    return Progress


# -------------------------------------------------------------------------------------------------------- job
@dataclass
class JobResult:
    """What one run did: ``counts`` (``out:<kind>``, ``failed:<kind>``, the processor's own), its time, the error
    that ended it early (None when it finished) and the endpoint budget's use."""

    counts: dict[str, int]
    seconds: float
    error: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("out:"))

    @property
    def failed(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("failed:"))


def run_job(
    name: str, work: WorkDir, processor_cls: type, processor_config: Any, config: RayEngineConfig,
    llm_configs: Iterable[Any] = (), tracker: Any = None,
) -> JobResult:
    """One run of the map -> write job over ``work.input`` (in a :func:`ray_session`). A failed run (a worker
    error, ``max_failures``) returns its error instead of raising: what it committed is exported like any other."""
    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from masksearch_rl.distributed.budget import start_budget

    progress = _progress_actor_class().remote(config.max_failures)
    budget = start_budget(llm_configs)
    work.failures.mkdir(parents=True, exist_ok=True)
    context = ray.data.DataContext.get_current()
    saved = context.checkpoint_config, context.enable_progress_bars
    context.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=str(work.checkpoint),
                                                 delete_checkpoint_on_success=False)
    context.enable_progress_bars = config.progress_bars
    monitor = _Monitor(name, progress, budget, config.progress_interval_s, tracker)
    started = time.perf_counter()
    error = None
    try:
        dataset = (
            ray.data.read_parquet(str(work.input), file_extensions=["parquet"])
            # Small blocks: a batch is a map task, the unit a failure loses (Ray reads up to 128 MiB per block).
            .repartition(target_num_rows_per_block=config.batch_size)
            .map_batches(
                ItemWorker,
                fn_constructor_kwargs={"processor_cls": processor_cls, "processor_config": processor_config,
                                       "progress": progress, "budget": budget, "failures_dir": str(work.failures)},
                batch_size=config.batch_size, batch_format="pyarrow", num_cpus=config.cpus_per_worker,
                compute=ray.data.ActorPoolStrategy(size=config.workers,
                                                   max_tasks_in_flight_per_actor=config.tasks_per_worker),
            )
        )
        monitor.start()
        dataset.write_parquet(str(work.output), min_rows_per_file=config.rows_per_file)
    except Exception as err:  # the job failed; what it committed stays and the next run goes on from there
        error = _first_line(err)
        logger.error("%s: the Ray job failed: %s", name, error)
    finally:
        monitor.stop()
        context.checkpoint_config, context.enable_progress_bars = saved
    counts = ray.get(progress.snapshot.remote())
    budget_use = ray.get(budget.snapshot.remote()) if budget is not None else {}
    # Ray Data releases a failed job's worker actors by dropping its references, which can leave them alive, each
    # holding its CPUs, and the next job in this Ray then waits forever for them: end them here, by handle.
    for worker in ray.get(progress.worker_handles.remote()):
        ray.kill(worker)
    for actor in (progress, budget):
        if actor is not None:
            ray.kill(actor)
    result = JobResult(counts, round(time.perf_counter() - started, 3), error, budget_use)
    monitor.report(result.counts, final=True)
    return result


def _first_line(err: BaseException) -> str:
    """The worker's own exception inside Ray's wrappers, as ``Type: message``: the innermost ``cause``/
    ``__cause__``, or, where Ray kept only the text of the worker's traceback, its first ``Type: message`` line."""
    seen, inner = {id(err)}, err
    while isinstance(getattr(inner, "cause", None) or inner.__cause__, BaseException):
        inner = getattr(inner, "cause", None) or inner.__cause__
        if id(inner) in seen:
            break
        seen.add(id(inner))
    if not type(inner).__module__.startswith("ray"):
        return f"{type(inner).__name__}: {str(inner).strip().splitlines()[0] if str(inner).strip() else ''}"
    for line in str(err).splitlines():
        match = re.match(r"^(\w+(?:Error|Exception|Stopped)): (.*)$", line.strip())
        if match and not match.group(1).startswith(("Ray", "UserCode")):
            return f"{match.group(1)}: {match.group(2)}"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


class _Monitor:
    """Reports the job's progress every ``interval`` seconds from a thread while the driver waits on the write."""

    def __init__(self, name: str, progress: Any, budget: Any, interval: float, tracker: Any):
        self.name, self.progress, self.budget, self.interval, self.tracker = name, progress, budget, interval, tracker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-progress", daemon=True)
        self._started = time.perf_counter()
        self._last = (self._started, 0)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._last = (self._started, 0)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self.interval):
            try:
                self.report(ray.get(self.progress.snapshot.remote(), timeout=30))
            except Exception as err:  # progress is a nicety: never let it end the job
                logger.debug("progress report failed: %s", err)

    def report(self, counts: dict[str, int], final: bool = False) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._started, 1e-9)
        done = sum(v for k, v in counts.items() if k.startswith("out:"))
        failed = sum(v for k, v in counts.items() if k.startswith("failed:"))
        tokens = counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)
        last_time, last_done = self._last
        self._last = (now, done + failed)
        metrics = {"ray/done": done, "ray/failed": failed, "ray/items_per_s": round((done + failed) / elapsed, 2),
                   "ray/recent_items_per_s": round((done + failed - last_done) / max(now - last_time, 1e-9), 2),
                   "ray/tokens_per_s": round(tokens / elapsed, 1), "ray/elapsed_s": round(elapsed, 1)}
        kinds = ", ".join(f"{k[4:]} {v:,}" for k, v in sorted(counts.items()) if k.startswith("out:"))
        failures = ", ".join(f"{k[7:]} {v:,}" for k, v in sorted(counts.items()) if k.startswith("failed:"))
        print(f"[{self.name}/ray{' done' if final else ''}] {done:,} done ({kinds or 'none yet'}), {failed:,} failed"
              f"{f' ({failures})' if failures else ''}; {metrics['ray/items_per_s']:,} items/s, "
              f"{metrics['ray/tokens_per_s']:,} tokens/s, {elapsed:,.0f} s", file=sys.stderr, flush=True)
        if self.tracker is not None and getattr(self.tracker, "enabled", False):
            self.tracker.log(metrics)
        return metrics


# ----------------------------------------------------------------------------------------------------- export
def committed_files(work: WorkDir) -> list[Path]:
    """Output files whose checkpoint committed (a file of a killed or failed write may be torn, and a rerun deletes
    it), in name order. Ray names a task's checkpoint after the prefix of its data files."""
    from ray.data.checkpoint.util import PrefixTrie

    trie = PrefixTrie()
    if work.checkpoint.is_dir():
        for path in work.checkpoint.glob("*.parquet"):
            if not path.name.endswith(".pending.parquet"):
                trie.insert(path.name[: -len(".parquet")])
    if not work.output.is_dir():
        return []
    return sorted(p for p in work.output.glob("*.parquet") if trie.has_prefix_of(p.name))


@dataclass
class Export:
    ids: set[str]
    counts: dict[str, int]  # records written per kind
    duplicates: int


def output_ids(work: WorkDir) -> set[str]:
    """Ids of the committed outputs."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in committed_files(work):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def export_outputs(work: WorkDir, targets: dict[str, str | os.PathLike], memory_bytes: int = 1 << 30) -> Export:
    """Write each output kind's records to its target JSONL (atomically), one per id, sorted by id.

    Reads ids and record sizes first, then the records of one id range at a time, each range at most
    ``memory_bytes`` of records: a job larger than memory exports in several passes over the files.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = committed_files(work)
    owner: dict[str, tuple[int, int]] = {}  # id -> (file that holds its first record, record size)
    duplicates = 0
    for number, path in enumerate(files):
        table = pq.read_table(path, columns=["id", "record"])
        sizes = pc.binary_length(table.column("record").cast("binary")).to_pylist()
        for item_id, size in zip(table.column("id").to_pylist(), sizes):
            if item_id in owner:
                duplicates += 1
            else:
                owner[item_id] = (number, size)
    order = sorted(owner)
    counts = Counter({kind: 0 for kind in targets})
    with _AtomicWriters(targets) as writers:
        start = 0
        while start < len(order):
            end, size = start, 0
            while end < len(order) and (end == start or size + owner[order[end]][1] <= memory_bytes):
                size += owner[order[end]][1]
                end += 1
            wanted = set(order[start:end])
            found: dict[str, tuple[str, str]] = {}
            for number, path in enumerate(files):
                table = pq.read_table(path, columns=list(_SCHEMA_COLUMNS))
                for item_id, kind, record in zip(*(table.column(c).to_pylist() for c in _SCHEMA_COLUMNS)):
                    if item_id in wanted and owner[item_id][0] == number and item_id not in found:
                        found[item_id] = (kind, record)
            for item_id in order[start:end]:
                kind, record = found[item_id]
                if kind not in writers:
                    raise ValueError(f"output kind {kind!r} of id {item_id!r} has no export file ({list(targets)})")
                writers[kind].write(record + "\n")
                counts[kind] += 1
            start = end
    return Export(set(owner), dict(counts), duplicates)


class _AtomicWriters:
    """One text file per kind, each replacing its target in one rename when all are written."""

    def __init__(self, targets: dict[str, str | os.PathLike]):
        self.targets = targets
        self._contexts = {kind: atomic_path(path) for kind, path in targets.items()}
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> dict[str, Any]:
        for kind, context in self._contexts.items():
            self._handles[kind] = open(context.__enter__(), "w", encoding="utf-8")
        return self._handles

    def __exit__(self, *exc: Any) -> None:
        for kind, handle in self._handles.items():
            handle.close()
            self._contexts[kind].__exit__(*exc)


def merge_failures(work: WorkDir, errors_path: str | os.PathLike, done: set[str]) -> int:
    """``errors_path`` := every failed attempt in the side files whose id has not succeeded since (the asyncio
    engine's errors-file layout: ``{id, kind, error[, traceback]}``); the side files are compacted to those lines.
    Returns how many distinct ids are still failing. (A torn last line of a killed worker is skipped.)"""
    kept: list[str] = []
    failing: set[str] = set()
    sources = sorted(work.failures.glob("*.jsonl")) if work.failures.is_dir() else []
    for path in sources:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and str(entry.get("id")) not in done:
                kept.append(json.dumps(entry, ensure_ascii=False) + "\n")
                failing.add(str(entry.get("id")))
    with atomic_path(errors_path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
    if sources:
        with atomic_path(work.failures / "earlier.jsonl") as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
        for path in sources:
            if path.name != "earlier.jsonl":
                path.unlink(missing_ok=True)
    return len(failing)


def grouped(counts: dict[str, int], prefix: str) -> dict[str, int]:
    """``{"k": n}`` for the ``<prefix>:k`` entries of a counts dict."""
    return {k[len(prefix) + 1:]: v for k, v in sorted(counts.items()) if k.startswith(prefix + ":")}
