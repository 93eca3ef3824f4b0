"""``eval run``: roll the agent out on benchmark questions, score the answers, write the results and tables.

The loop reads top to bottom in :func:`run_eval`: load the benchmarks -> check the output directory's settings
(:mod:`masksearch_rl.eval.fingerprint`: a resume never mixes policies, search or judge settings unless forced) ->
skip questions already in ``predictions.jsonl`` (resume) -> run the pending ones concurrently (``concurrency``
episodes in flight; the policy server batches them) with a progress bar -> score each as it finishes and append it
-> summarise every benchmark -> ``results.json``, Table 2 (``table.md/csv/json``), plots -> W&B.

Episodes are :func:`envs.rollout.run_episode` (the same tag protocol, prompts and search text as RL training) on
the prompt :func:`envs.prompts.qa_messages`. Scores are :mod:`masksearch_rl.eval.metrics` (the reward's own answer
matching). An episode whose policy endpoint failed after its retries is *not* written: it is counted, reported
and left for a re-run of the same command, so a flaky server never turns into zeros in the table.

Per-question record in ``predictions.jsonl`` (one JSON line; ``key`` = ``<benchmark>/<id>``)::

    {"key", "dataset", "id", "question", "answers", "answer", "finish", "num_searches", "num_turns",
     "searches": [...], "information": [...], "raw", "scores": {"recall", "em", "f1", "cover_em", "judge"},
     "judge_error", "search_errors", "latency_s"}

``num_turns`` counts policy turns (generate calls that produced text); ``num_searches`` the ``<search>`` calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from masksearch_rl.eval.fingerprint import check_fingerprint, fingerprint
from masksearch_rl.eval.loaders import PAPER_BENCHMARKS, SEARCH_R1_BENCHMARKS, LoadReport, QAItem, load_benchmark
from masksearch_rl.eval.metrics import ANSWER_METRICS, score_prediction, summarize_all
from masksearch_rl.jsonl import BadLines, ResumableJsonlWriter, atomic_path, iter_jsonl
from masksearch_rl.llm import LLMConfig
from masksearch_rl.records import Prediction
from masksearch_rl.tracking import TrackingConfig, start_run

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"
POLICY_KINDS = ("chat", "chat-turns", "completions", "hf")


@dataclass
class PolicyConfig:
    """The policy under test.

    ``kind``: ``chat`` (OpenAI-compatible chat endpoint, transcript continued in one assistant message: vLLM /
    SGLang), ``chat-turns`` (any chat API; one message per turn), ``completions`` (``/v1/completions`` with the chat
    template rendered here from ``tokenizer``), ``hf`` (a local Hugging Face model at ``model``; no server).
    ``llm`` are the endpoint's :class:`~masksearch_rl.llm.LLMConfig` fields (base_url, model, api_key_env, timeout_s,
    max_retries, concurrency, ...); ``max_new_tokens`` bounds each turn.
    """

    kind: str = "chat"
    llm: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # hf: model directory
    tokenizer: str | None = None  # completions: tokenizer directory (default: llm.model)
    device: str = "cpu"
    max_new_tokens: int = 1024
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if self.kind == "hf" and not self.model:
            raise ValueError("policy kind 'hf' needs the model directory (--hf-model)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class EvalConfig:
    """One evaluation run. ``datasets`` are ``(benchmark name or None, file)`` pairs (None: named by the file)."""

    datasets: Sequence[tuple[str | None, str | Path]]
    out_dir: str | Path
    method: str = "policy"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    search: dict[str, Any] = field(default_factory=dict)  # envs.search_client.SearchSettings fields
    max_turns: int = 4
    concurrency: int = 32
    limit: int | None = None  # first N questions of each benchmark
    skip_bad: bool = False  # skip malformed benchmark records (counted) instead of failing
    judge: dict[str, Any] | None = None  # LLMConfig fields of a judge endpoint; None: no judge
    tracking: TrackingConfig | None = None
    log_samples: int = 50  # trajectories in the W&B sample table
    plots: bool = True
    progress: bool = True
    force: bool = False  # resume into out_dir even if its predictions were made with other settings

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("no benchmarks given (--data name=path)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {self.max_turns}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        self.out_dir = Path(self.out_dir)

    def describe(self) -> dict[str, Any]:
        """The config for results.json and W&B (no secrets: keys live in the environment only)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["datasets"] = [[name, str(path)] for name, path in self.datasets]
        data.pop("tracking", None)
        return data


# -------------------------------------------------------------------------------------------------- building
def build_policy(config: PolicyConfig):
    """The :class:`envs.rollout.PolicyClient` for ``config``."""
    from envs.rollout import ChatPolicy, CompletionPolicy
    from masksearch_rl.llm import LLMClient

    sampling = {"temperature": config.temperature}
    if config.kind == "hf":
        from masksearch_rl.eval.hf_policy import HFPolicy

        return HFPolicy(config.model, device=config.device, temperature=config.temperature)
    llm = LLMClient(LLMConfig.from_dict({"temperature": config.temperature, **config.llm}))
    if config.kind == "completions":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or llm.config.model)
        return CompletionPolicy(llm, tokenizer, sampling=sampling)
    return ChatPolicy(llm, mode="continue" if config.kind == "chat" else "turns", sampling=sampling)


def load_items(config: EvalConfig) -> tuple[dict[str, list[QAItem]], dict[str, Any]]:
    """Every benchmark's items (first ``limit`` of each) and what loading skipped."""
    items: dict[str, list[QAItem]] = {}
    skipped: dict[str, Any] = {}
    for name, path in config.datasets:
        report = LoadReport()
        loaded = load_benchmark(path, name, limit=config.limit, skip_bad=config.skip_bad, report=report)
        dataset = loaded[0].dataset
        if dataset in items:
            raise ValueError(f"benchmark {dataset} given twice ({path})")
        items[dataset] = loaded
        skipped[dataset] = {"bad": report.bad.summary(), "excluded": report.excluded, "duplicates": report.duplicates}
    return items, skipped


# ---------------------------------------------------------------------------------------------------- scoring
async def score_episode(item: QAItem, episode: Any, judge: Any | None) -> Prediction:
    """The predictions.jsonl record of one finished episode (see the module docstring)."""
    match = score_prediction(episode.answer, item.answers)
    scores: dict[str, Any] = dict(match._asdict())
    judge_error = None
    if judge is not None:
        scores["judge"], judge_error = await _judge(judge, item, episode.answer, match.em)
    return {
        "key": item.key,
        "dataset": item.dataset,
        "id": item.id,
        "question": item.question,
        "answers": list(item.answers),
        "answer": episode.answer,
        "finish": episode.finish,
        "num_searches": episode.search_count,
        "num_turns": len(episode.turns),
        "searches": episode.searches,
        "information": episode.information,
        "raw": episode.raw,
        "scores": scores,
        "judge_error": judge_error,
        "search_errors": episode.search_errors,
        "latency_s": round(episode.latency_s, 4),
    }


async def _judge(judge: Any, item: QAItem, answer: str | None, em: float) -> tuple[float, str | None]:
    """Judge score of one answer: no answer is wrong and an exact match right without a call (as in the reward);
    a failed call falls back to EM and is reported."""
    from reward.judge import JudgeItem

    if not answer:
        return 0.0, None
    if em == 1.0:
        return 1.0, None
    verdict = await judge.grade(JudgeItem(golds=(tuple(item.answers),), answer=answer, question=item.question))
    if verdict.score is None:
        return em, verdict.error or "judge failed"
    return float(verdict.score), None


# -------------------------------------------------------------------------------------------------------- run
async def _run_pending(config: EvalConfig, pending: list[QAItem], writer: ResumableJsonlWriter,
                       counters: Counter) -> None:
    from tqdm import tqdm

    from envs.prompts import qa_messages
    from envs.rollout import FINISH_POLICY_ERROR, make_search_env, run_episode
    from envs.search_client import close_shared_backends

    policy = build_policy(config.policy)
    search = make_search_env(config.search)
    judge = None
    if config.judge is not None:
        from reward.judge import JUDGE_LLM_DEFAULTS, get_judge

        judge = get_judge(LLMConfig.from_dict({**JUDGE_LLM_DEFAULTS, **config.judge}))
    queue: asyncio.Queue[QAItem] = asyncio.Queue()
    for item in pending:
        queue.put_nowait(item)
    bar = tqdm(total=len(pending), desc="eval", unit="q", disable=not config.progress, mininterval=1.0)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            episode = await run_episode(
                policy, search, qa_messages(item.question), max_turns=config.max_turns,
                max_new_tokens=config.policy.max_new_tokens,
            )
            if episode.finish == FINISH_POLICY_ERROR:
                counters["policy_errors"] += 1
                if counters["policy_errors"] <= 3:
                    logger.warning("%s: policy failed, left for a re-run: %s", item.key, "; ".join(episode.errors))
            else:
                writer.write(await score_episode(item, episode, judge))
                counters["written"] += 1
            bar.update(1)
            bar.set_postfix(errors=counters["policy_errors"], refresh=False)

    try:
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(pending)))))
    finally:
        bar.close()
        close = getattr(policy, "aclose", None)
        if close is not None:
            await close()
        llm = getattr(policy, "llm", None)
        if llm is not None:
            await llm.aclose()
        await close_shared_backends()


def read_predictions(path: Path, keys: set[str] | None = None) -> list[Prediction]:
    """Records of ``predictions.jsonl`` (only ``keys`` when given); bad lines are skipped and logged."""
    if not path.exists():
        return []
    bad = BadLines()
    rows = [r for _, r in iter_jsonl(path, bad, required=("key", "dataset", "scores")) if keys is None or r["key"] in keys]
    if bad.total:
        logger.warning("%s: %d bad lines skipped", path, bad.total)
    return rows


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns the results dict also written to ``results.json``.

    ``results["complete"]`` is False when some questions are still missing (policy endpoint failures): re-run the
    same command to fill them in.
    """
    from masksearch_rl.eval.report import results_dict, write_report

    items, skipped = load_items(config)
    out: Path = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / PREDICTIONS_FILE
    resuming = predictions.exists() and predictions.stat().st_size > 0
    mixed = check_fingerprint(out, fingerprint(config), resuming=resuming, force=config.force)
    tracker = start_run(config.tracking, "eval", {"method": config.method, **config.describe()})
    try:
        started = time.perf_counter()
        counters: Counter = Counter()
        all_items = [item for group in items.values() for item in group]
        with ResumableJsonlWriter(predictions, key="key") as writer:
            pending = [item for item in all_items if item.key not in writer.done]
            counters["resumed"] = len(all_items) - len(pending)
            if pending:
                logger.info("eval: %d questions to run, %d already done", len(pending), counters["resumed"])
                asyncio.run(_run_pending(config, pending, writer, counters))
        wanted = {item.key for item in all_items}
        records = read_predictions(predictions, wanted)
        summaries = summarize_all(records, order=(*PAPER_BENCHMARKS, *SEARCH_R1_BENCHMARKS))
        results = results_dict(config.method, summaries, config.describe(), model=_model_name(config.policy))
        missing = {d: len(group) - (summaries[d].n if d in summaries else 0) for d, group in items.items()}
        results.update({
            "complete": not any(missing.values()),
            "missing": missing,
            "load": skipped,
            "run": {**counters, "seconds": round(time.perf_counter() - started, 2)},
            "mixed_settings": mixed,  # settings that differ between predictions (forced resumes), else []
        })
        if config.judge is not None and any(s.judged < s.n for s in summaries.values()):
            logger.warning("judge scores only for some questions (judge added on a resumed run): no judge average")
        with atomic_path(out / RESULTS_FILE) as tmp:
            tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        results["report"] = write_report([results], out, plots=config.plots)
        _track(tracker, results, records, config.log_samples)
        return results
    finally:
        tracker.finish()


def _model_name(policy: PolicyConfig) -> str | None:
    return policy.model if policy.kind == "hf" else policy.llm.get("model")


# ---------------------------------------------------------------------------------------------------- W&B
SAMPLE_COLUMNS = (
    "dataset", "id", "question", "searches", "information", "answer", "gold", *ANSWER_METRICS, "judge",
    "num_searches", "num_turns", "finish",
)  # fmt: skip


def sample_rows(records: Sequence[dict[str, Any]], per_dataset: int) -> list[list[Any]]:
    """The first ``per_dataset`` trajectories of each benchmark as table rows (``SAMPLE_COLUMNS``)."""
    taken: Counter = Counter()
    rows = []
    for r in records:
        if taken[r["dataset"]] >= per_dataset:
            continue
        taken[r["dataset"]] += 1
        rows.append([
            r["dataset"], r["id"], r["question"], r.get("searches", []), r.get("information", []), r.get("answer"),
            r.get("answers", []), *(r["scores"][m] for m in ANSWER_METRICS), r["scores"].get("judge"),
            r.get("num_searches"), r.get("num_turns"), r.get("finish"),
        ])
    return rows


def _track(tracker: Any, results: dict[str, Any], records: list[dict[str, Any]], log_samples: int) -> None:
    from masksearch_rl.eval.metrics import AVERAGES
    from masksearch_rl.eval.report import TABLE_METRICS, average_columns, column_order, table_rows

    if not tracker.enabled:
        return
    metrics = {f"eval/{name}": values for name, values in results["datasets"].items()}
    metrics.update({f"eval/{key}": results[key] for key in AVERAGES})  # None (not logged) when not defined
    tracker.log(metrics)
    tracker.summary(metrics)
    columns = column_order([results])
    rows = [[metric, *row[1:]] for metric in TABLE_METRICS for row in table_rows([results], metric, columns)]
    tracker.log_table("eval/table", ["metric", *columns, *(name for _, _, name in average_columns([results]))], rows)
    per_dataset = max(1, log_samples // max(1, len(results["datasets"])))
    tracker.log_table("eval/trajectories", SAMPLE_COLUMNS, sample_rows(records, per_dataset))
    plots = results.get("report", {}).get("plots", [])
    if plots:
        tracker.log_images({f"eval/plots/{Path(p).stem}": p for p in plots})
