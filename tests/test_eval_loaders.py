"""Benchmark loaders on the shared samples, on each public format, and on malformed files; the val parquet export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from masksearch_rl.eval.export import export_parquet
from masksearch_rl.eval.loaders import (
    BENCHMARKS,
    PAPER_BENCHMARKS,
    BenchmarkFormatError,
    LoadReport,
    get_benchmark,
    infer_benchmark,
    load_benchmark,
    parse_data_spec,
)

SHARED_QA = Path(os.environ["MASKSEARCH_SHARED_DATA"]) / "qa"  # tests/conftest.py


@pytest.mark.parametrize("file,name", [("hotpotqa_500.jsonl", "hotpotqa"), ("2wiki_500.jsonl", "2wiki"),
                                       ("musique_500.jsonl", "musique")])
@pytest.mark.shared_data
def test_shared_samples_load_completely(file, name):
    path = SHARED_QA / file
    raw = [json.loads(line) for line in open(path)]
    items = load_benchmark(path)
    assert len(items) == len(raw) == 500
    assert {i.dataset for i in items} == {name}
    assert items[0].id == str(raw[0]["idx"]) and items[0].question == " ".join(raw[0]["question"].split())
    assert items[0].answers == (raw[0]["answer"],)
    assert len({i.key for i in items}) == 500
    assert load_benchmark(path, limit=7)[-1].id == str(raw[6]["idx"])


def test_public_formats(tmp_path):
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(
        [{"_id": "5a8b", "question": "Which team?", "answer": "Chiefs", "type": "bridge", "level": "hard",
          "context": [], "supporting_facts": []}]))
    (tmp_path / "fanout-final-dev.json").write_text(json.dumps([
        {"id": "f1", "question": "Ages?", "answer": {"Alice": 31, "Bob": "40"}, "decomposition": []},
        {"id": "f2", "question": "Which?", "answer": ["x", "y"]},
        {"id": "f3", "question": "How many?", "answer": 3},
    ]))
    (tmp_path / "musique_ans_v1.0_dev.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "2hop_1", "question": "Who?", "answer": "Ann Lee", "answer_aliases": ["A. Lee"], "answerable": True},
        {"id": "2hop_2", "question": "What?", "answer": "", "answer_aliases": [], "answerable": False},
    ]))
    (tmp_path / "2wiki_dev.json").write_text(json.dumps([{"_id": "w1", "question": "When?", "answer": "1990",
                                                          "type": "comparison"}]))
    (tmp_path / "bamboogle.csv").write_text('Question,Answer\n"Who was president, then?",George Washington\n')
    (tmp_path / "FreshQA_v12182023.csv").write_text(
        "FreshQA (Dec 2023),,,\nnote,,,\n"
        "id,split,question,false_premise,answer_0,answer_1,answer_2\n"
        "0,TEST,What is the tallest tower?,FALSE,Burj Khalifa,the Burj Khalifa,\n")
    (tmp_path / "nq-open-dev.jsonl").write_text(json.dumps({"question": "who sang it", "answer": ["Prince", "P"]}))
    (tmp_path / "triviaqa-unfiltered-dev.json").write_text(json.dumps({"Version": 1, "Data": [
        {"QuestionId": "tc_1", "Question": "Capital of France?", "Answer": {"Value": "Paris", "Aliases": ["Paree"]}}]}))
    # The Hugging Face trivia_qa parquet: lower-case answer struct with normalised aliases and entity fields.
    pd.DataFrame([{
        "question": "Which city is the capital of France?", "question_id": "tc_2", "question_source": "http://x",
        "answer": {"aliases": ["Paree", "City of Light"], "normalized_aliases": ["paree", "city of light", "paris"],
                   "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                   "normalized_value": "paris", "type": "WikipediaEntity", "value": "Paris"},
    }]).to_parquet(tmp_path / "trivia_qa-validation.parquet")
    (tmp_path / "popqa.tsv").write_text('id\tquestion\tpossible_answers\n7\tWhat is X?\t["a b", "c"]\n')
    (tmp_path / "bamboogle_flashrag.jsonl").write_text(
        json.dumps({"id": "test_0", "question": "Q?", "golden_answers": ["g1", "g2"]}))

    def only(path, name=None, **kw):
        items = load_benchmark(tmp_path / path, name, **kw)
        return items if len(items) > 1 else items[0]

    hotpot = only("hotpot_dev_distractor_v1.json")
    assert (hotpot.dataset, hotpot.id, hotpot.answers, hotpot.meta) == (
        "hotpotqa", "5a8b", ("Chiefs",), {"type": "bridge", "level": "hard"})
    fan = only("fanout-final-dev.json")
    assert [f.answers for f in fan] == [("31, 40",), ("x, y",), ("3",)]  # one composite answer, values joined
    report = LoadReport()
    musique = load_benchmark(tmp_path / "musique_ans_v1.0_dev.jsonl", report=report)
    assert [m.answers for m in musique] == [("Ann Lee", "A. Lee")] and report.excluded == 1
    assert only("2wiki_dev.json").answers == ("1990",)
    bam = only("bamboogle.csv")
    assert (bam.question, bam.answers, bam.id) == ("Who was president, then?", ("George Washington",), "1")
    fresh = only("FreshQA_v12182023.csv")
    assert (fresh.id, fresh.answers, fresh.meta["false_premise"]) == ("0", ("Burj Khalifa", "the Burj Khalifa"), "FALSE")
    assert only("nq-open-dev.jsonl").answers == ("Prince", "P")
    trivia = only("triviaqa-unfiltered-dev.json")
    assert (trivia.dataset, trivia.id, trivia.answers) == ("triviaqa", "tc_1", ("Paris", "Paree"))
    trivia = only("trivia_qa-validation.parquet")
    assert (trivia.dataset, trivia.id, trivia.answers) == ("triviaqa", "tc_2", ("Paris", "Paree", "City of Light"))
    pop = only("popqa.tsv")
    assert (pop.dataset, pop.answers) == ("popqa", ("a b", "c"))
    assert only("bamboogle_flashrag.jsonl").answers == ("g1", "g2")


@pytest.mark.parametrize("content,error", [
    ('{"question": "Q1", "answer": "A"}\n{"question": "Q2"}\n', r"bad\.jsonl:2: bamboogle item has no field 'answer'"),
    ('{"question": "Q1", "answer": "A"}\n{"answer": "B"}\n', r"bad\.jsonl:2: bamboogle item has no field 'question'"),
    ('{"question": "Q1", "answer": "A"}\n{not json\n', r"bad\.jsonl:2: invalid JSON"),
    ('["a list"]\n', r"bad\.jsonl:1: expected an object"),
    ('{"question": "Q1", "answer": "  "}\n', r"bad\.jsonl:1: bamboogle item has no field 'answer'.*empty"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BenchmarkFormatError, match=error):
        load_benchmark(path, "bamboogle")


def test_skip_bad_counts_and_keeps_the_good(tmp_path):
    path = tmp_path / "bamboogle.jsonl"
    path.write_text('{"question": "Q1", "answer": "A"}\n{"question": "Q2"}\n{oops\n{"question": "Q3", "answer": "C"}\n'
                    '{"question": "Q3 again", "answer": "C", "id": "4"}\n{"id": "4", "question": "dup", "answer": "D"}\n')
    report = LoadReport()
    items = load_benchmark(path, skip_bad=True, report=report)
    assert [i.question for i in items] == ["Q1", "Q3", "Q3 again"]
    assert report.bad.total == 2 and report.duplicates == 1
    assert any("bamboogle.jsonl:2" in e for e in report.bad.examples)


def test_whole_file_errors(tmp_path):
    with pytest.raises(BenchmarkFormatError, match="no such file"):
        load_benchmark(tmp_path / "hotpotqa.jsonl")
    (tmp_path / "hotpotqa.json").write_text('{"version": 1}')
    with pytest.raises(BenchmarkFormatError, match=r"hotpotqa\.json: expected a JSON list"):
        load_benchmark(tmp_path / "hotpotqa.json")
    (tmp_path / "hotpotqa.txt").write_text("x")
    with pytest.raises(BenchmarkFormatError, match="unsupported file type"):
        load_benchmark(tmp_path / "hotpotqa.txt")
    (tmp_path / "questions.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(BenchmarkFormatError, match="cannot tell the benchmark"):
        load_benchmark(tmp_path / "questions.jsonl")
    (tmp_path / "freshqa.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BenchmarkFormatError, match="no header row"):
        load_benchmark(tmp_path / "freshqa.csv")


def test_names_and_specs(tmp_path):
    assert PAPER_BENCHMARKS == ("hotpotqa", "fanoutqa", "musique", "2wiki", "bamboogle", "freshqa")
    assert set(PAPER_BENCHMARKS) | {"nq", "triviaqa", "popqa"} == set(BENCHMARKS)
    assert get_benchmark("2WikiMultiHopQA").name == "2wiki" and get_benchmark("HotpotQA").in_domain
    with pytest.raises(BenchmarkFormatError, match="unknown benchmark 'squad'"):
        get_benchmark("squad")
    assert infer_benchmark("data/nq_test.jsonl").name == "nq"
    assert infer_benchmark("data/2wikimultihopqa_dev.json").name == "2wiki"
    bench, path = parse_data_spec(f"musique={tmp_path}/x.jsonl")
    assert bench.name == "musique" and path == tmp_path / "x.jsonl"


@pytest.mark.shared_data
def test_val_parquet_rows_score_with_the_reward(tmp_path):
    """Exported rows carry what verl's validation needs, and our reward scores them per benchmark."""
    from reward.masksearch_reward import compute_score_sync

    items = {name: load_benchmark(SHARED_QA / f"{file}_500.jsonl", limit=5)
             for name, file in (("hotpotqa", "hotpotqa"), ("musique", "musique"))}
    result = export_parquet(items, tmp_path / "val")
    assert result["counts"] == {"hotpotqa": 5, "musique": 5}
    assert result["override"].startswith("data.val_files=[") and result["override"].count(".parquet") == 2
    frame = pd.read_parquet(result["files"]["hotpotqa"])
    combined = pd.read_parquet(result["combined"])
    assert len(frame) == 5 and len(combined) == 10 and set(combined.data_source) == {"hotpotqa", "musique"}
    row = frame.iloc[0]
    assert row.agent_name == "masksearch_agent" and row.ability == "qa"
    assert list(row.prompt[1]["content"].splitlines()) == [f"Question: {items['hotpotqa'][0].question}"]
    gold = row.reward_model["ground_truth"]
    assert list(gold["target"]) == list(items["hotpotqa"][0].answers)
    assert row.extra_info["question"] == items["hotpotqa"][0].question
    answer = items["hotpotqa"][0].answers[0]
    scored = compute_score_sync(row.data_source, f"<think> x </think>\n<answer> {answer} </answer>", gold,
                                dict(row.extra_info))
    assert scored["recall"] == 1.0 and scored["em"] == 1.0

