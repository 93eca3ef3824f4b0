"""SFT export -> verl's real MultiTurnSFTDataset (loss mask: information/tool tokens 0, assistant tokens 1), the
DeepSpeed runner's labels (same tokens and mask as verl's path), and every SFT recipe composing with both backends."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from envs.prompts import information_block, qa_messages
from envs.rollout import Segment, transcript_messages
from masksearch_rl.jsonl import write_jsonl
from masksearch_rl.sft.export import export_sft

REPO = Path(__file__).resolve().parents[1]
SFT_CONFIGS = REPO / "recipes" / "configs" / "sft"
RECIPES = sorted(f"{p.parent.name}/{p.stem}" for p in SFT_CONFIGS.glob("stage*/*.yaml"))


def _record(i: int, keep: bool = True, answer: str = "Paris") -> dict:
    segments = [Segment("policy", f"<think> need fact {i} </think>\n<search> query {i} </search>"),
                Segment("info", information_block(f"Doc 1 (Title: T{i}) secret fact {i} is {answer}.")),
                Segment("policy", f"<think> found it </think>\n<answer> {answer} </answer>")]
    return {"id": f"r{i}", "keep": keep, "data_source": "ramp",
            "messages": qa_messages(f"Question {i}?") + transcript_messages(segments)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for i in range(20) for m in _record(i)["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    first = [_record(i) for i in range(6)] + [_record(90, keep=False)]
    second = [_record(3), _record(7, answer="Paris")] + [{**_record(8), "id": "r0"}]  # id dup, content dup, new
    second.append({**_record(0), "id": "copy-of-r0"})  # same messages as r0 under another id
    write_jsonl(root / "a.jsonl", first)
    write_jsonl(root / "b.jsonl", second)
    summary = export_sft([root / "a.jsonl", root / "b.jsonl"], root / "out", val_fraction=0.25, seed=0)
    return root / "out", summary


def test_export_keeps_dedupes_and_splits(parquet):
    out, summary = parquet
    assert summary["not_kept"] == 1 and summary["duplicates"] == 3
    train, val = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "val.parquet")
    ids = sorted(list(train["id"]) + list(val["id"]))
    assert ids == sorted([*(f"r{i}" for i in range(6)), "r7"]) and len(val) == 2 == summary["val"]


def test_multiturn_sft_dataset_masks_information(parquet, tokenizer):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    out, _ = parquet
    dataset = MultiTurnSFTDataset(str(out / "train.parquet"), tokenizer,
                                  {"max_length": 512, "pad_mode": "right", "truncation": "error"})
    for index in range(len(dataset)):
        item = dataset[index]
        ids, mask = item["input_ids"][item["attention_mask"].bool()], item["loss_mask"][item["attention_mask"].bool()]
        trained = tokenizer.decode(ids[mask.bool()])
        masked = tokenizer.decode(ids[~mask.bool()])
        assert "<search>" in trained and "<answer>" in trained and "<think>" in trained
        assert "<information>" not in trained and "secret fact" not in trained and "Question" not in trained
        assert "<information>" in masked and "secret fact" in masked


def test_deepspeed_runner_labels_equal_verl_mask(parquet, tokenizer):
    import torch
    from omegaconf import OmegaConf
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from masksearch_rl.sft.deepspeed_runner import IGNORE_INDEX, build_datasets, pad_collate

    out, _ = parquet
    config = _compose("stage1_ramp/qwen2.5-1.5b_8gpu", ["sft_backend=deepspeed", f"data.train_files={out}/train.parquet",
                                                        f"data.val_files={out}/val.parquet", "data.max_length=512"])
    train, val = build_datasets(config, tokenizer)
    reference = MultiTurnSFTDataset(str(out / "train.parquet"), tokenizer,
                                    OmegaConf.merge(config.data, {"pad_mode": "no_padding"}))
    assert len(train) == len(reference) and len(val) == 2
    for index in range(len(train)):
        ours, theirs = train[index], reference[index]
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["labels"] != IGNORE_INDEX, theirs["loss_mask"].bool())
    batch = pad_collate(tokenizer.pad_token_id)([train[0], train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def _compose(recipe: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    group, name = recipe.split("/")
    with initialize_config_dir(config_dir=str(SFT_CONFIGS / group), version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_recipes_compose_and_convert(recipe, backend):
    from verl.utils.config import omega_conf_to_dataclass

    from masksearch_rl.sft.deepspeed_runner import resolve_deepspeed_config, training_arguments

    assert len(RECIPES) == 6
    config = _compose(recipe, [f"sft_backend={backend}"])
    assert config.masksearch_sft.backend == backend and config.data.messages_key == "messages"
    assert config.data.train_files.endswith("train.parquet")
    omega_conf_to_dataclass(config.optim)  # verl's own validation of the optimizer section
    omega_conf_to_dataclass(config.engine)
    args = training_arguments(config, world_size=8)
    assert args["gradient_accumulation_steps"] * 8 * args["per_device_train_batch_size"] == config.data.train_batch_size
    if backend == "deepspeed":
        assert Path(resolve_deepspeed_config(config.masksearch_sft.deepspeed_config)).name == "zero3.json"
    else:
        assert "deepspeed" not in args


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny model's directory (its own BPE tokenizer and ChatML template), built from a small synthetic corpus."""
    from masksearch_rl.synthetic import write_synthetic_corpus
    from masksearch_rl.tiny_model import build_tiny_model, corpus_texts

    root = tmp_path_factory.mktemp("tiny")
    write_synthetic_corpus(root / "world", num_passages=60, num_questions=1, seed=2, progress=False)
    return build_tiny_model(root / "model", corpus_texts(root / "world" / "corpus.jsonl"), vocab_size=800)


def test_export_drops_and_counts_trajectories_longer_than_max_tokens(tmp_path, tiny_model):
    import json

    from transformers import AutoTokenizer
    from typer.testing import CliRunner
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from masksearch_rl.cli import app
    from masksearch_rl.sft.export import token_length

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    short = [_record(i) for i in range(4)]
    long = [_record(i, answer="Paris " + "and a very long retrieved passage " * (40 * (i - 3))) for i in range(4, 7)]
    write_jsonl(tmp_path / "traj.jsonl", short + long)
    lengths = {r["id"]: token_length(tokenizer, r["messages"]) for r in short + long}
    limit = max(lengths[r["id"]] for r in short)
    assert min(lengths[r["id"]] for r in long) > limit  # the long ones really are over the limit

    result = CliRunner().invoke(app, ["sft", "export", str(tmp_path / "traj.jsonl"), "--out-dir", str(tmp_path / "out"),
                                      "--val-fraction", "0", "--tokenizer", str(tiny_model), "--max-tokens", str(limit)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["train"], summary["too_long"], summary["max_tokens"], summary["longest_kept"]) == (4, 3, limit, limit)
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert sorted(train["id"]) == sorted(r["id"] for r in short)
    # verl's dataset agrees on the length: at max_length=limit with truncation "error" every row loads whole,
    # ending with the assistant's <answer> turn.
    dataset = MultiTurnSFTDataset(str(tmp_path / "out" / "train.parquet"), tokenizer,
                                  {"max_length": limit, "pad_mode": "no_padding", "truncation": "error"})
    for index in range(len(dataset)):
        ids = dataset[index]["input_ids"]
        assert len(ids) <= limit and "</answer>" in tokenizer.decode(ids)

    # Without the options nothing is measured or dropped (the default behaviour), and they only come together.
    plain = export_sft([tmp_path / "traj.jsonl"], tmp_path / "plain", val_fraction=0.0)
    assert plain["train"] == 7 and "too_long" not in plain
    lonely = CliRunner().invoke(app, ["sft", "export", str(tmp_path / "traj.jsonl"), "--out-dir",
                                      str(tmp_path / "x"), "--max-tokens", "100"])
    assert lonely.exit_code != 0 and "--tokenizer and --max-tokens go together" in lonely.output
    with pytest.raises(ValueError, match="within 10 tokens"):
        export_sft([tmp_path / "traj.jsonl"], tmp_path / "none", tokenizer=tokenizer, max_tokens=10)


def _ramp_record(i: int, k: int) -> dict:
    record = _record(i)
    return {**record, "kind": "ramp", "gold": [[f"span{j}"] for j in range(k)]}


@pytest.mark.parametrize("mode", ["staged", "mixed"])
def test_export_orders_and_stages_rows_by_mask_count_and_records_the_schedule(tmp_path, mode):
    import json

    from masksearch_rl.curriculum.sampler import CurriculumConfig

    records = [_ramp_record(i, 1 + i % 3) for i in range(30)]
    records[5] = {**records[5], "num_masks": 4}  # an explicit count wins over the gold spans
    write_jsonl(tmp_path / "t.jsonl", records)
    summary = export_sft([tmp_path / "t.jsonl"], tmp_path / "out", val_fraction=0.2, seed=0,
                         curriculum=CurriculumConfig(mode=mode, seed=7))
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    val = pd.read_parquet(tmp_path / "out" / "val.parquet")
    assert len(train) + len(val) == 30 and sorted(train["id"]) == sorted(set(train["id"]))  # each row once
    expected = {r["id"]: r.get("num_masks", len(r["gold"])) for r in records}
    assert [expected[i] for i in train["id"]] == list(train["num_masks"])
    schedule = json.loads((tmp_path / "out" / "curriculum.json").read_text())
    assert schedule == summary["curriculum"] and schedule["mode"] == mode and schedule["rows"] == len(train)
    if mode == "staged":
        assert list(train["num_masks"]) == sorted(train["num_masks"])  # 1s, then 2s, 3s, 4s
        assert list(train["curriculum_stage"]) == [[1, 2, 3, 4].index(k) for k in train["num_masks"]]
        for k, name in schedule["stage_files"].items():
            stage = pd.read_parquet(tmp_path / "out" / name)
            assert set(stage["num_masks"]) == {int(k.split("=")[1])}
            assert len(stage) == schedule["rows_per_stage"][k]
    else:
        assert list(train["num_masks"]) != sorted(train["num_masks"]) and not schedule["stage_files"]
        assert not list((tmp_path / "out").glob("stage_*"))

    plain = export_sft([tmp_path / "t.jsonl"], tmp_path / "out", val_fraction=0.2, seed=0)  # no curriculum now:
    assert "curriculum" not in plain and not (tmp_path / "out" / "curriculum.json").exists()  # no stale schedule
    assert not list((tmp_path / "out").glob("stage_*"))
    assert "curriculum_stage" not in pd.read_parquet(tmp_path / "out" / "train.parquet").columns

    write_jsonl(tmp_path / "qa.jsonl", [_record(100)])  # QA: no mask count to order by
    with pytest.raises(ValueError, match="1 kept record"):
        export_sft([tmp_path / "t.jsonl", tmp_path / "qa.jsonl"], tmp_path / "bad", curriculum=CurriculumConfig())


def test_data_order_cuts_the_rl_schedule_to_a_finite_list():
    from masksearch_rl.curriculum.sampler import CurriculumConfig, MaskCountCurriculumSampler, data_order

    masks = [1 + i % 4 for i in range(40)]
    staged = CurriculumConfig(mode="staged", seed=3, replay_fraction=0.25, epochs_per_stage=[1, 1, 2, 1])
    order = data_order(masks, staged)
    stream = iter(MaskCountCurriculumSampler(masks, staged))
    assert order.indices == [next(stream) for _ in order.indices]  # the RL sampler's own stream, cut at the end
    assert order.stages == sorted(order.stages) and order.describe()["rows_per_stage"]["num_masks=3"] > 10
    mixed = data_order(masks, CurriculumConfig(mode="mixed", seed=3))
    assert sorted(mixed.indices) == list(range(40))
    with pytest.raises(ValueError, match="adaptive"):
        data_order(masks, CurriculumConfig(mode="adaptive"))
    with pytest.raises(ValueError, match="steps_per_stage"):
        data_order(masks, CurriculumConfig(mode="staged", steps_per_stage=2))
