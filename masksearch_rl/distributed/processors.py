"""Each command's per-item code, wrapped for a Ray Data worker (:class:`masksearch_rl.distributed.engine.Processor`).

Nothing here decides what an item becomes: that stays in the command's own module, shared with its asyncio engine
(RAMP: ``masksearch_rl.ramp.pipeline``'s precheck/prepare/build_item; CoT: ``cot.pipeline.construct`` and
``attempt``; self-evolve: ``selfevolve.iteration.teacher_record``). A processor only maps a batch of input records to
outcomes, concurrently where the work waits on the network, and keeps the counts the command's summary reports.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from masksearch_rl.distributed.engine import Failure, Output


def _add_llm_counts(counts: Counter, clients: list[Any]) -> None:
    """Running token and call totals of the worker's LLM clients (each client counted once)."""
    unique = {id(c): c for c in clients}.values()
    for name in ("calls", "prompt_tokens", "completion_tokens"):
        counts[name if name != "calls" else "llm_calls"] = sum(c.stats[name] for c in unique)


async def _guarded(item_id: str, work: Any) -> Any:
    """``await work``, or a ``task_error`` failure when it raises: one item's bug must not end the job."""
    try:
        return await work
    except Exception as err:
        return _task_error(item_id, err)


def _task_error(item_id: str, err: Exception) -> Failure:
    import traceback

    return Failure(item_id, "task_error", f"{type(err).__name__}: {err}",
                   "".join(traceback.format_exception(type(err), err, err.__traceback__)))


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
        from masksearch_rl.ramp.pipeline import Prepared, build_item

        prepared = await asyncio.gather(*(_guarded(item_id, self._prepare(record)) for item_id, record in items))
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
                outcomes.append(_task_error(outcome.passage.id, err))
                continue
            if isinstance(result, dict):
                self.counts[f"mask_histogram:{result['num_masks']}"] += 1
                self.counts.update(f"span_types_masked:{t}" for t in result["mask_types"])
                outcomes.append(Output(outcome.passage.id, "item", result))
            else:
                self.counts[f"drop_reasons:{result}"] += 1
                outcomes.append(Output(outcome.passage.id, "dropped", {"id": outcome.passage.id, "reason": result}))
        if self.client is not None:
            _add_llm_counts(self.counts, [self.client])
        return outcomes

    async def _prepare(self, record: dict[str, Any]) -> Any:
        from masksearch_rl.llm import LLMError
        from masksearch_rl.ramp.pipeline import Prepared, passage_from_record, precheck, prepare, prepare_offline

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
        _add_llm_counts(self.counts, list(self.roles.clients().values()))
        self.counts["judge_failures"] = self.roles.judge.stats["failures"]
        return list(outcomes)


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
        _add_llm_counts(self.counts, [self.teacher, self.judge.client])
        return list(outcomes)
