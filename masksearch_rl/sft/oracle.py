"""Oracle trajectories for RAMP items: scripted search episodes that teach a model the tag protocol (SFT warm-up).

Why: a freshly built (or small) model never writes ``<think>/<search>/<answer>`` on its own, so RL starts with a
format reward of zero everywhere and learns nothing. An oracle knows each item's source passage and its masked spans;
it searches for the passage with a query that really retrieves it from our index, and answers with the spans. Only
the *search results* are real (the index's top-k for that query, formatted exactly as the RL environment formats
them), so a trajectory is only kept when its evidence really holds the source passage.

Layout (the one ``masksearch-rl sft export`` writes for verl's MultiTurnSFTDataset, see docs/cot_sft.md)::

    system, user                              envs.prompts.ramp_messages (the RL prompt, word for word)
    assistant  <think> … </think>\\n<search> query </search>
    tool       <information>\\nDoc 1 (Title: …) …\\n</information>        (loss mask 0)
    [ a second search when the first query missed the passage ]
    assistant  <think> … </think>\\n<answer> span 1 | span 2 </answer>

Queries, tried in order until the source passage is in the top-k: the item's title; the title with the passage's
unmasked entities; the opening words of the masked passage with the masks removed. Each attempt is one round of
the trajectory (at most ``max_searches``). Deterministic: the same items, index and seed give the same records
(the wording of the thoughts is drawn per item from ``seed`` and the item id).

``hide_source`` (as ``ramp export --hide-source`` does for RL): the source passage and its duplicates are hidden
from every search, so it can never be found. The same queries are tried, and an item counts as found once the
information shown so far (as the policy reads it, budget cuts included) states every masked span, case and spacing
ignored: other passages carry the facts. The closing thought then says the results state the spans, and no rank is
recorded (``source_rank`` None). Items whose searches never show every span are not kept (unless ``keep_unfound``)
and are counted in the summary like any unfound item. Spans are matched as strings: a short span (a year) may
appear in a passage that says something else about it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from envs.prompts import (
    MASK_TOKEN,
    RAMP_INSTRUCTION,
    answer_block,
    information_block,
    mask_count_phrase,
    ramp_messages,
)
from envs.rollout import Segment, transcript_messages
from envs.search_client import DEFAULT_MAX_INFO_TOKENS, DEFAULT_TOPK, results_text
from masksearch_rl.jsonl import BadLines, atomic_path, write_jsonl
from masksearch_rl.ramp.source import source_exclusion, source_text
from masksearch_rl.records import OracleTrajectory, RampItem
from masksearch_rl.retrieval.exclusion import normalize
from masksearch_rl.retrieval.types import Hit, Retriever

DATA_SOURCE = "ramp"

FIRST_THOUGHTS = (
    "The text is about {title}. I need {n} missing {spans}, so I will search for the passage about {title}.",
    "To fill in {n} {mask_word} I need the original passage about {title}. Let me search for it.",
    "The missing {spans} should be in the source passage about {title}. I will look it up.",
)
RETRY_THOUGHT = "The passage about {title} is not among the results. I will try a more specific query."
FOUND_THOUGHT = "Doc {rank} is the passage about {title}. It gives the {n} missing {spans} in order."
NOT_FOUND_THOUGHT = "The results do not contain the passage about {title}. I will answer with my best guess."
# wording="fixed": one sentence per step and no copied names, for very small models (the quickstart's tiny one).
# The closing thoughts repeat the prompt's mask count, so the answer that follows has the right number of spans.
FIXED_THOUGHTS = {
    "first": "I will search for the source passage of this text.",
    "retry": "The source passage is not in the results. I will search again.",
    "found": "The results contain the source passage. I will fill in the {count} in order.",
    "not_found": "The results do not contain the source passage. I will guess the {count}.",
}
# hide_source: the source passage never comes back, so the later thoughts speak of the missing spans (both wordings).
HIDDEN_THOUGHTS = {
    "retry": "The results do not give the words for the {count}. I will search again.",
    "found": "The results give the words for the {count}. I will fill them in in order.",
    "not_found": "The results do not give the words for the {count}. I will guess them.",
}


@dataclass(frozen=True)
class OracleConfig:
    """``topk`` and ``max_info_tokens`` match the RL environment (``search_env.topk``, ``search_env.max_info_tokens``).

    ``max_info_tokens`` counts tokens of ``tokenizer`` (a tokenizer name or path: the policy's, as the RL
    environment truncates with the policy's tokenizer), or words when no tokenizer is given.
    """

    topk: int = DEFAULT_TOPK
    max_info_tokens: int = DEFAULT_MAX_INFO_TOKENS
    tokenizer: str | None = None
    max_searches: int = 2
    seed: int = 0
    # Keep trajectories whose searches never returned the source passage (their answer is then unsupported).
    keep_unfound: bool = False
    # Same default as the RL parquet export: the SFT validation items are the RL validation items.
    val_fraction: float = 0.05
    limit: int | None = None
    # "varied": thoughts name the subject, three wordings drawn per item; "fixed": FIXED_THOUGHTS.
    wording: str = "varied"
    # Hide each item's source passage from its searches, as the RL export's hide_source does (module docstring).
    hide_source: bool = False
    # The queries tried in turn (see candidate_queries): "title", "title_entities" (the title and up to three of the
    # passage's unmasked entities), "opening" (the first ``opening_words`` words of the masked text, masks left out).
    queries: tuple[str, ...] = ("title", "title_entities", "opening")
    opening_words: int = 12

    def __post_init__(self) -> None:
        if self.wording not in ("varied", "fixed"):
            raise ValueError(f"wording must be 'varied' or 'fixed', got {self.wording!r}")
        object.__setattr__(self, "queries", tuple(self.queries))
        unknown = [q for q in self.queries if q not in QUERY_STRATEGIES]
        if unknown or not self.queries:
            raise ValueError(f"queries must be a non-empty list of {QUERY_STRATEGIES}, got {list(self.queries)}")
        if self.opening_words < 1:
            raise ValueError(f"opening_words must be >= 1, got {self.opening_words}")
        if self.topk < 1 or self.max_searches < 1 or self.max_info_tokens < 1:
            raise ValueError(f"topk, max_searches and max_info_tokens must be >= 1: {self}")


QUERY_STRATEGIES = ("title", "title_entities", "opening")


def opening_query(masked_text: str, words: int = 12) -> str:
    """The first ``words`` words of a masked text, its masks left out: a query that a model can copy verbatim."""
    return " ".join(masked_text.replace(MASK_TOKEN, " ").split()[:words])


def candidate_queries(
    item: RampItem, max_queries: int, strategies: tuple[str, ...] = QUERY_STRATEGIES, opening_words: int = 12
) -> list[str]:
    """Queries that should retrieve the item's source passage, in the order of ``strategies``, without repeats."""
    title = str(item.get("title") or "").strip()
    masks = {str(m).strip().lower() for m in item["masks"]}
    entities = [str(e).strip() for e in item.get("entities") or []]
    unmasked = [e for e in entities if e and e.lower() not in masks and e.lower() != title.lower()]
    by_strategy = {
        "title": title,
        "title_entities": " ".join([title, *unmasked[:3]]).strip(),
        "opening": opening_query(str(item["query"]), opening_words),
    }
    candidates = [by_strategy[strategy] for strategy in strategies]
    unique: list[str] = []
    for query in candidates:
        query = " ".join(query.split())
        if query and query not in unique:
            unique.append(query)
    return unique[:max_queries]


def source_rank(item: RampItem, hits: list[Hit]) -> int | None:
    """1-based rank of the item's source passage among ``hits`` (same id, or the same text), None when absent."""
    passage = " ".join(source_text(item).split())
    for rank, hit in enumerate(hits, start=1):
        if hit.id == str(item["id"]) or (passage and " ".join(hit.text.split()) == passage):
            return rank
    return None


def spans_shown(item: RampItem, information: list[str]) -> bool:
    """Whether every masked span is written in ``information`` (the result texts shown), case and spacing ignored."""
    shown = normalize(" ".join(information))
    return all(normalize(str(mask)) in shown for mask in item["masks"])


def evidence(
    item: RampItem, rounds: list[tuple[str, list[Hit]]], config: OracleConfig, tokenizer: Any | None = None
) -> tuple[bool, int | None]:
    """``(found, source_rank)`` after ``rounds``: the source passage's rank in the last round's hits or, with
    ``hide_source``, whether the information shown so far states every span (no rank then)."""
    if not config.hide_source:
        rank = source_rank(item, rounds[-1][1]) if rounds else None
        return rank is not None, rank
    shown = [results_text(hits, config.max_info_tokens, tokenizer) for _, hits in rounds]
    return spans_shown(item, shown), None


def search_rounds(retriever: Retriever, items: list[RampItem], queries: list[str], config: OracleConfig
                  ) -> list[list[Hit]]:
    """One batched search, query ``i`` for item ``i``; with ``hide_source`` each item's source is hidden."""
    if not config.hide_source:
        return [list(hits) for hits in retriever.search(queries, config.topk)]
    exclusions = [source_exclusion(item) for item in items]
    results = retriever.search(queries, max(e.fetch_k(config.topk) for e in exclusions))
    return [exclusion.keep(list(hits), config.topk) for exclusion, hits in zip(exclusions, results)]


def _wording(item_id: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x1f{item_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def build_trajectory(
    item: RampItem, rounds: list[tuple[str, list[Hit]]], config: OracleConfig, tokenizer: Any | None = None
) -> OracleTrajectory:
    """The trajectory record for ``item`` given the searches made (query and its hits, in order).

    ``tokenizer`` (the loaded ``config.tokenizer``) makes the information budget count tokens, as the RL env does.
    """
    masks = [str(m) for m in item["masks"]]
    n = len(masks)
    words = {"title": item.get("title") or "the subject", "n": n, "spans": "spans" if n > 1 else "span",
             "mask_word": "masks" if n > 1 else "mask"}
    rng = _wording(str(item["id"]), config.seed)
    count = mask_count_phrase(n)
    segments: list[Segment] = []
    for attempt, (query, hits) in enumerate(rounds):
        if attempt > 0 and config.hide_source:
            thought = HIDDEN_THOUGHTS["retry"].format(count=count)
        elif config.wording == "fixed":
            thought = FIXED_THOUGHTS["first" if attempt == 0 else "retry"]
        else:
            thought = (rng.choice(FIRST_THOUGHTS) if attempt == 0 else RETRY_THOUGHT).format(**words)
        segments.append(Segment("policy", f"<think> {thought} </think>\n<search> {query} </search>"))
        segments.append(Segment("info", information_block(results_text(hits, config.max_info_tokens, tokenizer))))
    found, rank = evidence(item, rounds, config, tokenizer)
    outcome = "found" if found else "not_found"
    if config.hide_source:
        final = HIDDEN_THOUGHTS[outcome].format(count=count)
    elif config.wording == "fixed":
        final = FIXED_THOUGHTS[outcome].format(count=count)
    else:
        final = (FOUND_THOUGHT if found else NOT_FOUND_THOUGHT).format(rank=rank, **words)
    segments.append(Segment("policy", f"<think> {final} </think>\n{answer_block(masks)}"))
    prompt = ramp_messages(str(item["query"]), instruction=item.get("instruction") or RAMP_INSTRUCTION)
    return {
        "id": str(item["id"]),
        "data_source": DATA_SOURCE,
        "keep": found or config.keep_unfound,
        "found": found,
        "source_rank": rank,
        "hide_source": config.hide_source,
        "queries": [query for query, _ in rounds],
        "num_searches": len(rounds),
        "num_masks": n,
        "answer": masks,
        "messages": [*prompt, *transcript_messages(segments)],
        # What the RL loop would decode after the prompt (information blocks inline): what reward/ scores.
        "response": "".join(segment.text for segment in segments),
        "generator": "oracle",
    }


def oracle_trajectories(
    items: list[RampItem], retriever: Retriever, config: OracleConfig
) -> list[OracleTrajectory]:
    """One trajectory per item; searches are batched per round (all items' first queries, then the misses')."""
    tokenizer = None
    if config.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    candidates = [candidate_queries(item, config.max_searches, config.queries, config.opening_words) for item in items]
    rounds: list[list[tuple[str, list[Hit]]]] = [[] for _ in items]
    pending = list(range(len(items)))
    for attempt in range(config.max_searches):
        asking = [i for i in pending if attempt < len(candidates[i])]
        if not asking:
            break
        results = search_rounds(retriever, [items[i] for i in asking], [candidates[i][attempt] for i in asking],
                                config)
        pending = []
        for i, hits in zip(asking, results):
            rounds[i].append((candidates[i][attempt], hits))
            if not evidence(items[i], rounds[i], config, tokenizer)[0]:
                pending.append(i)
    return [build_trajectory(item, item_rounds, config, tokenizer) for item, item_rounds in zip(items, rounds)]


def write_oracle_sft(
    ramp_items: str | Path, index_dir: str | Path, out_dir: str | Path, config: OracleConfig = OracleConfig()
) -> dict[str, Any]:
    """RAMP items + index -> ``out_dir/{trajectories.jsonl, train.parquet, val.parquet, summary.json}``.

    Returns the summary: counts, how often the source passage was found (and at which rank / after how many
    searches; with ``hide_source``: how often the results stated every span), the ids of items not found, and the
    export's counts.
    """
    from masksearch_rl.ramp.export import load_items
    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.export import export_sft

    bad = BadLines()
    items, duplicates = load_items(ramp_items, bad)
    if config.limit is not None:
        items = items[: config.limit]
    if not items:
        raise ValueError(f"{ramp_items}: no valid RAMP items ({bad.summary()})")
    records = oracle_trajectories(items, load_index(index_dir), config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "trajectories.jsonl", records)
    export = export_sft([out / "trajectories.jsonl"], out, config.val_fraction, config.seed)
    found = [r for r in records if r["found"]]
    summary = {
        "items": len(records),
        "found": len(found),
        "found_rate": round(len(found) / len(records), 4),
        "kept": sum(r["keep"] for r in records),
        "source_rank": dict(sorted(Counter(r["source_rank"] for r in found if r["source_rank"]).items())),
        "searches": dict(sorted(Counter(r["num_searches"] for r in records).items())),
        "not_found_ids": [r["id"] for r in records if not r["found"]][:100],
        "duplicates_skipped": duplicates,
        "bad_lines": bad.summary(),
        "export": export,
        "config": asdict(config),
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------ QA questions
QA_THOUGHTS = {
    "first": "I will search for the answer to this question.",
    "next": "I need one more fact. I will search again.",
    "found": "The results contain the answer.",
    "not_found": "The results do not contain the answer. I will guess.",
}
QA_QUERY_STRATEGIES = ("question", "oracle")


def qa_oracle_trajectories(
    questions: list[dict[str, Any]], retriever: Retriever, config: OracleConfig, strategy: str = "oracle"
) -> list[OracleTrajectory]:
    """Scripted episodes for QA records (``id``, ``question``, ``answer`` [, ``oracle_queries``]), one per record.

    ``strategy="oracle"`` searches each hop's ``oracle_queries`` in turn (the synthetic world writes them);
    ``"question"`` searches the question itself once. Only the search results are real: a record is ``found`` (and
    kept, unless ``keep_unfound``) when the information shown states the answer, case and spacing ignored.
    Fixed thoughts (:data:`QA_THOUGHTS`), as ``wording="fixed"`` gives RAMP trajectories.
    """
    from envs.prompts import qa_messages

    if strategy not in QA_QUERY_STRATEGIES:
        raise ValueError(f"strategy must be one of {QA_QUERY_STRATEGIES}, got {strategy!r}")
    tokenizer = None
    if config.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    plans = [
        [str(q) for q in record.get("oracle_queries") or []][: config.max_searches] if strategy == "oracle"
        else [str(record["question"])]
        for record in questions
    ]
    shown: list[list[str]] = [[] for _ in questions]
    for hop in range(max((len(plan) for plan in plans), default=0)):
        asking = [i for i, plan in enumerate(plans) if hop < len(plan)]
        results = retriever.search([plans[i][hop] for i in asking], config.topk)
        for i, hits in zip(asking, results):
            shown[i].append(results_text(list(hits), config.max_info_tokens, tokenizer))
    records = []
    for record, plan, texts in zip(questions, plans, shown):
        answer = str(record["answer"])
        found = bool(texts) and normalize(answer) in normalize(" ".join(texts))
        segments: list[Segment] = []
        for hop, (query, text) in enumerate(zip(plan, texts)):
            thought = QA_THOUGHTS["first" if hop == 0 else "next"]
            segments.append(Segment("policy", f"<think> {thought} </think>\n<search> {query} </search>"))
            segments.append(Segment("info", information_block(text)))
        final = QA_THOUGHTS["found" if found else "not_found"]
        segments.append(Segment("policy", f"<think> {final} </think>\n{answer_block(answer)}"))
        records.append({
            "id": str(record["id"]),
            "data_source": str(record.get("data_source") or "synthetic_qa"),
            "keep": found or config.keep_unfound,
            "found": found,
            "queries": plan,
            "num_searches": len(plan),
            "answer": answer,
            "messages": [*qa_messages(str(record["question"])), *transcript_messages(segments)],
            "response": "".join(segment.text for segment in segments),
            "generator": "oracle",
        })
    return records


def spans_of(answer_text: str) -> list[str]:
    """The spans of an ``<answer>`` body as written by :func:`envs.prompts.answer_block` (for checks and tests)."""
    return [span.strip() for span in re.split(r"\s\|\s", answer_text.strip())]
