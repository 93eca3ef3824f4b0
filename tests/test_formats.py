"""Every record of docs/formats.md, built by the project's own writers over a small synthetic world, has the keys its
``TypedDict`` in masksearch_rl/records.py declares: every required key, no unknown key, nested records too.

Writers: write_synthetic_corpus (passages, questions), generate_ramp (RAMP items), the RAMP and QA parquet exports
(RL rows), write_oracle_sft (oracle trajectories, SFT rows), run_cot with the scripted teacher (CoT traces),
export_sft (SFT rows with curriculum columns), run_eval with the scripted policy (predictions.jsonl, results.json),
the retrieval server (POST /retrieve); the lab's learning.json is checked on its writer's source (a lab run trains).
"""

from __future__ import annotations

import ast
import inspect
import json
import types
import typing
from pathlib import Path

import httpx
import pandas as pd
import pytest

from masksearch_rl import records as R
from masksearch_rl.jsonl import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _typeddict(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _options(tp) -> list:
    """The alternatives of a union (or the type itself)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def check(record, td, where: str = "") -> None:
    """``record`` has ``td``'s required keys and no other than its declared ones; nested records likewise."""
    assert isinstance(record, dict), f"{where or td.__name__}: not a mapping: {type(record)}"
    keys = set(record)
    missing = td.__required_keys__ - keys
    unknown = keys - td.__required_keys__ - td.__optional_keys__
    assert not missing, f"{where or td.__name__}: required keys missing: {sorted(missing)}"
    assert not unknown, f"{where or td.__name__}: keys {td.__name__} does not declare: {sorted(unknown)}"
    hints = typing.get_type_hints(td)
    for key, value in record.items():
        _check_value(value, hints[key], f"{where or td.__name__}.{key}")


def _check_value(value, tp, where: str) -> None:
    if value is None:
        return
    if hasattr(value, "tolist"):  # parquet hands back numpy arrays for lists
        value = value.tolist()
    options = _options(tp)
    dicts = [o for o in options if _typeddict(o)]
    if isinstance(value, dict) and dicts:
        # a union of records (a scored hit or a bare document): the one whose keys the value has, else the first
        fitting = [d for d in dicts if d.__required_keys__ <= set(value) <= d.__required_keys__ | d.__optional_keys__]
        check(value, (fitting or dicts)[0], where)
        return
    for option in options:
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            [item_type] = typing.get_args(option)
            for i, item in enumerate(value[:3]):
                _check_value(item, item_type, f"{where}[{i}]")
            return
        if origin is dict and isinstance(value, dict):
            _, value_type = typing.get_args(option)
            for k, item in list(value.items())[:3]:
                _check_value(item, value_type, f"{where}[{k!r}]")
            return


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import os

    from masksearch_rl.cot.pipeline import CotConfig, run_cot
    from masksearch_rl.cot.scripted import ScriptedServer
    from masksearch_rl.curriculum.sampler import CurriculumConfig
    from masksearch_rl.eval.export import export_parquet as export_qa
    from masksearch_rl.eval.loaders import load_benchmark
    from masksearch_rl.eval.runner import EvalConfig, PolicyConfig, run_eval
    from masksearch_rl.ramp.export import export_parquet as export_ramp
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
    from masksearch_rl.retrieval.index import build_index, load_index
    from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
    from masksearch_rl.sft.export import export_sft
    from masksearch_rl.sft.oracle import OracleConfig, write_oracle_sft
    from masksearch_rl.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("formats")
    write_synthetic_corpus(root, num_passages=80, num_questions=6, seed=3, hops=(1, 2), progress=False)
    generate_ramp(RampConfig(corpus=root / "corpus.jsonl", out=root / "ramp.jsonl", limit=6, progress=False))
    build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False)
    questions, ramp = read_jsonl(root / "questions.jsonl"), read_jsonl(root / "ramp.jsonl")
    export_ramp(root / "ramp.jsonl", root / "rl", val_fraction=0.25, hide_source=True)
    write_jsonl(root / "qa.jsonl", [{"idx": i, "question": q["question"], "answer": q["answer"]}
                                    for i, q in enumerate(questions)])
    export_qa({"musique": load_benchmark(root / "qa.jsonl", "musique")}, root / "qa_rl")
    write_oracle_sft(root / "ramp.jsonl", root / "index", root / "oracle",
                     OracleConfig(max_info_tokens=40, val_fraction=0.25, hide_source=True, keep_unfound=True))
    write_jsonl(root / "tasks.jsonl", questions + ramp)
    os.environ.setdefault("FORMATS_TEST_KEY", "unused")
    wire = {}
    with running_server(create_app(load_index(root / "index"), ServerConfig(max_topk=10))) as url:
        request = {"queries": [ramp[0]["title"], "nothing at all"], "topk": 2, "return_scores": True,
                   "exclude": {"ids": [ramp[0]["id"]]}}
        wire["request"] = request
        wire["scored"] = httpx.post(f"{url}/retrieve", json=request, timeout=30).json()
        wire["bare"] = httpx.post(f"{url}/retrieve", json={"queries": [ramp[0]["title"]]}, timeout=30).json()
        with ScriptedServer(questions + ramp) as teacher:
            llm = {"default": {"base_url": teacher.base_url, "model": "scripted", "api_key_env": "FORMATS_TEST_KEY",
                               "timeout_s": 10.0, "max_retries": 1, "concurrency": 4}}
            run_cot(CotConfig(input=str(root / "tasks.jsonl"), out=str(root / "cot.jsonl"), llm=llm,
                              search={"backend": {"type": "server", "url": url}}, progress=False))
            run_eval(EvalConfig(
                datasets=[("musique", root / "qa.jsonl")], out_dir=root / "eval", method="scripted",
                policy=PolicyConfig(kind="chat", llm={"base_url": teacher.base_url, "model": "policy",
                                                      "max_retries": 0, "timeout_s": 10}),
                search={"backend": {"type": "server", "url": url}}, max_turns=4, concurrency=2,
                judge={"base_url": teacher.base_url, "model": "judge", "max_retries": 0}, progress=False,
            ))
    export_sft([root / "cot.jsonl"], root / "sft", val_fraction=0.25)
    export_sft([root / "oracle" / "trajectories.jsonl"], root / "sft_curriculum", val_fraction=0.25,
               curriculum=CurriculumConfig(mode="mixed"))
    return root, wire


def _rows(path: Path) -> list[dict]:
    return pd.read_parquet(path).to_dict(orient="records")


def test_passages_and_questions(world):
    root, _ = world
    for passage in read_jsonl(root / "corpus.jsonl")[:20]:
        check(passage, R.PassageRecord)
    for question in read_jsonl(root / "questions.jsonl"):
        check(question, R.SyntheticQuestion)


def test_ramp_items(world):
    root, _ = world
    items = read_jsonl(root / "ramp.jsonl")
    assert items
    for item in items:
        check(item, R.RampItem)


def test_rl_rows_of_ramp_and_qa(world):
    root, _ = world
    ramp_rows = _rows(root / "rl" / "train.parquet") + _rows(root / "rl" / "val.parquet")
    qa_rows = _rows(root / "qa_rl" / "musique" / "val.parquet")
    assert ramp_rows and qa_rows
    for row in ramp_rows + qa_rows:
        check(row, R.RLRow)
    # the optional keys each kind has
    assert {"masks", "masked_passage"} <= set(ramp_rows[0]["reward_model"]["ground_truth"])
    assert "exclude" in ramp_rows[0]["extra_info"]["tools_kwargs"]["search"]["create_kwargs"]
    assert "question" in qa_rows[0]["extra_info"]


def test_oracle_trajectories_and_their_sft_rows(world):
    root, _ = world
    trajectories = read_jsonl(root / "oracle" / "trajectories.jsonl")
    assert trajectories
    for record in trajectories:
        check(record, R.OracleTrajectory)
    for row in _rows(root / "oracle" / "train.parquet"):
        check(row, R.SftRow)


def test_cot_traces_and_their_sft_rows(world):
    root, _ = world
    traces = read_jsonl(root / "cot.jsonl")
    assert {t["kind"] for t in traces} == {"qa", "ramp"}
    for trace in traces:
        check(trace, R.CotTrace)
    rows = _rows(root / "sft" / "train.parquet") + _rows(root / "sft" / "val.parquet")
    curriculum = _rows(root / "sft_curriculum" / "train.parquet")
    assert rows and curriculum and {"num_masks", "curriculum_stage"} <= set(curriculum[0])
    for row in rows + curriculum:
        check(row, R.SftRow)


def test_eval_predictions_and_results(world):
    root, _ = world
    predictions = read_jsonl(root / "eval" / "predictions.jsonl")
    assert predictions
    for record in predictions:
        check(record, R.Prediction)
    check(json.loads((root / "eval" / "results.json").read_text()), R.EvalResults)


def test_retrieval_request_and_responses(world):
    _, wire = world
    check(wire["request"], R.RetrieveRequest)
    for response in (wire["scored"], wire["bare"]):
        check(response, R.RetrieveResponse)
    assert set(wire["scored"]["result"][0][0]) == set(R.ScoredDoc.__required_keys__)
    assert set(wire["bare"]["result"][0][0]) == set(R.RetrievedDoc.__required_keys__)
    check(wire["scored"]["result"][0][0]["document"], R.RetrievedDoc)


def test_lab_learning_json_keys_match_its_writers():
    """run_lab builds learning.json's dict as one literal; write_results adds ``bar``."""
    tree = ast.parse((REPO / "masksearch_rl" / "lab" / "runner.py").read_text())
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "learning" for t in node.targets)
                and isinstance(node.value, ast.Dict)]
    assert len(literals) == 1
    keys = {k.value for k in literals[0].keys}
    assert keys == R.LabLearning.__required_keys__
    assert R.LabLearning.__optional_keys__ == {"bar"}
    from masksearch_rl.lab.report import write_results

    assert '"bar": bar_check(' in inspect.getsource(write_results)


def test_the_checker_rejects_missing_and_unknown_keys():
    item = {"id": "1", "contents": '"T"\ntext'}
    check(item, R.PassageRecord)
    with pytest.raises(AssertionError, match="required keys missing"):
        check({"id": "1"}, R.PassageRecord)
    with pytest.raises(AssertionError, match="does not declare"):
        check({**item, "surprise": 1}, R.PassageRecord)
    with pytest.raises(AssertionError, match=r"RLRow.prompt\[0\]"):
        check({"data_source": "x", "prompt": [{"role": "user"}], "ability": "x", "agent_name": "x",
               "reward_model": {"style": "rule", "ground_truth": {"target": []}},
               "extra_info": {"index": 0, "id": "1", "split": "train", "tools_kwargs": {}}}, R.RLRow)
