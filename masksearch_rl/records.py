"""Typed records: every on-disk and on-wire record of the project, one ``TypedDict`` each (docs/formats.md tells,
field by field, what they mean and which module writes and reads each).

Annotations only: the code that writes and reads these records passes plain dicts (JSON lines, parquet rows, HTTP
bodies), and nothing here checks them at run time; tests/test_formats.py builds one real record of each kind with
the project's own writers and checks its keys against these declarations (required keys present, no unknown key).

A base utility: imports nothing from the project, so every floor may use it. No ``from __future__ import
annotations`` here: TypedDict reads ``NotRequired`` from evaluated annotations.
"""

import sys
from typing import Any

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired, TypedDict


class Message(TypedDict):
    """One chat message: ``role`` system | user | assistant | tool."""

    role: str
    content: str


# ------------------------------------------------------------------------------------------ corpus and world
class EntityRecord(TypedDict):
    """An annotated entity of a passage (the synthetic world's): its surface ``text`` and ``type``."""

    text: str
    type: str


class PassageRecord(TypedDict):
    """A line of a corpus JSONL (FlashRAG / Search-R1's convention): ``contents`` is ``"Title"\\ntext``."""

    id: str
    contents: str
    title: NotRequired[str]
    entities: NotRequired[list[EntityRecord]]
    # Read when present (instead of / over the title and text split from ``contents``); not written by us.
    text: NotRequired[str]
    source: NotRequired[str]


class SyntheticQuestion(TypedDict):
    """A line of the synthetic world's ``questions.jsonl``: a multi-hop question over its passages."""

    id: str
    question: str
    answer: str
    hops: int
    chain: list[str]
    supporting_ids: list[str]
    oracle_queries: list[str]
    relations: list[str]
    answer_type: str


# ------------------------------------------------------------------------------------------------- RAMP items
class RampItem(TypedDict):
    """A line of a RAMP items JSONL: a passage with ``num_masks`` ``[mask]`` tokens in ``query``."""

    id: str
    title: str
    passage: str
    query: str
    instruction: str
    masks: list[str]
    num_masks: int
    entities: list[str]
    mask_types: list[str]
    source: str | None
    extractor: str
    selection: str
    seed: int
    mask_scores: NotRequired[list[float]]  # only when spans were chosen by perplexity (selection "ppl")


# ------------------------------------------------------------------------------------------ verl RL parquet
class SearchCreateKwargs(TypedDict):
    item_id: str
    exclude: NotRequired[dict[str, list[str]]]  # {"ids": [...], "texts": [...]}: hide the source (hide_source)


class ToolKwargs(TypedDict):
    create_kwargs: SearchCreateKwargs


class GroundTruth(TypedDict):
    """``target``: the golds (RAMP: the spans in order; QA: the accepted answers)."""

    target: list[str]
    masks: NotRequired[list[str]]  # RAMP
    masked_passage: NotRequired[str]  # RAMP: the prompt's masked text


class RewardModelField(TypedDict):
    style: str
    ground_truth: GroundTruth


class ExtraInfo(TypedDict):
    index: int
    id: str
    split: str
    tools_kwargs: dict[str, ToolKwargs]  # {tool name: ...}
    num_masks: NotRequired[int]  # RAMP
    question: NotRequired[str]  # QA: the judge reads it


class RLRow(TypedDict):
    """A row of a verl RL parquet (RAMP or QA)."""

    data_source: str
    prompt: list[Message]
    ability: str
    reward_model: RewardModelField
    extra_info: ExtraInfo
    agent_name: str


# ------------------------------------------------------------------------------------- trajectories and SFT
class OracleTrajectory(TypedDict):
    """A line of ``sft oracle``'s ``trajectories.jsonl`` (RAMP), or of the lab's QA oracle trajectories."""

    id: str
    data_source: str
    keep: bool
    found: bool
    queries: list[str]
    num_searches: int
    answer: list[str] | str
    messages: list[Message]
    response: str
    generator: str
    source_rank: NotRequired[int | None]  # RAMP
    hide_source: NotRequired[bool]  # RAMP
    num_masks: NotRequired[int]  # RAMP


class CotTrace(TypedDict):
    """A line of a CoT construction output (``cot build``; self-evolve's teacher writes the same record)."""

    id: str
    data_source: str
    kind: str
    status: str
    reason: str
    keep: bool
    answer: str | None
    gold: list[list[str]]
    num_masks: int | None
    judge: dict[str, Any] | None
    num_searches: int
    messages: list[Message]
    response: str
    log: list[dict[str, Any]]
    latency_s: float
    generator: str
    format: NotRequired[str]  # self-evolve: check_format's label of the response


class SftRow(TypedDict):
    """A row of an SFT parquet (verl's MultiTurnSFTDataset reads ``messages``)."""

    messages: list[Message]
    data_source: str
    id: str
    num_masks: NotRequired[int]  # train split of a curriculum export
    curriculum_stage: NotRequired[int]  # train split of a curriculum export


# ------------------------------------------------------------------------------------------------ evaluation
class Prediction(TypedDict):
    """A line of ``eval run``'s ``predictions.jsonl``: one finished episode and its scores."""

    key: str
    dataset: str
    id: str
    question: str
    answers: list[str]
    answer: str | None
    finish: str
    num_searches: int
    num_turns: int
    searches: list[str]
    information: list[str]
    raw: str
    scores: dict[str, float]
    judge_error: str | None
    search_errors: int
    latency_s: float


class EvalResults(TypedDict):
    """``eval run``'s ``results.json``."""

    method: str
    model: str | None
    config: dict[str, Any]
    order: list[str]
    datasets: dict[str, dict[str, Any]]
    average: dict[str, Any] | None
    average_search_r1: dict[str, Any] | None
    average_run: dict[str, Any] | None
    complete: bool
    missing: dict[str, int]
    load: dict[str, Any]
    run: dict[str, Any]
    mixed_settings: list[Any]


# ------------------------------------------------------------------------------- retrieval (POST /retrieve)
class Exclusion(TypedDict, total=False):
    ids: list[str]
    texts: list[str]


class RetrieveRequest(TypedDict):
    """The body of ``POST /retrieve`` (Search-R1's, plus ``exclude``)."""

    queries: list[str]
    topk: NotRequired[int | None]
    return_scores: NotRequired[bool]
    exclude: NotRequired[Exclusion | None]


class RetrievedDoc(TypedDict):
    id: str
    title: str
    text: str
    contents: str


class ScoredDoc(TypedDict):
    document: RetrievedDoc
    score: float


class RetrieveResponse(TypedDict):
    """One list of hits per query: :class:`ScoredDoc` with ``return_scores``, else the bare :class:`RetrievedDoc`."""

    result: list[list[ScoredDoc | RetrievedDoc]]


# ------------------------------------------------------------------------------------------------------ lab
class LabLearning(TypedDict):
    """The lab's ``learning.json``."""

    command: str
    date: str
    config: dict[str, Any]
    data: dict[str, Any]
    policy: dict[str, Any]
    arms: dict[str, Any]
    timings: dict[str, float]
    bar: NotRequired[dict[str, Any] | None]  # added by write_results
