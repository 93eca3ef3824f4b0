"""The RAMP generation job runner: passages in, RAMP items out; resumable, parallel, with a summary at the end.

Reads top to bottom: open the outputs (what is already done is skipped) -> stream passages -> propose spans
(offline rules in worker processes, or an LLM with async concurrency) -> validate -> optionally score with a
causal LM (PPL masking) -> choose masks -> append the item, or record the drop in a sidecar -> summary.

Files, for ``--out items.jsonl``:
  ``items.jsonl``               RAMP items (DESIGN.md schema), append-only, one per passage id
  ``items.jsonl.dropped.jsonl`` ``{"id", "reason"}`` for passages that gave no item, so a re-run doesn't retry them
  ``items.jsonl.summary.json``  counts for this run and for the files as a whole

Determinism: the random generator for a passage is seeded from ``(seed, passage id)``, so the output does not
depend on the number of workers, on the order passages finish in, or on where a killed run stopped.
Passages whose LLM call failed (endpoint errors after retries, unusable replies) or whose reply did not parse as a
span list are *not* recorded (``llm_errors``, ``parse_rejects``), so the next run retries them; an unparseable reply
is not cached either.

This module is the job around the items: the config, the resumable output files, the passage stream, the worker
pool, the summary. What one passage becomes (the per-passage steps) is :mod:`masksearch_rl.ramp.items`. Two engines
run those same steps: this module's (one process; offline extraction in a process pool, LLM calls on one event
loop) and Ray Data's (``--engine ray``, :mod:`masksearch_rl.ramp.ray_job` on :mod:`masksearch_rl.distributed`), for
runs past one machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masksearch_rl.corpus.passage import Passage
from masksearch_rl.jsonl import BadLines, ResumableJsonlWriter, atomic_path, iter_jsonl
from masksearch_rl.ramp.extractors import SpanExtractor
from masksearch_rl.ramp.items import Prepared, build_item, passage_from_record, precheck, prepare, prepare_offline
from masksearch_rl.ramp.masking import MaskingConfig
from masksearch_rl.ramp.ppl import PplConfig

if TYPE_CHECKING:
    from masksearch_rl.llm import LLMConfig

logger = logging.getLogger(__name__)

EXTRACTORS = ("offline", "llm")


@dataclass
class RampConfig:
    """Everything one generation run needs; validated up front so a bad flag fails before any work."""

    corpus: str | os.PathLike
    out: str | os.PathLike
    extractor: str = "offline"
    corpus_format: str = "passages"  # our passage JSONL, or a corpus.readers format ("auto", "kilt", ...)
    chunk_words: int | None = 100  # passage size when corpus_format is an article format
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    llm: LLMConfig | None = None
    ppl: PplConfig | None = None
    workers: int = 1
    seed: int = 0
    limit: int | None = None  # only the first N passages of the corpus
    prepend_title: bool = True  # paper: put the title in front when the passage never names its subject
    min_words: int = 8
    source: str = "wiki"  # used when a passage record has no "source"
    use_annotations: bool = True
    chunk_size: int = 128  # passages per worker task
    max_llm_errors: int = 1000  # stop (progress kept) when the endpoint keeps failing
    progress: bool = True
    engine: str = "asyncio"  # asyncio (this module) | ray (Ray Data: masksearch_rl.ramp.ray_job)
    ray: dict[str, Any] = field(default_factory=dict)  # RayEngineConfig fields, for engine "ray"

    def __post_init__(self) -> None:
        from masksearch_rl.distributed.engine import RayEngineConfig, check_engine

        check_engine(self.engine)
        RayEngineConfig.from_mapping(self.ray)
        self.corpus, self.out = os.fspath(self.corpus), os.fspath(self.out)
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
        if self.extractor == "llm" and self.llm is None:
            raise ValueError("extractor 'llm' needs an LLM config (base URL and model)")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if not Path(self.corpus).exists():
            raise FileNotFoundError(f"corpus not found: {self.corpus}")
        if self.corpus_format == "passages" and not Path(self.corpus).is_file():
            raise ValueError(f"corpus {self.corpus} is not a passage JSONL file; pass corpus_format='auto'")

    @property
    def dropped_path(self) -> Path:
        return Path(f"{self.out}.dropped.jsonl")

    @property
    def summary_path(self) -> Path:
        return Path(f"{self.out}.summary.json")


# --------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunStats:
    passages_read: int = 0
    skipped_done: int = 0
    duplicate_ids: int = 0
    items: int = 0
    dropped: int = 0
    llm_errors: int = 0
    parse_rejects: int = 0
    mask_histogram: Counter = field(default_factory=Counter)
    drop_reasons: Counter = field(default_factory=Counter)
    candidate_rejects: Counter = field(default_factory=Counter)
    span_types_masked: Counter = field(default_factory=Counter)
    stopped: str | None = None  # why the run ended before the corpus did

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key, value in vars(self).items():
            if isinstance(value, Counter):  # (dataclasses.asdict would rebuild a Counter from key/value pairs)
                value = {str(k): v for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
            data[key] = value
        return data


class _Sink:
    """Receives prepared passages in any order, scores them for PPL masking in batches, and writes the results."""

    def __init__(
        self, config: RampConfig, items: ResumableJsonlWriter, dropped: ResumableJsonlWriter, stats: RunStats, bar
    ):
        self.config, self.items, self.dropped, self.stats, self.bar = config, items, dropped, stats, bar
        self.scorer = None
        if config.ppl is not None:
            from masksearch_rl.ramp.ppl import PplScorer

            self.scorer = PplScorer(config.ppl)
        self._pending: list[Prepared] = []

    def add(self, prepared: Prepared) -> None:
        if prepared.parse_error:  # not a property of the passage: left for the next run, like an endpoint error
            self.stats.parse_rejects += 1
            if self.stats.parse_rejects <= 5:
                logger.warning("passage %s left for a later run: %s", prepared.passage.id, prepared.parse_error)
            self.bar.update(1)
            return
        self.stats.candidate_rejects.update(prepared.rejects)
        if self.scorer is None or prepared.drop or prepared.result is not None:
            self._finish(prepared, None)
            return
        self._pending.append(prepared)
        if len(self._pending) >= self.config.ppl.batch_size * 4:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        scores = self.scorer.span_scores(
            [p.text for p in batch], [[(c.start, c.end) for c in p.candidates] for p in batch]
        )
        for prepared, passage_scores in zip(batch, scores):
            self._finish(prepared, passage_scores)

    def _finish(self, prepared: Prepared, scores: list[float] | None) -> None:
        result = prepared.result if prepared.result is not None else build_item(prepared, self.config, scores)
        if isinstance(result, dict):
            if self.items.write(result):
                self.stats.items += 1
                self.stats.mask_histogram[result["num_masks"]] += 1
                self.stats.span_types_masked.update(result["mask_types"])
        else:
            record = {"id": prepared.passage.id, "reason": result}
            if self.dropped.write(record):
                self.stats.dropped += 1
                self.stats.drop_reasons[result] += 1
        self.bar.update(1)
        self.bar.set_postfix(items=self.stats.items, dropped=self.stats.dropped, refresh=False)


def iter_passages(config: RampConfig, bad: BadLines) -> Iterator[tuple[Passage, str]]:
    """Passages of the corpus (the first ``limit``), skipping bad lines (counted) and records without text."""
    if config.corpus_format != "passages":
        from itertools import islice

        from masksearch_rl.corpus.readers import read_corpus

        passages = read_corpus(config.corpus, config.corpus_format, config.chunk_words, bad=bad)
        for passage in islice(passages, config.limit):
            yield passage, config.source
        return
    count = 0
    for lineno, record in iter_jsonl(config.corpus, bad=bad, required=("id",)):
        if config.limit is not None and count >= config.limit:
            return
        if not isinstance(record.get("contents"), str) and not isinstance(record.get("text"), str):
            bad.add(config.corpus, lineno, "no 'contents' or 'text' string")
            continue
        count += 1
        passage, source = passage_from_record(record)
        yield passage, source or config.source


def _count_lines(path: str, limit: int | None) -> int | None:
    if not Path(path).is_file():
        return limit
    total = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            total += block.count(b"\n")
    return min(total, limit) if limit is not None else total


def generate_ramp(config: RampConfig, tracker: Any = None) -> dict[str, Any]:
    """Run (or resume) a generation job; returns the summary that is also written next to the output.
    ``tracker`` receives the Ray engine's progress (the asyncio engine shows a progress bar)."""
    if config.engine == "ray":
        from masksearch_rl.ramp.ray_job import generate_ramp_ray

        return generate_ramp_ray(config, tracker)
    from tqdm import tqdm

    started = time.perf_counter()
    stats, bad = RunStats(), BadLines()
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    llm_description = None
    with ResumableJsonlWriter(config.out) as items, ResumableJsonlWriter(config.dropped_path) as dropped:
        done = items.done | dropped.done
        bar = tqdm(
            total=_count_lines(config.corpus, config.limit) if config.corpus_format == "passages" else config.limit,
            desc=f"ramp[{config.extractor}]",
            unit="passage",
            disable=not config.progress,
            dynamic_ncols=True,
        )
        sink = _Sink(config, items, dropped, stats, bar)

        def todo() -> Iterator[tuple[Passage, str]]:
            seen: set[str] = set()
            for passage, source in iter_passages(config, bad):
                stats.passages_read += 1
                if passage.id in done:
                    stats.skipped_done += 1
                    bar.update(1)
                elif passage.id in seen:
                    stats.duplicate_ids += 1
                else:
                    seen.add(passage.id)
                    yield passage, source

        try:
            if config.extractor == "offline":
                for prepared in _run_offline(todo(), config):
                    sink.add(prepared)
            else:
                llm_description = asyncio.run(_run_llm(todo(), config, sink, stats))
            sink.flush()
        finally:
            bar.close()
    summary = {
        "run": {
            **stats.as_dict(),
            "bad_lines": bad.summary(),
            "elapsed_s": round(time.perf_counter() - started, 3),
        },
        "totals": summarize_outputs(config.out),
        "config": describe_config(config),
    }
    if llm_description is not None:
        summary["llm"] = llm_description
    elapsed = summary["run"]["elapsed_s"]
    summary["run"]["passages_per_s"] = round((stats.items + stats.dropped) / elapsed, 1) if elapsed > 0 else None
    with atomic_path(config.summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _run_offline(passages: Iterable[tuple[Passage, str]], config: RampConfig) -> Iterator[Prepared]:
    """Offline extraction, in this process (workers=1) or in a process pool that sees only a bounded number of
    chunks at a time (Pool.imap would read the whole corpus ahead). Results come back in input order."""
    if config.workers == 1:
        for passage, source in passages:
            yield prepare_offline(passage, source, config)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork: the parent may run threads (servers, tqdm)
    in_flight: deque[Future] = deque()
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        for chunk in _chunks(passages, config.chunk_size):
            in_flight.append(pool.submit(_process_chunk, chunk, config))
            while len(in_flight) >= 2 * config.workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def _process_chunk(chunk: list[tuple[Passage, str]], config: RampConfig) -> list[Prepared]:
    """Worker task: prepare each passage and, unless PPL scoring (main process) must come first, build its item."""
    results = []
    for passage, source in chunk:
        prepared = prepare_offline(passage, source, config)
        if config.ppl is None:
            prepared.result = build_item(prepared, config)
            prepared.candidates = []  # not needed any more: less to send back
        results.append(prepared)
    return results



def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _run_llm(passages: Iterable[tuple[Passage, str]], config: RampConfig, sink: _Sink, stats: RunStats) -> dict:
    """LLM extraction with at most ~2x the client's concurrency in flight (the client's semaphore caps the calls)."""
    from masksearch_rl.llm import LLMClient, LLMError
    from masksearch_rl.ramp.extractors import LLMExtractor

    client = LLMClient(config.llm)
    extractor: SpanExtractor = LLMExtractor(client)
    window = max(2, 2 * config.llm.concurrency)

    async def one(passage: Passage, source: str) -> Prepared | None:
        text, drop = precheck(passage, config)
        if drop:
            return Prepared(passage=passage, text=text, source=source, drop=drop)
        try:
            extraction = await extractor.extract(passage, text)
        except LLMError as err:
            stats.llm_errors += 1
            if stats.llm_errors <= 5:
                logger.warning("passage %s left for a later run: %s", passage.id, err)
            return None
        return prepare(passage, source, extraction, config, text)

    pending: set[asyncio.Task] = set()
    try:
        for passage, source in passages:
            pending.add(asyncio.create_task(one(passage, source)))
            if len(pending) >= window:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                _deliver(finished, sink)
                if stats.llm_errors >= config.max_llm_errors:
                    stats.stopped = (
                        f"stopped early: {stats.llm_errors} failed LLM calls (limit {config.max_llm_errors}); "
                        "finished work is saved, re-run to continue"
                    )
                    logger.error(stats.stopped)
                    break
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            _deliver(finished, sink)
    finally:
        for task in pending:
            task.cancel()
        await client.aclose()
    return client.describe()


def _deliver(finished: set[asyncio.Task], sink: _Sink) -> None:
    for task in finished:
        prepared = task.result()
        if prepared is None:
            sink.bar.update(1)
        else:
            sink.add(prepared)


def summarize_outputs(out: str | Path) -> dict[str, Any]:
    """Counts over the whole output files (all runs): items, mask-count histogram, drop reasons."""
    histogram: Counter = Counter()
    reasons: Counter = Counter()
    items = dropped = 0
    bad = BadLines()
    if Path(out).exists():
        for _, item in iter_jsonl(out, bad=bad):
            items += 1
            histogram[item.get("num_masks")] += 1
    dropped_path = Path(f"{out}.dropped.jsonl")
    if dropped_path.exists():
        for _, record in iter_jsonl(dropped_path, bad=bad):
            dropped += 1
            reasons[record.get("reason")] += 1
    return {
        "items": items,
        "dropped": dropped,
        "mask_histogram": {str(k): v for k, v in sorted(histogram.items(), key=lambda kv: str(kv[0]))},
        "drop_reasons": dict(reasons),
        "bad_lines": bad.total,
    }


def describe_config(config: RampConfig) -> dict[str, Any]:
    data = asdict(config)
    if data.get("llm"):
        data["llm"].pop("extra_body", None)  # may hold provider options; the key itself is never in the config
    return data
