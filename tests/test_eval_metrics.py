"""Eval metrics against hand-checked cases (SQuAD normalisation), aggregation, and the Table 2 report."""

from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reward.answer_match as answer_match
from masksearch_rl.eval.loaders import PAPER_BENCHMARKS
from masksearch_rl.eval.metrics import averages, macro_average, score_prediction, summarize, summarize_all
from masksearch_rl.eval.report import load_results, markdown_table, results_dict, write_report


@pytest.mark.parametrize("prediction,gold,expected", [
    # (em, f1, recall, cover_em), checked by hand with the SQuAD v1.1 rules
    ("The Eiffel Tower!", ["eiffel tower"], (1, 1, 1, 1)),  # case, punctuation, article
    ("Eiffel Tower in Paris", ["the Eiffel Tower"], (0, 2 * (2 / 4) * 1 / (2 / 4 + 1), 1, 1)),
    ("Paris", ["Paris, France"], (0, 2 * 1 * 0.5 / 1.5, 0.5, 0)),
    ("1000", ["10"], (0, 0, 0, 0)),  # cover-EM on token boundaries
    ("an apple a day", ["Apple Day"], (1, 1, 1, 1)),  # both normalise to "apple day" (articles dropped)
    ("apple pie day", ["Apple Day"], (0, 0.8, 1, 0)),  # P 2/3, R 1; the gold is not contiguous
    ("Barack Obama", ["Obama", "Barack Obama"], (1, 1, 1, 1)),  # best alias
    (None, ["x"], (0, 0, 0, 0)),  # no answer
    ("", ["x"], (0, 0, 0, 0)),
])
def test_hand_checked_scores(prediction, gold, expected):
    scores = score_prediction(prediction, gold)
    assert (scores.em, scores.f1, scores.recall, scores.cover_em) == pytest.approx(expected)


def test_the_eval_uses_the_reward_implementation():
    """One implementation: the harness calls reward.answer_match, it does not carry its own copy."""
    import masksearch_rl.eval.metrics as metrics

    assert metrics.score_answer is answer_match.score_answer


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
def test_scores_equal_the_reward_scores(prediction, gold):
    scores = score_prediction(prediction, gold)
    if prediction:
        assert scores == answer_match.score_answer(prediction, gold)
    assert all(0.0 <= value <= 1.0 for value in scores)
    assert scores.em <= scores.cover_em and scores.f1 <= 1.0


def _record(dataset, recall, em, searches, turns, answer="a", judge=None):
    return {"dataset": dataset, "answer": answer, "num_searches": searches, "num_turns": turns,
            "scores": {"recall": recall, "em": em, "f1": recall, "cover_em": em, "judge": judge}}


def test_summaries_and_macro_average():
    records = [
        _record("musique", 1.0, 1.0, 2, 3), _record("musique", 0.0, 0.0, 0, 1, answer=None),
        _record("hotpotqa", 0.5, 0.0, 1, 2), _record("hotpotqa", 0.5, 0.0, 3, 4), _record("hotpotqa", 1.0, 1.0, 2, 3),
    ]
    summaries = summarize_all(records, order=("hotpotqa", "musique"))
    assert list(summaries) == ["hotpotqa", "musique"]
    hotpot, musique = summaries["hotpotqa"], summaries["musique"]
    assert (hotpot.n, hotpot.recall, hotpot.em, hotpot.searches, hotpot.turns) == (3, pytest.approx(2 / 3),
                                                                                  pytest.approx(1 / 3), 2.0, 3.0)
    assert (musique.recall, musique.answered, musique.judge) == (0.5, 0.5, None)
    average = macro_average(summaries)
    assert average["recall"] == pytest.approx((2 / 3 + 0.5) / 2)  # each benchmark weighs the same
    assert average["n"] == 5 and average["judge"] is None
    # The paper's Avg. needs all six benchmarks; the mean over what this run has is only the run average.
    assert macro_average(summaries, PAPER_BENCHMARKS) is None
    assert averages(summaries) == {"average": None, "average_search_r1": None, "average_run": average}


def test_judge_mean_only_when_every_item_was_judged():
    """A judge added on a resumed run scores only the new items: no mean over that subset passes for the set's."""
    judged = [_record("nq", 1.0, 1.0, 1, 2, judge=1.0), _record("nq", 0.0, 0.0, 1, 2, judge=0.0)]
    full = summarize("nq", judged)
    assert (full.judge, full.judged) == (0.5, 2)
    partial = summarize("nq", [*judged, _record("nq", 0.0, 0.0, 1, 2)])
    assert (partial.judge, partial.judged, partial.n) == (None, 2, 3)


def _run(method, scores):
    records = [_record(d, r, r, 1, 2) for d, r in scores]
    return results_dict(method, summarize_all(records))


PAPER_SIX = [("bamboogle", 0.25), ("hotpotqa", 0.5), ("fanoutqa", 0.1), ("musique", 0.2), ("2wiki", 0.3),
             ("freshqa", 0.4)]


def test_table_two_layout(tmp_path):
    runs = [
        _run("Search-R1", [*PAPER_SIX, ("nq", 1.0), ("triviaqa", 0.5), ("popqa", 0.3)]),
        _run("RAMP(RL)+RL", [("hotpotqa", 0.75), ("fanoutqa", 0.3), ("nq", 0.9)]),
    ]
    table = markdown_table(runs, "recall").splitlines()
    # Paper order (in-domain HotpotQA first), other sets after; Avg. over the paper's six benchmarks only, and
    # only for a run that has all six; the Search-R1 sets' average likewise. Percentages with two decimals.
    assert table[0] == ("| Method | HotpotQA† | FanoutQA | Musique | 2Wiki | Bamboogle | FreshQA | NQ | PopQA | "
                        "TriviaQA | Avg. | Avg. NQ/TriviaQA/PopQA |")
    assert table[2] == "| Search-R1 | 50.00 | 10.00 | 20.00 | 30.00 | 25.00 | 40.00 | 100.00 | 30.00 | 50.00 | 29.17 | 60.00 |"
    assert table[3] == "| RAMP(RL)+RL | 75.00 | 30.00 | – | – | – | – | 90.00 | – | – | – | – |"
    assert runs[0]["average"]["recall"] == pytest.approx(1.75 / 6) and runs[0]["average"]["n"] == 6
    assert runs[1]["average"] is None and runs[1]["average_search_r1"] is None
    assert runs[1]["average_run"]["recall"] == pytest.approx((0.75 + 0.3 + 0.9) / 3)  # kept, not in the table
    paths = write_report(runs, tmp_path, plots=False)
    rows = list(csv.reader(open(paths["csv"])))
    columns = ["hotpotqa", "fanoutqa", "musique", "2wiki", "bamboogle", "freshqa", "nq", "popqa", "triviaqa"]
    assert rows[0] == ["method", "metric", *columns, "avg", "avg_search_r1"]
    assert rows[1][:2] == ["Search-R1", "recall"] and rows[1][-2:] == [f"{1.75 / 6:.6f}", "0.600000"]
    assert rows[2][:2] == ["RAMP(RL)+RL", "recall"] and rows[2][4] == "" and rows[2][-2:] == ["", ""]
    assert {r[1] for r in rows[1:]} == {"recall", "em", "f1", "cover_em", "searches", "turns"}  # no judge: no row
    data = json.loads(open(paths["json"]).read())
    assert data["columns"] == columns and len(data["runs"]) == 2
    # Averages come from the benchmarks, not from what a results file says (older files averaged any set).
    stale = {**runs[1], "average": {"recall": 0.5}}
    assert markdown_table([stale], "recall").splitlines()[2] == "| RAMP(RL)+RL | 75.00 | 30.00 | 90.00 | – | – |"
    # Without NQ/TriviaQA/PopQA in any run there is no Search-R1 column.
    assert markdown_table([_run("x", PAPER_SIX)], "recall").splitlines()[0].endswith("| FreshQA | Avg. |")
    markdown = open(paths["markdown"]).read()
    assert "## Token-level recall (%)" in markdown and "## Searches per question" in markdown


def test_results_files_round_trip(tmp_path):
    run = _run("x", [("hotpotqa", 1.0)])
    (tmp_path / "results.json").write_text(json.dumps(run))
    assert load_results(tmp_path)["method"] == "x"
    (tmp_path / "bad.json").write_text(json.dumps({"method": "y"}))
    with pytest.raises(ValueError, match="bad.json: results file has no field 'datasets'"):
        load_results(tmp_path / "bad.json")


def test_plots_are_pngs(tmp_path):
    runs = [_run("a", [("hotpotqa", 0.5), ("musique", 0.2)]), _run("b", [("hotpotqa", 0.7)])]
    paths = write_report(runs, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths["plots"]] == ["answers.png", "search.png"]
    for path in paths["plots"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
