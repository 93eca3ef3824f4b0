"""``ramp generate --engine ray``: the RAMP job on the Ray Data engine (:mod:`masksearch_rl.distributed`).

:class:`RampProcessor` wraps the per-passage steps of :mod:`masksearch_rl.ramp.items` (the ones the asyncio engine
runs) for a Ray Data worker; :func:`generate_ramp_ray` is what the command does around the engine: its input shards,
its output files (``<out>``, ``<out>.dropped.jsonl``, ``<out>.errors.jsonl``, the summary), its summary.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from masksearch_rl.distributed.command import add_llm_counts, engine_summary, guarded, task_error, work_dir
from masksearch_rl.distributed.engine import (
    Failure,
    Output,
    RayEngineConfig,
    export_outputs,
    file_fingerprint,
    grouped,
    merge_failures,
    output_ids,
    prepare_input,
    ray_session,
    run_job,
)
from masksearch_rl.jsonl import BadLines, atomic_path


class RampProcessor:
    """``ramp generate``: a passage record -> an ``item``, a ``dropped`` record, or a failure (endpoint error:
    ``backend``; a reply that is not a span list: ``parse_error``; an exception: ``task_error``), as the asyncio
    engine decides it."""

    def __init__(self, config: Any):  # masksearch_rl.ramp.pipeline.RampConfig
        self.config = config
        self.counts: Counter = Counter()
        self.client = self.extractor = self.scorer = None
        if config.extractor == "llm":
            from masksearch_rl.llm import LLMClient
            from masksearch_rl.ramp.extractors import LLMExtractor

            self.client = LLMClient(config.llm)
            self.extractor = LLMExtractor(self.client)
        if config.ppl is not None:
            from masksearch_rl.ramp.ppl import PplScorer

            self.scorer = PplScorer(config.ppl)

    async def process(self, items: list[tuple[str, dict[str, Any]]]) -> list[Output | Failure]:
        from masksearch_rl.ramp.items import Prepared, build_item

        prepared = await asyncio.gather(*(guarded(item_id, self._prepare(record)) for item_id, record in items))
        scores: dict[int, list[float]] = {}
        pending = [i for i, p in enumerate(prepared) if isinstance(p, Prepared) and not p.drop]
        if self.scorer is not None and pending:
            batch = [prepared[i] for i in pending]
            found = self.scorer.span_scores([p.text for p in batch], [[(c.start, c.end) for c in p.candidates]
                                                                      for p in batch])
            scores = dict(zip(pending, found))
        outcomes: list[Output | Failure] = []
        for number, outcome in enumerate(prepared):
            if isinstance(outcome, Failure):
                outcomes.append(outcome)
                continue
            self.counts.update({f"candidate_rejects:{k}": v for k, v in outcome.rejects.items()})
            try:
                result = build_item(outcome, self.config, scores.get(number))
            except Exception as err:
                outcomes.append(task_error(outcome.passage.id, err))
                continue
            if isinstance(result, dict):
                self.counts[f"mask_histogram:{result['num_masks']}"] += 1
                self.counts.update(f"span_types_masked:{t}" for t in result["mask_types"])
                outcomes.append(Output(outcome.passage.id, "item", result))
            else:
                self.counts[f"drop_reasons:{result}"] += 1
                outcomes.append(Output(outcome.passage.id, "dropped", {"id": outcome.passage.id, "reason": result}))
        if self.client is not None:
            add_llm_counts(self.counts, [self.client])
        return outcomes

    async def _prepare(self, record: dict[str, Any]) -> Any:
        from masksearch_rl.llm import LLMError
        from masksearch_rl.ramp.items import Prepared, passage_from_record, precheck, prepare, prepare_offline

        passage, source = passage_from_record(record)
        source = source or self.config.source
        if self.extractor is None:
            return prepare_offline(passage, source, self.config)
        text, drop = precheck(passage, self.config)
        if drop:
            return Prepared(passage=passage, text=text, source=source, drop=drop)
        try:
            extraction = await self.extractor.extract(passage, text)
        except LLMError as err:
            return Failure(passage.id, "backend", str(err))
        prepared = prepare(passage, source, extraction, self.config, text)
        if prepared.parse_error:  # a fact about this reply, not the passage: the next run asks again
            return Failure(passage.id, "parse_error", prepared.parse_error)
        return prepared


def generate_ramp_ray(config: Any, tracker: Any = None) -> dict[str, Any]:
    """``ramp generate --engine ray``: the summary has the asyncio engine's ``run``/``totals`` keys plus ``ray``."""
    from masksearch_rl.ramp.pipeline import describe_config, iter_passages, summarize_outputs

    engine = RayEngineConfig.from_mapping(config.ray)
    out, dropped = Path(config.out), Path(config.dropped_path)
    work = work_dir(engine, out, [out, dropped])
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
        # RampProcessor is looked up here, at call time: a test may replace it on this module
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
    summary = {"run": run, "totals": summarize_outputs(out), "config": describe_config(config),
               "ray": engine_summary(result, engine, work, manifest, export.duplicates)}
    with atomic_path(config.summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
