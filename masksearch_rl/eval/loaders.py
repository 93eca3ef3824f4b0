"""Benchmark loaders: the paper's QA sets (and Search-R1's) from local files in their public formats.

Why one reader for all of them: every benchmark is "a question and the acceptable answers"; they differ only in
the file container (JSON list, JSONL, CSV, Parquet) and in the field names. Each :class:`Benchmark` names its
fields; :func:`load_benchmark` reads any container and turns each record into a :class:`QAItem`. A record without
a question or an answer raises :class:`BenchmarkFormatError` naming the file, the line (or row) and the field, or,
with ``bad=BadLines()``, is skipped and counted.

Formats understood (each benchmark also reads the FlashRAG / Search-R1 JSONL ``{"id", "question",
"golden_answers"}`` and the MaskSearch sample JSONL ``{"idx", "question", "answer"}``):

=============  ==========================================================================================
hotpotqa       ``hotpot_dev_distractor_v1.json`` (JSON list: ``_id``, ``question``, ``answer``)
fanoutqa       ``fanout-final-dev.json`` (``id``, ``question``, ``answer`` as str / number / list / dict: the
               values are joined into one gold string, so token recall is the share of the parts found)
musique        ``musique_ans_v1.0_dev.jsonl`` (``answer`` + ``answer_aliases``; ``answerable: false`` items of
               the full set are skipped and counted)
2wiki          2WikiMultiHopQA ``dev.json`` (JSON list: ``_id``, ``question``, ``answer``)
bamboogle      the public sheet as CSV (``Question``, ``Answer``)
freshqa        ``FreshQA_v*.csv`` (notes above the header row are skipped; ``answer_0`` .. ``answer_9``)
nq             NQ-open JSONL (``question``, ``answer``: list)
triviaqa       TriviaQA JSON (``{"Data": [{"QuestionId", "Question", "Answer": {"Value", "Aliases"}}]}``) or the
               Hugging Face parquet (``question_id``, ``question``, ``answer: {"value", "aliases", ...}``)
popqa          PopQA TSV/CSV/JSONL (``question``, ``possible_answers``: a JSON list in a string)
=============  ==========================================================================================
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksearch_rl.jsonl import BadLines

logger = logging.getLogger(__name__)


class BenchmarkFormatError(ValueError):
    """A benchmark file or record that cannot be read; the message names the file, line/row and field."""


@dataclass(frozen=True)
class QAItem:
    """One evaluation question. ``answers`` holds every acceptable answer (aliases); metrics take the best."""

    dataset: str
    id: str
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Unique across datasets: the resume key of the predictions file."""
        return f"{self.dataset}/{self.id}"


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark keeps its fields. Candidates are tried in order; the first present one is used."""

    name: str
    title: str  # column header of the results table
    in_domain: bool = False
    id_fields: tuple[str, ...] = ("id", "_id", "idx", "qid", "QuestionId", "question_id")
    question_fields: tuple[str, ...] = ("question", "Question", "query")
    answer_fields: tuple[str, ...] = ("golden_answers", "answers", "answer", "Answer")
    alias_fields: tuple[str, ...] = ()  # extra aliases added to the answers when present
    file_names: tuple[str, ...] = ()  # substrings of file names that identify the benchmark (lower case)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("hotpotqa", "HotpotQA", in_domain=True, file_names=("hotpot",)),
        Benchmark("fanoutqa", "FanoutQA", file_names=("fanout",)),
        Benchmark("musique", "Musique", alias_fields=("answer_aliases",), file_names=("musique",)),
        Benchmark("2wiki", "2Wiki", file_names=("2wiki", "2_wiki", "wikimultihop")),
        Benchmark("bamboogle", "Bamboogle", file_names=("bamboogle",)),
        Benchmark(
            "freshqa", "FreshQA",
            answer_fields=("golden_answers", "answers", "answer", *(f"answer_{i}" for i in range(10))),
            file_names=("freshqa",),
        ),
        Benchmark("nq", "NQ", file_names=("nq", "natural_questions", "natural-questions")),
        Benchmark("triviaqa", "TriviaQA", file_names=("trivia",)),
        Benchmark(
            "popqa", "PopQA", answer_fields=("golden_answers", "possible_answers", "answers", "answer"),
            file_names=("popqa",),
        ),
    )
}
# The column order of the MaskSearch paper's Table 2: in-domain first, then out-of-domain.
PAPER_BENCHMARKS = ("hotpotqa", "fanoutqa", "musique", "2wiki", "bamboogle", "freshqa")
SEARCH_R1_BENCHMARKS = ("nq", "triviaqa", "popqa")

ALIASES = {
    "hotpot": "hotpotqa", "2wikimultihopqa": "2wiki", "2wikimqa": "2wiki", "wikimultihopqa": "2wiki",
    "fanout": "fanoutqa", "natural_questions": "nq", "nq_open": "nq", "trivia": "triviaqa", "musique_ans": "musique",
}  # fmt: skip


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (case-insensitive, common spellings accepted)."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise BenchmarkFormatError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def infer_benchmark(path: str | os.PathLike) -> Benchmark:
    """The benchmark a file is named after (``hotpotqa_500.jsonl`` -> hotpotqa)."""
    stem = Path(path).name.lower()
    matches = [b for b in BENCHMARKS.values() if any(part in stem for part in b.file_names)]
    # "nq" is a short substring: prefer any longer match.
    matches.sort(key=lambda b: -max(len(p) for p in b.file_names if p in stem))
    if not matches:
        raise BenchmarkFormatError(
            f"{path}: cannot tell the benchmark from the file name; name it (e.g. --data hotpotqa={path}); "
            f"known: {', '.join(BENCHMARKS)}"
        )
    return matches[0]


def parse_data_spec(spec: str) -> tuple[Benchmark, Path]:
    """``name=path`` or a bare path (benchmark inferred from the file name)."""
    name, sep, path = spec.partition("=")
    if sep and not Path(spec).exists():
        return get_benchmark(name), Path(path)
    return infer_benchmark(spec), Path(spec)


# --------------------------------------------------------------------------------------------------- containers
def iter_records(path: str | os.PathLike, bad: BadLines | None = None) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` for each record of a JSONL, JSON, CSV/TSV or Parquet file.

    ``location`` is ``file:line`` (JSONL, CSV) or ``file:item N`` (JSON list, Parquet row), for error messages.
    A JSONL line that is not JSON is a bad line (raised, or counted in ``bad``); a whole file that cannot be
    read raises.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, bad)
    elif suffix == ".json":
        yield from _json_records(path)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pandas as pd

        for number, record in enumerate(pd.read_parquet(path).to_dict("records"), start=1):
            yield f"{path}:row {number}", record
    else:
        raise BenchmarkFormatError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv, .parquet)")


def _jsonl_records(path: Path, bad: BadLines | None) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({err.msg} at column {err.colno})"
                if bad is None:
                    raise BenchmarkFormatError(f"{path}:{lineno}: {reason}") from err
                bad.add(path, lineno, reason)


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if isinstance(data, Mapping):
        # TriviaQA {"Data": [...]}, some dumps {"data": [...]}
        for key in ("Data", "data", "questions", "examples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise BenchmarkFormatError(
                f"{path}: expected a JSON list of items or an object with a 'Data'/'data' list, got keys "
                f"{sorted(data)[:8]}"
            )
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield f"{path}:item {number}", record


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    """Rows as dicts. Lines above the header (FreshQA puts notes there) are skipped: the header is the first row
    naming a question column."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        header: list[str] | None = None
        for row in rows:
            if any(cell.strip().lower() in ("question", "query") for cell in row):
                header = [cell.strip() for cell in row]
                break
        if header is None:
            raise BenchmarkFormatError(f"{path}: no header row with a 'question' column")
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            yield f"{path}:{rows.line_num}", dict(zip(header, row))


# ------------------------------------------------------------------------------------------------------ records
def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN from pandas
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if hasattr(value, "__len__"):
        return len(value) > 0
    return True


def _flatten_answer(value: Any) -> list[str]:
    """Answer values as strings. Lists are aliases; a JSON list inside a string (PopQA) is parsed with json."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return [s for item in parsed for s in _flatten_answer(item)]
        return [text] if text else []
    if isinstance(value, Mapping):
        # TriviaQA: the original JSON spells Value/Aliases, the Hugging Face parquet value/aliases (next to
        # normalized_* and entity fields, which are not answers).
        for value_key, aliases_key in (("Value", "Aliases"), ("value", "aliases")):
            if value_key in value or aliases_key in value:
                return _flatten_answer([value.get(value_key), value.get(aliases_key)])
        return [", ".join(s for v in value.values() for s in _flatten_answer(v))]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _flatten_answer(item)]
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    return [str(value)] if _present(value) else []


def _fanout_answer(value: Any) -> list[str]:
    """FanoutQA's answer is one (possibly composite) answer, not a list of aliases: its parts are joined."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple, Mapping)):
        joined = ", ".join(_flatten_answer(list(value.values()) if isinstance(value, Mapping) else value))
        return [joined] if joined else []
    return _flatten_answer(value)


def parse_record(benchmark: Benchmark, record: Any, location: str, number: int) -> QAItem | None:
    """A :class:`QAItem`, or None for an item the benchmark itself marks as not to be evaluated (unanswerable
    Musique items). Raises :class:`BenchmarkFormatError` naming ``location`` and the missing field."""
    if not isinstance(record, Mapping):
        raise BenchmarkFormatError(f"{location}: expected an object (dict), got {type(record).__name__}")
    if benchmark.name == "musique" and record.get("answerable") is False:
        return None
    question = next((record[f] for f in benchmark.question_fields if _present(record.get(f))), None)
    if question is None:
        raise BenchmarkFormatError(
            f"{location}: {benchmark.name} item has no field 'question' (looked for {list(benchmark.question_fields)})"
        )
    answers: list[str] = []
    if benchmark.name == "freshqa":
        fields = [f for f in benchmark.answer_fields if _present(record.get(f))]
    else:
        fields = [next((f for f in benchmark.answer_fields if _present(record.get(f))), None)]
        fields = [f for f in fields if f is not None]
    for name in [*fields, *(f for f in benchmark.alias_fields if _present(record.get(f)))]:
        read = _fanout_answer if benchmark.name == "fanoutqa" else _flatten_answer
        answers += read(record[name])
    answers = list(dict.fromkeys(a for a in answers if a.strip()))
    if not answers:
        raise BenchmarkFormatError(
            f"{location}: {benchmark.name} item has no field 'answer' (looked for {list(benchmark.answer_fields)}) "
            "or it is empty"
        )
    item_id = next((record[f] for f in benchmark.id_fields if _present(record.get(f))), number)
    meta = {k: record[k] for k in ("type", "level", "hops", "split", "false_premise", "num_hops") if k in record}
    return QAItem(benchmark.name, str(item_id), " ".join(str(question).split()), tuple(answers), meta)


@dataclass
class LoadReport:
    """What loading a file skipped: bad records (with ``bad``) and items the benchmark excludes."""

    loaded: int = 0
    excluded: int = 0
    duplicates: int = 0
    bad: BadLines = field(default_factory=BadLines)


def load_benchmark(
    path: str | os.PathLike,
    benchmark: str | Benchmark | None = None,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    report: LoadReport | None = None,
) -> list[QAItem]:
    """Items of one benchmark file, in file order (the first of duplicate ids kept).

    ``benchmark`` defaults to the one named by the file. Bad records raise :class:`BenchmarkFormatError` unless
    ``skip_bad``: then they are skipped, counted and logged in ``report.bad``. ``limit`` keeps the first N items.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else (
        get_benchmark(benchmark) if benchmark else infer_benchmark(path)
    )
    report = report if report is not None else LoadReport()
    items: list[QAItem] = []
    seen: set[str] = set()
    for number, (location, record) in enumerate(iter_records(path, report.bad if skip_bad else None), start=1):
        try:
            item = parse_record(bench, record, location, number)
        except BenchmarkFormatError as err:
            if not skip_bad:
                raise
            report.bad.add(path, _line_of(location, number), str(err).removeprefix(f"{location}: "))
            continue
        if item is None:
            report.excluded += 1
            continue
        if item.id in seen:
            report.duplicates += 1
            continue
        seen.add(item.id)
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise BenchmarkFormatError(f"{path}: no {bench.name} items could be read")
    report.loaded = len(items)
    if report.excluded:
        logger.info("%s: %d %s items excluded by the benchmark (e.g. unanswerable)", path, report.excluded, bench.name)
    return items


def _line_of(location: str, number: int) -> int:
    match = re.search(r"(\d+)$", location)
    return int(match.group(1)) if match else number
