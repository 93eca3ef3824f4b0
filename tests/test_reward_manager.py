"""Reward manager ``masksearch`` (reward/manager.py), run through verl 0.9.1's real reward loop.

``RewardLoopWorker`` builds the manager with verl's ``load_reward_manager`` / ``get_custom_reward_fn`` from a hydra
config, exactly as the trainer's reward workers do, and scores batches shaped like the ones verl's agent loop sends
(``tool_extra_fields`` and ``__num_turns__`` columns, unpadded prompt + response, full attention mask). Checked:
- the overlong shaping is verl's ``dapo`` manager's, value for value on the same inputs (penalty or not, logged or not);
- the agent loop's fields reach ``compute_score`` (sync and async), where verl's ``dapo`` drops them;
- rollouts sharing one ``extra_info`` dict, scored concurrently, each see their own fields, and the row is untouched;
- the rollout counts are in every sample's ``reward_extra_info``; the recipes select the manager;
- the row's ``agent_name`` reaches ``compute_score``, so hermes tool-call rollouts are checked by their own rules.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from envs.prompts import answer_block, information_block

REPO = Path(__file__).resolve().parents[1]
RAMP_GT = {"target": ["Gustave Eiffel", "1889"], "masks": ["Gustave Eiffel", "1889"]}
THINK = "<think> I need the designer and the year. </think>\n"
SEARCH = "<search> Eiffel Tower designer </search>" + information_block("Doc 1 (Title: Eiffel Tower) opened in 1889.")
GOOD = THINK + SEARCH + THINK + answer_block(["Gustave Eiffel", "1889"]) + "<|im_end|>"
HALF = THINK + answer_block(["Eiffel", "1889"]) + "<|im_end|>"  # recall 0.75
PROMPT = "Fill in the [mask] tokens."
FILLER = "<think> " + "filler words " * 12 + "</think>\n"

# A policy that never searches gets 0.5 less: what compute_score can only do if it sees the rollout's search count.
PENALISING_REWARD = '''
from reward.masksearch_reward import compute_score as _score, compute_score_sync as _score_sync


def _shape(result, extra_info):
    searches = extra_info.get("search_count", -1)
    turns = extra_info.get("num_turns")
    return {**result, "score": result["score"] - (0.5 if searches == 0 else 0.0), "seen_searches": float(searches),
            "seen_turns": -1.0 if turns is None else float(turns)}


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return _shape(await _score(data_source, solution_str, ground_truth, extra_info, **kwargs), extra_info or {})


def compute_score_sync(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return _shape(_score_sync(data_source, solution_str, ground_truth, extra_info, **kwargs), extra_info or {})
'''


@pytest.fixture(scope="module", autouse=True)
def verl_imported():
    """``import verl`` loads our ``verl.plugins`` entry point, which registers the manager (in every verl process)."""
    import verl  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained here on the test texts (no downloads), saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([GOOD, HALF, PROMPT, FILLER] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def penalising_reward(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward_fn") / "penalise_no_search.py"
    path.write_text(textwrap.dedent(PENALISING_REWARD))
    return path


def _worker(manager: str, tokenizer_dir: Path, *overrides: str, reward_path: str = "pkg://reward.masksearch_reward",
            reward_name: str = "compute_score"):
    """verl's RewardLoopWorker on verl's ppo_trainer config with our reward and the given manager."""
    import verl.trainer.config
    from hydra import compose, initialize_config_dir
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    with initialize_config_dir(config_dir=str(Path(verl.trainer.config.__file__).parent), version_base=None):
        config = compose("ppo_trainer", overrides=[
            f"reward.custom_reward_function.path={reward_path}",
            f"reward.custom_reward_function.name={reward_name}",
            f"reward.reward_manager.name={manager}",
            f"actor_rollout_ref.model.path={tokenizer_dir}",
            *overrides,
        ])  # fmt: skip
    return RewardLoopWorker(config)


def _overlong(max_resp_len: int, buffer: int, penalty: float = 1.0, log: bool = True, enable: bool = True):
    return [
        f"+reward.reward_kwargs.max_resp_len={max_resp_len}",
        f"+reward.reward_kwargs.overlong_buffer_cfg.enable={enable}",
        f"+reward.reward_kwargs.overlong_buffer_cfg.len={buffer}",
        f"+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor={penalty}",
        f"+reward.reward_kwargs.overlong_buffer_cfg.log={log}",
    ]


def _rollouts(tokenizer, rows: list[dict]):
    """A batch as verl's agent loop sends it to the reward loop: unpadded ids, full attention mask, and the
    ``tool_extra_fields`` / ``__num_turns__`` columns (a row's ``fields`` None: a loop that reports none)."""
    import torch
    from verl import DataProto

    prompts = [tokenizer.encode(PROMPT) for _ in rows]
    responses = [tokenizer.encode(row["response"]) for row in rows]
    plen, rlen, pad = max(map(len, prompts)), max(map(len, responses)), tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (plen - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (rlen - len(r)) for r in responses])
    mask = torch.tensor([
        [0] * (plen - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (rlen - len(r))
        for p, r in zip(prompts, responses, strict=True)
    ])  # fmt: skip
    extra_infos = np.empty(len(rows), dtype=object)
    extra_infos[:] = [row.get("extra_info", {"index": i, "num_masks": 2}) for i, row in enumerate(rows)]
    tool_fields = np.empty(len(rows), dtype=object)
    tool_fields[:] = [row.get("fields") for row in rows]
    non_tensors = {
        "data_source": np.array([row.get("data_source", "ramp") for row in rows], dtype=object),
        "reward_model": np.array([{"style": "rule", "ground_truth": RAMP_GT} for _ in rows], dtype=object),
        "extra_info": extra_infos,
        "__num_turns__": np.array([row.get("turns", 3) for row in rows]),
    }
    if any("agent_name" in row for row in rows):  # verl sends it as np.array([name] * n): numpy strings
        non_tensors["agent_name"] = np.array([row.get("agent_name", "masksearch_agent") for row in rows])
    if any(row.get("fields") is not None for row in rows):
        non_tensors["tool_extra_fields"] = tool_fields
    data = DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask}, non_tensors=non_tensors
    )
    return data, [len(r) for r in responses]


def _fields(searches: int, errors: int = 0) -> dict:
    return {"model_turns": searches + 1, "env_turns": searches, "search_count": searches, "search_calls": searches,
            "search_errors": errors, "finish_reason": "answer", "turn_scores": [], "tool_rewards": []}


ROLLOUT_KEYS = {"rollout_turns", "rollout_searches", "rollout_search_calls", "rollout_search_errors",
                "rollout_search_limit_hits", "rollout_response_tokens"}


# ------------------------------------------------------------------------------------------------- registration
def test_registered_in_verl_as_a_dapo_manager():
    from verl.experimental.reward_loop.reward_manager import DAPORewardManager, get_reward_manager_cls

    from reward.manager import MaskSearchRewardManager

    assert get_reward_manager_cls("masksearch") is MaskSearchRewardManager
    assert issubclass(MaskSearchRewardManager, DAPORewardManager)
    # the shaping is inherited, not re-implemented: only run_single is ours
    assert {k for k, v in vars(MaskSearchRewardManager).items() if callable(v)} == {"run_single"}


def test_recipes_select_the_manager_and_verl_builds_it(tokenizer_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

    from reward.manager import MaskSearchRewardManager

    for recipe in ("ramp_dapo/qwen2.5-1.5b_8gpu", "hotpotqa_dapo/qwen2.5-7b_8gpu", "quickstart/qwen2.5-0.5b_cpu"):
        group, name = recipe.split("/")
        with initialize_config_dir(config_dir=str(REPO / "recipes" / "configs" / group), version_base=None):
            cfg = compose(config_name=name)
        OmegaConf.resolve(cfg)
        assert cfg.reward.reward_manager.name == "masksearch", recipe
        assert resolve_reward_manager_cls(cfg) is MaskSearchRewardManager
    manager = load_reward_manager(cfg, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert isinstance(manager, MaskSearchRewardManager) and manager.overlong_buffer_cfg.enable
    assert manager.max_resp_len == cfg.data.max_response_length


# ------------------------------------------------------------------------------------- overlong shaping = dapo's
@pytest.mark.parametrize(
    ("buffer", "penalty", "log", "enable"),
    [(16, 1.0, True, True), (8, 0.5, False, True), (16, 1.0, True, False)],
    ids=["log", "no-log", "disabled"],
)
async def test_overlong_shaping_equals_verl_dapo(tokenizer_dir, buffer, penalty, log, enable):
    rows = [
        {"response": GOOD, "fields": _fields(1)},
        {"response": HALF, "fields": _fields(0)},
        {"response": FILLER + GOOD, "fields": _fields(1, errors=1)},
        {"response": FILLER * 2 + HALF, "fields": None, "turns": 2},
        {"response": FILLER + GOOD + " trailing text", "fields": _fields(2)},
    ]
    probe = _worker("dapo", tokenizer_dir, *_overlong(64, 16))
    _, lengths = _rollouts(probe.input_tokenizer, rows)
    max_len = sorted(lengths)[2]  # the shortest responses fit, the longer ones fall in or beyond the buffer
    overrides = _overlong(max_len, buffer, penalty, log, enable)
    dapo = _worker("dapo", tokenizer_dir, *overrides)
    ours = _worker("masksearch", tokenizer_dir, *overrides)
    assert type(ours.reward_manager).__name__ == "MaskSearchRewardManager"

    theirs = await dapo.compute_score_batch(_rollouts(dapo.input_tokenizer, rows)[0])
    mine = await ours.compute_score_batch(_rollouts(ours.input_tokenizer, rows)[0])

    assert [m["reward_score"] for m in mine] == [t["reward_score"] for t in theirs]  # exactly, not approximately
    for m, t, length in zip(mine, theirs, lengths, strict=True):
        assert set(m["reward_extra_info"]) == set(t["reward_extra_info"]) | ROLLOUT_KEYS
        assert {k: v for k, v in m["reward_extra_info"].items() if k not in ROLLOUT_KEYS} == t["reward_extra_info"]
        expected = min(-(length - (max_len - buffer)) / buffer * penalty, 0) if enable else 0.0
        assert float(m["reward_score"]) == pytest.approx(m["reward_extra_info"]["score"] + expected)
        assert ("overlong_reward" in m["reward_extra_info"]) == (log and enable)
    penalties = [float(m["reward_score"]) - m["reward_extra_info"]["score"] for m in mine]
    if enable:  # the inputs exercise both sides of the buffer
        assert min(penalties) < 0 and max(penalties) == 0
    else:
        assert penalties == [0.0] * len(rows)


# ------------------------------------------------------------------------------ rollout fields reach the reward
@pytest.mark.parametrize("entry", ["compute_score", "compute_score_sync"])
async def test_compute_score_sees_the_rollout_fields(tokenizer_dir, penalising_reward, entry):
    rows = [
        {"response": GOOD, "fields": _fields(1), "turns": 4},
        {"response": GOOD, "fields": _fields(0), "turns": 2},  # same text, but the environment saw no search
    ]
    ours = _worker("masksearch", tokenizer_dir, *_overlong(512, 16), reward_path=str(penalising_reward),
                   reward_name=entry)
    assert ours.reward_manager.is_async_reward_score == (entry == "compute_score")
    searched, lazy = await ours.compute_score_batch(_rollouts(ours.input_tokenizer, rows)[0])
    assert searched["reward_extra_info"]["seen_searches"] == 1.0 and lazy["reward_extra_info"]["seen_searches"] == 0.0
    assert searched["reward_extra_info"]["seen_turns"] == 4.0 and lazy["reward_extra_info"]["seen_turns"] == 2.0
    assert searched["reward_score"] == 1.0 and lazy["reward_score"] == 0.5
    assert lazy["reward_extra_info"]["acc"] == 1.0  # the filter metric keeps the answer credit

    # verl's own dapo manager, same config and inputs: compute_score never sees the count, so no penalty applies
    dapo = _worker("dapo", tokenizer_dir, *_overlong(512, 16), reward_path=str(penalising_reward), reward_name=entry)
    for output in await dapo.compute_score_batch(_rollouts(dapo.input_tokenizer, rows)[0]):
        assert output["reward_extra_info"]["seen_searches"] == -1.0 and output["reward_score"] == 1.0


async def test_shared_extra_info_is_neither_mixed_up_nor_mutated(tokenizer_dir, penalising_reward):
    """Rollouts of one prompt may share one extra_info dict; they are scored concurrently (asyncio.gather)."""
    shared = {"index": 7, "num_masks": 2, "question": "Fill in the blanks."}
    before = dict(shared)
    rows = [{"response": GOOD, "fields": _fields(i % 3), "turns": 1 + i, "extra_info": shared} for i in range(12)]
    ours = _worker("masksearch", tokenizer_dir, reward_path=str(penalising_reward))
    data, _ = _rollouts(ours.input_tokenizer, rows)
    assert all(info is shared for info in data.non_tensor_batch["extra_info"])
    outputs = await ours.compute_score_batch(data)
    assert [o["reward_extra_info"]["seen_searches"] for o in outputs] == [float(i % 3) for i in range(12)]
    assert [o["reward_extra_info"]["seen_turns"] for o in outputs] == [float(1 + i) for i in range(12)]
    assert shared == before


async def test_rollout_counts_are_in_every_sample(tokenizer_dir):
    rows = [
        {"response": GOOD, "fields": _fields(2, errors=1), "turns": 6},
        {"response": HALF, "fields": None, "turns": 1},  # a loop that reports no fields: zeros, same keys
        {"response": GOOD, "fields": {"search_count": True, "search_errors": "n/a"}, "turns": 3},
    ]
    ours = _worker("masksearch", tokenizer_dir, "+reward.custom_reward_function.reward_kwargs.ramp_metric=recall")
    outputs = await ours.compute_score_batch(_rollouts(ours.input_tokenizer, rows)[0])
    infos = [o["reward_extra_info"] for o in outputs]
    assert all(set(info) == set(infos[0]) for info in infos)  # verl stacks the first sample's keys
    ours_keys = {"score", "acc", "format", "recall", "judge", "judge_fallback", "num_searches"}
    assert ours_keys | ROLLOUT_KEYS <= set(infos[0])
    stacked = {key: np.array([info[key] for info in infos]) for key in ROLLOUT_KEYS}
    assert stacked["rollout_turns"].tolist() == [6.0, 1.0, 3.0]
    assert stacked["rollout_searches"].tolist() == [2.0, 0.0, 1.0]
    assert stacked["rollout_search_errors"].tolist() == [1.0, 0.0, 0.0]  # a non-numeric value counts as absent
    # the response's own tokens (padding not counted), what verl logs as response_length for training batches
    lengths = [len(ours.input_tokenizer.encode(row["response"], add_special_tokens=False)) for row in rows]
    assert stacked["rollout_response_tokens"].tolist() == [float(n) for n in lengths]
    assert all(array.dtype.kind == "f" for array in stacked.values())
    # our real reward scored the text: num_searches is read from the response, the rollout's count from the loop
    assert [info["num_searches"] for info in infos] == [1, 0, 1]
    assert [o["reward_score"] for o in outputs] == pytest.approx([1.0, 0.75, 1.0])


async def test_agent_name_picks_the_format_rules(tokenizer_dir):
    """The same hermes response (verl's tool_agent loop, decoded without special tokens) is well formed for a
    tool_agent row and untagged text for a tag-loop row: the row's agent_name, not the config, decides."""
    call = '<tool_call>\n{"name": "search", "arguments": {"query": "Eiffel Tower designer"}}\n</tool_call>'
    hermes = (
        "I need the designer.\n" + call + "\nuser\n<tool_response>\nDoc 1 (Title: Eiffel Tower) opened in 1889."
        "\n</tool_response>\nassistant\n" + answer_block(["Gustave Eiffel", "1889"]) + "<|im_end|>"
    )
    rows = [
        {"response": hermes, "fields": None, "agent_name": "tool_agent"},
        {"response": hermes, "fields": None, "agent_name": "masksearch_agent"},
    ]
    ours = _worker("masksearch", tokenizer_dir)
    tool_row, tag_row = await ours.compute_score_batch(_rollouts(ours.input_tokenizer, rows)[0])
    assert tool_row["reward_score"] == 1.0 and tool_row["reward_extra_info"]["num_searches"] == 1
    assert tag_row["reward_score"] == 0.0 and tag_row["reward_extra_info"]["format_code"] == 11  # untagged text
