"""SFT warm-up: oracle RAMP trajectories over a real synthetic world and BM25 index, their loss mask in verl's
MultiTurnSFTDataset, and a real verl SFT run on the CPU through masksearch_rl.sft.train (loss falls, the HF model
loads and generates)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from envs.prompts import INFO_CLOSE, INFO_OPEN, information_block, ramp_messages
from envs.search_client import format_hits, truncate_to_budget
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.sft.oracle import OracleConfig, candidate_queries, spans_of, write_oracle_sft
from reward.format import check_format

REPO = Path(__file__).resolve().parents[1]
# Short information blocks keep the training run of this file fast; the layout is the same as the quickstart's.
ORACLE = OracleConfig(topk=3, max_info_tokens=40, val_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp
    from masksearch_rl.retrieval.index import build_index
    from masksearch_rl.synthetic import write_synthetic_corpus
    from masksearch_rl.tiny_model import build_tiny_model, corpus_texts

    root = tmp_path_factory.mktemp("warmup")
    write_synthetic_corpus(root / "world", num_passages=200, num_questions=4, seed=5, hops=(1,), progress=False)
    corpus = root / "world" / "corpus.jsonl"
    build_index(corpus, root / "index", kind="bm25")
    generate_ramp(RampConfig(corpus=corpus, out=root / "items.jsonl", limit=40, progress=False))
    model = build_tiny_model(root / "model", corpus_texts(corpus), vocab_size=1200)
    summary = write_oracle_sft(root / "items.jsonl", root / "index", root / "sft", ORACLE)
    return {"root": root, "items": read_jsonl(root / "items.jsonl"), "model": model, "summary": summary,
            "records": read_jsonl(root / "sft" / "trajectories.jsonl")}


def test_oracle_trajectories_follow_the_protocol_and_answer_the_spans(world):
    records, items = world["records"], {str(i["id"]): i for i in world["items"]}
    assert len(records) == len(items) >= 20
    for record in records:
        item = items[record["id"]]
        result = check_format(record["response"], num_masks=item["num_masks"])
        assert result.ok, (record["id"], result.reason, record["response"][:300])
        assert result.num_searches == record["num_searches"] >= 1
        assert spans_of(result.answer) == [str(m) for m in item["masks"]]
        # The RL prompt, word for word; then assistant / tool turns alternating, the assistant's last.
        messages = record["messages"]
        assert messages[:2] == ramp_messages(item["query"], instruction=item["instruction"])
        roles = [m["role"] for m in messages[2:]]
        assert roles == ["assistant", "tool"] * record["num_searches"] + ["assistant"]
        for turn in messages[2:]:
            assert (turn["role"] == "tool") == turn["content"].startswith(INFO_OPEN)
        assert re.search(r"<search> (.+?) </search>", messages[2]["content"]).group(1) == record["queries"][0]


def test_search_results_are_real_and_contain_the_source_passage(world):
    from masksearch_rl.retrieval.index import load_index

    records = world["records"]
    summary = world["summary"]
    assert summary["found_rate"] >= 0.9 and summary["found"] == sum(r["found"] for r in records)
    retriever = load_index(world["root"] / "index")
    for record in records[:10]:
        hits = retriever.search([record["queries"][-1]], ORACLE.topk)[0]
        info = record["messages"][-2]["content"]
        assert info.startswith(INFO_OPEN) and info.endswith(INFO_CLOSE)
        # The index's own top-k, in order, formatted and cut exactly as the RL environment does.
        assert info == information_block(truncate_to_budget(format_hits(hits), ORACLE.max_info_tokens)).strip()
        if record["found"]:
            assert any(hit.id == record["id"] for hit in hits)
            assert record["source_rank"] == next(r for r, h in enumerate(hits, 1) if h.id == record["id"])
    # Unfound items are recorded and (by default) not exported.
    exported = len(pd.read_parquet(world["root"] / "sft" / "train.parquet")) + \
        len(pd.read_parquet(world["root"] / "sft" / "val.parquet"))
    assert exported == summary["kept"] == summary["found"]
    assert set(summary["not_found_ids"]) == {r["id"] for r in records if not r["found"]}


def test_oracle_is_deterministic_and_title_first(world, tmp_path):
    again = write_oracle_sft(world["root"] / "items.jsonl", world["root"] / "index", tmp_path, ORACLE)
    assert (tmp_path / "trajectories.jsonl").read_bytes() == \
        (world["root"] / "sft" / "trajectories.jsonl").read_bytes()
    assert again["export"]["val"] == world["summary"]["export"]["val"]
    item = world["items"][0]
    assert candidate_queries(item, 3)[0] == item["title"]


def test_opening_query_is_copyable_and_finds_the_source(world):
    """The lab's oracle query: the masked text's first words, masks left out -- text the policy can copy from its
    prompt; with one passage shown it retrieves the item's own passage."""
    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.oracle import opening_query, oracle_trajectories

    assert opening_query("[mask] was founded in [mask] by Ada Lovelace in the north", 5) == "was founded in by Ada"
    config = OracleConfig(topk=1, max_info_tokens=256, max_searches=1, wording="fixed", queries=("opening",),
                          opening_words=10, tokenizer=str(world["model"]))
    records = oracle_trajectories(world["items"], load_index(world["root"] / "index"), config)
    for record, item in zip(records, world["items"]):
        assert record["queries"][0] == opening_query(item["query"], 10)
    assert sum(r["found"] for r in records) / len(records) > 0.8


def test_qa_oracle_searches_the_question_and_keeps_what_shows_the_answer(world):
    from masksearch_rl.jsonl import read_jsonl
    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.oracle import qa_oracle_trajectories

    questions = read_jsonl(world["root"] / "world" / "questions.jsonl")
    config = OracleConfig(topk=1, max_info_tokens=256, max_searches=1, wording="fixed")
    records = qa_oracle_trajectories(questions, load_index(world["root"] / "index"), config, strategy="question")
    assert len(records) == len(questions)
    for record, question in zip(records, questions):
        info = " ".join(m["content"] for m in record["messages"] if "<information>" in m["content"])
        assert record["found"] == (question["answer"].lower() in " ".join(info.lower().split()))
        if record["found"]:
            assert record["messages"][-1]["content"].endswith(f"<answer> {question['answer']} </answer>")
    with pytest.raises(ValueError, match="strategy"):
        qa_oracle_trajectories(questions, load_index(world["root"] / "index"), config, strategy="guess")


def test_cli_writes_the_same_parquet(world, tmp_path):
    from typer.testing import CliRunner

    from masksearch_rl.cli import app

    root = world["root"]
    result = CliRunner().invoke(app, ["sft", "oracle", "--ramp", str(root / "items.jsonl"), "--index",
                                      str(root / "index"), "--out", str(tmp_path), "--max-info-tokens", "40",
                                      "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["found"] == world["summary"]["found"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "train.parquet"),
                                  pd.read_parquet(root / "sft" / "train.parquet"))


def test_multiturn_sft_dataset_masks_the_information_turns(world):
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    dataset = MultiTurnSFTDataset(str(world["root"] / "sft" / "train.parquet"), tokenizer,
                                  {"max_length": 4096, "pad_mode": "no_padding", "truncation": "error"})
    assert len(dataset) > 10
    for index in range(len(dataset)):
        item = dataset[index]
        ids, mask = item["input_ids"], item["loss_mask"].bool()
        trained, masked = tokenizer.decode(ids[mask]), tokenizer.decode(ids[~mask])
        assert "<think>" in trained and "<search>" in trained and "<answer>" in trained
        assert INFO_OPEN not in trained and "Doc 1 (Title:" not in trained and "[mask]" not in trained
        assert INFO_OPEN in masked and "Doc 1 (Title:" in masked


def _losses(log: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{key}:([0-9.]+)", log)]


def test_real_verl_sft_on_cpu_lowers_loss_and_writes_a_loadable_model(world, tmp_path, wandb_history):
    """20 steps of verl's own SFTTrainer (FSDP2 engine, gloo) on the CPU platform via masksearch_rl.sft.train,
    logging to W&B offline as the recipes do (trainer.logger with wandb)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from masksearch_rl.sft.train import final_hf_model_dir
    from masksearch_rl.sft.warmup import LAYOUTS, trainer_command

    sft = world["root"] / "sft"
    # The RL token layout: verl's trainer loads our dataset class through data.custom_cls.
    command = trainer_command(sft, sft, world["model"], tmp_path / "ckpt", tmp_path / "hydra", steps=20,
                              overrides=[*LAYOUTS["rl"], "trainer.logger=[console,wandb]",
                                         "data.train_batch_size=2", "data.micro_batch_size_per_gpu=2",
                                         "optim.lr=3e-3", "optim.lr_warmup_steps_ratio=0.0"])
    env = {**os.environ, "VERL_PLATFORM": "cpu", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    losses = _losses(log, "train/loss")
    assert len(losses) == 20
    history = wandb_history(tmp_path)  # what W&B got: every step's loss, as printed
    assert [round(history[step]["train/loss"], 4) for step in range(1, 21)] == [round(x, 4) for x in losses]
    assert "Using dataset class: RLLayoutSFTDataset" in log or "RLLayoutSFTDataset" in log
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    hf_dir = final_hf_model_dir(tmp_path / "ckpt")
    assert hf_dir is not None and hf_dir.parent.name == "global_step_20"
    # Every SFT run leaves its model at <default_local_dir>/hf_model (what Stage II recipes and vLLM load).
    assert (tmp_path / "ckpt" / "hf_model").resolve() == hf_dir.resolve()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    trained = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    base = dict(AutoModelForCausalLM.from_pretrained(world["model"]).named_parameters())[
        "model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, base)
    prompt = tokenizer.apply_chat_template(ramp_messages(world["items"][0]["query"]), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_warmup_skips_when_done_and_names_the_log_on_failure(world, tmp_path):
    from masksearch_rl.sft.warmup import DONE_FILE, run_sft_warmup

    done = tmp_path / "done"
    (done / "model").mkdir(parents=True)
    (done / "model" / DONE_FILE).write_text("{}")
    assert run_sft_warmup(Path("missing.jsonl"), Path("missing"), Path("missing"), done, 5) == done / "model"

    with pytest.raises(ValueError, match="no-model: not a Hugging Face model directory"):
        run_sft_warmup(world["root"] / "items.jsonl", world["root"] / "index", tmp_path / "no-model", done / "x", 2)

    broken = tmp_path / "broken"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for path in world["model"].iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    with pytest.raises(RuntimeError, match=re.escape(str(broken / "train.log"))):
        # A model dir without weights: verl's trainer exits non-zero.
        run_sft_warmup(world["root"] / "items.jsonl", world["root"] / "index", no_weights, broken, 2)
    assert (broken / "data" / "train.parquet").is_file() and "masksearch_rl.sft.train" in \
        (broken / "train.log").read_text()


def test_probe_scores_rl_style_rollouts_of_an_untrained_model(world):
    from masksearch_rl.sft.warmup import ProbeConfig, probe_format

    for layout in ("continue", "turns"):
        report = probe_format(world["model"], world["items"], world["root"] / "index",
                              ProbeConfig(num_prompts=2, response_length=24, max_turn_tokens=12, layout=layout))
        # A random model never writes the protocol: exactly what the warm-up is for.
        assert report["prompts"] == 2 and report["well_formed"] == 0
        assert sum(report["reasons"].values()) == 2 and "ok" not in report["reasons"]
    with pytest.raises(ValueError, match="layout"):
        ProbeConfig(layout="chat")


def test_fixed_wording_names_nothing_and_still_follows_the_protocol(world):
    from dataclasses import replace

    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.oracle import FIXED_THOUGHTS, oracle_trajectories

    items = world["items"][:5]
    records = oracle_trajectories(items, load_index(world["root"] / "index"), replace(ORACLE, wording="fixed"))
    for item, record in zip(items, records):
        assert check_format(record["response"], num_masks=item["num_masks"]).ok
        assert record["messages"][2]["content"].startswith(f"<think> {FIXED_THOUGHTS['first']} </think>")
    with pytest.raises(ValueError, match="wording"):
        OracleConfig(wording="poetic")


def test_rl_layout_dataset_is_token_for_token_what_the_agent_loop_builds(world):
    """Prompt as verl's RLHFDataset renders it, then policy text and raw information blocks, as envs/agent_loop.py
    concatenates them (``tokenizer.encode(information_block(...))``), then EOS; loss only on the policy's tokens."""
    from transformers import AutoTokenizer

    from masksearch_rl.sft.rl_layout_dataset import RLLayoutSFTDataset

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    parquet = world["root"] / "sft" / "train.parquet"
    dataset = RLLayoutSFTDataset(str(parquet), tokenizer, {"max_length": 4096, "pad_mode": "no_padding",
                                                          "truncation": "error"})
    records = {r["id"]: r for r in world["records"]}
    rows = pd.read_parquet(parquet)
    assert len(dataset) == len(rows) > 10
    for index in range(len(dataset)):
        item, record = dataset[index], records[rows.iloc[index]["id"]]
        messages = record["messages"]
        prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        expected, expected_mask = list(prompt), [0] * len(prompt)
        for turn in messages[2:]:
            text = turn["content"] if turn["role"] == "assistant" else \
                information_block(turn["content"][len(INFO_OPEN):-len(INFO_CLOSE)])
            piece = tokenizer.encode(text, add_special_tokens=False)
            expected += piece
            expected_mask += [int(turn["role"] == "assistant")] * len(piece)
        expected += [tokenizer.eos_token_id]
        expected_mask += [1]
        assert item["input_ids"].tolist() == expected and item["loss_mask"].tolist() == expected_mask
        assert item["position_ids"].tolist() == list(range(len(expected)))
        # The decoded response is the RL response the reward scores, and the policy is trained on its own text only.
        response_ids = item["input_ids"][len(prompt):]
        assert tokenizer.decode(response_ids) == record["response"] + tokenizer.eos_token
        trained = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
        assert INFO_OPEN not in trained and "Doc 1 (Title:" not in trained and "<answer>" in trained


def test_rl_layout_dataset_pads_truncates_and_names_bad_rows(world, tmp_path):
    from transformers import AutoTokenizer

    from masksearch_rl.sft.rl_layout_dataset import RLLayoutSFTDataset, rl_layout_pieces

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    parquet = str(world["root"] / "sft" / "train.parquet")
    full = RLLayoutSFTDataset(parquet, tokenizer, {"max_length": 4096, "pad_mode": "no_padding"})[0]
    length = len(full["input_ids"])
    padded = RLLayoutSFTDataset(parquet, tokenizer, {"max_length": length + 7, "pad_mode": "right"})[0]
    assert padded["input_ids"].tolist() == full["input_ids"].tolist() + [tokenizer.pad_token_id] * 7
    assert padded["attention_mask"].tolist() == [1] * length + [0] * 7
    assert padded["loss_mask"].tolist() == full["loss_mask"].tolist() + [0] * 7
    cut = RLLayoutSFTDataset(parquet, tokenizer, {"max_length": 50, "pad_mode": "no_padding",
                                                 "truncation": "right"})[0]
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[:50]
    with pytest.raises(ValueError, match=r"row 0: \d+ tokens > max_length 50"):
        RLLayoutSFTDataset(parquet, tokenizer, {"max_length": 50, "truncation": "error"})[0]

    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(ValueError, match="must start and end with an assistant"):
        rl_layout_pieces([*prompt, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "t"}])
    with pytest.raises(ValueError, match="turn 3: role 'system'"):
        rl_layout_pieces([*prompt, {"role": "assistant", "content": "a"}, {"role": "system", "content": "again"}])
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"messages": [[*prompt]]}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad.parquet.*row 0: a trajectory needs"):
        RLLayoutSFTDataset(str(bad), tokenizer, {"max_length": 64})[0]


def test_oracle_budgets_information_in_the_policys_tokens(world):
    from dataclasses import replace

    from transformers import AutoTokenizer

    from masksearch_rl.retrieval.index import load_index
    from masksearch_rl.sft.oracle import oracle_trajectories

    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    config = replace(ORACLE, max_info_tokens=24, tokenizer=str(world["model"]), wording="fixed")
    retriever = load_index(world["root"] / "index")
    items = world["items"][:6]
    for item, record in zip(items, oracle_trajectories(items, retriever, config)):
        hits = retriever.search([record["queries"][-1]], config.topk)[0]
        info = record["messages"][-2]["content"]
        # Exactly what the RL environment shows for that search: the same cut in the same tokenizer's tokens.
        assert info == information_block(truncate_to_budget(format_hits(hits), 24, tokenizer)).strip()
        assert len(tokenizer.encode(info[len(INFO_OPEN):-len(INFO_CLOSE)].strip())) <= 24 + 2
        # The closing thought repeats the prompt's mask count, which the prompt states.
        count = f"{item['num_masks']} [mask]"
        assert count in record["messages"][1]["content"] and count in record["messages"][-1]["content"]


def test_deepspeed_backend_runs_through_the_same_entry_and_leaves_hf_model(world, tmp_path):
    """sft_backend=deepspeed: masksearch_rl.sft.train dispatches to the HF Trainer runner (ZeRO-3 off on a CPU);
    same parquet, same loss mask, and the model lands at the same <default_local_dir>/hf_model."""
    from transformers import AutoModelForCausalLM

    from masksearch_rl.sft.warmup import trainer_command

    sft = world["root"] / "sft"
    command = trainer_command(sft, sft, world["model"], tmp_path / "ckpt", tmp_path / "hydra", steps=4,
                              overrides=["sft_backend=deepspeed", "masksearch_sft.deepspeed_config=null",
                                         "masksearch_sft.bf16=false", "data.train_batch_size=2",
                                         "data.micro_batch_size_per_gpu=2", "trainer.save_freq=-1"])
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "VERL_PLATFORM": "cpu"},
                         cwd=tmp_path, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "train_loss" in log
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "hf_model")
    base = AutoModelForCausalLM.from_pretrained(world["model"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not dict(model.named_parameters())[name].equal(dict(base.named_parameters())[name])


def test_deepspeed_zero3_sft_runs_on_the_cpu(world, tmp_path):
    """The recipe's own ZeRO-3 config (sft_backend=deepspeed, recipes/configs/sft/sft_backend/zero3.json) on a CPU:
    DeepSpeed's CPU accelerator over gloo, two optimizer steps, ZeRO checkpoint shards and the HF model written."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from masksearch_rl.sft.warmup import trainer_command

    sft = world["root"] / "sft"
    command = trainer_command(sft, sft, world["model"], tmp_path / "ckpt", tmp_path / "hydra", steps=2,
                              overrides=["sft_backend=deepspeed", "masksearch_sft.bf16=false", "data.train_batch_size=2",
                                         "data.micro_batch_size_per_gpu=2", "trainer.save_freq=-1"])
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "VERL_PLATFORM": "cpu"},
                         cwd=tmp_path, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "train_loss" in log
    shards = list((tmp_path / "ckpt").glob("checkpoint-2/global_step2/zero_pp_rank_0_*_optim_states.pt"))
    assert shards, "no ZeRO optimizer shard: DeepSpeed did not run"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "hf_model")
    base = AutoModelForCausalLM.from_pretrained(world["model"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not dict(model.named_parameters())[name].equal(dict(base.named_parameters())[name])
