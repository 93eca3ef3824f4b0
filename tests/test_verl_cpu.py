"""Our verl extensions for machines without a GPU: the "cpu" platform, the "hf" rollout backend, the trainer's
per-step episode metrics, and the run report.

The end-to-end proof (verl's main_ppo training with all of them) is tests/test_quickstart_training.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (verl resolves its platform once per process)."""
    full_env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    full_env.update(env)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


PLATFORM_PROBE = """
import json, torch, verl
from verl.utils.device import get_device_name, get_device_id, get_nccl_backend, get_torch_device, get_resource_name
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
device = get_device_id()
x = torch.ones(2).to(device)
print(json.dumps({
    "name": get_device_name(), "device": str(device), "backend": get_nccl_backend(), "ray": get_resource_name(),
    "to_device_ok": x.device.type, "rng": get_torch_device().get_rng_state().numel() > 0,
    "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead,
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto-detection picks the GPU platform on a GPU machine")
@pytest.mark.parametrize("env", [{"VERL_PLATFORM": "cpu"}, {}], ids=["explicit", "auto-detected"])
def test_cpu_platform_is_what_verl_sees(env):
    probe = json.loads(_python(PLATFORM_PROBE, **env))
    assert probe == {
        "name": "cpu", "device": "cpu", "backend": "gloo", "ray": "GPU", "to_device_ok": "cpu", "rng": True,
        "engine": True,
    }


def test_verl_process_group_opens_on_the_cpu_platform():
    """verl's own init would ask for "cpu:gloo,cpu:gloo"; our worker opens plain gloo first and verl accepts it."""
    code = """
import os, torch, torch.distributed as dist, verl
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
from masksearch_rl.verl_ext.workers import ensure_cpu_process_group
from verl.utils.distributed import initialize_global_process_group_ray
opened = ensure_cpu_process_group()
initialize_global_process_group_ray()  # a no-op now; it would raise without our group
t = torch.ones(3); dist.all_reduce(t)
print(opened, dist.get_backend(), t.tolist())
"""
    from masksearch_rl.retrieval.server_process import free_port

    assert _python(code, VERL_PLATFORM="cpu", PORT=str(free_port())) == "True gloo [1.0, 1.0, 1.0]"


def test_plugins_register_the_rollout_backend_and_trainer_modes():
    code = """
import verl
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import get_rollout_replica_class
from verl.trainer.ppo.v1 import get_trainer_cls
print(get_rollout_class("hf", "async").__name__, get_rollout_replica_class("hf").__name__,
      get_trainer_cls("masksearch_sync").__name__, get_trainer_cls("masksearch_curriculum").__name__)
"""
    assert _python(code, VERL_PLATFORM="cpu") == (
        "HFServerAdapter HFReplica MaskSearchPPOTrainer CurriculumPPOTrainer"
    )


# ------------------------------------------------------------------------------------------- HF generation server
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from masksearch_rl.tiny_model import build_tiny_model

    texts = [f"Passage {i} about <search> the river Alon {i} and the town of Bera {i % 7} </search>" for i in range(300)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, vocab_size=400, seed=1)


def _server(model_dir, **rollout):
    from omegaconf import OmegaConf

    from masksearch_rl.verl_ext.hf_rollout import HFGenerationServer

    config = OmegaConf.create({
        "_target_": "verl.workers.config.RolloutConfig", "name": "hf", "prompt_length": 64, "response_length": 24,
        "max_num_seqs": 8, **rollout,
    })
    model_config = OmegaConf.create({"path": str(model_dir)})
    return HFGenerationServer(config, model_config, replica_rank=0, device="cpu", batch_wait_s=0.01)


def _reference_greedy(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    with torch.no_grad():
        logits = model(out).logits[0, len(prompt) - 1 : -1]
    new = out[0, len(prompt):]
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, new[:, None])[:, 0]
    return new.tolist(), logprobs.tolist()


def test_hf_server_greedy_batches_equal_single_requests_with_exact_logprobs(model_dir):
    server = _server(model_dir)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]

    async def scenario():
        await server.launch_server()
        params = {"temperature": 0, "logprobs": True, "max_tokens": 12}
        together = await asyncio.gather(*[server.generate(p, params, f"r{i}") for i, p in enumerate(prompts)])
        return together, dict(server.stats)

    outputs, stats = asyncio.run(scenario())
    assert stats["requests"] == 4 and stats["batches"] == 1  # one padded generate for four concurrent turns
    for prompt, output in zip(prompts, outputs):
        ids, logprobs = _reference_greedy(model_dir, prompt, 12)
        assert output.token_ids == ids[: len(output.token_ids)] and len(output.token_ids) == 12
        assert output.log_probs == pytest.approx(logprobs[:12], abs=1e-4)


def test_hf_server_honours_stop_strings_max_tokens_and_weight_updates(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    server = _server(model_dir)
    prompt = tokenizer.encode("the river Alon 3 and")

    async def scenario():
        await server.launch_server()
        sampled = await server.generate(prompt, {"temperature": 1.0, "max_tokens": 5}, "a")
        # New weights: every parameter from a differently seeded model of the same shape.
        torch.manual_seed(123)
        other = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(model_dir).config)
        loaded = await server.update_weights(list(other.state_dict().items()), global_steps=7)
        greedy = await server.generate(prompt, {"temperature": 0, "max_tokens": 10}, "b")
        return sampled, loaded, greedy, other

    sampled, loaded, greedy, other = asyncio.run(scenario())
    assert len(sampled.token_ids) <= 5
    assert loaded == len(other.state_dict()) and greedy.extra_fields["global_steps"] == 7
    expected = other.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                              eos_token_id=other.generation_config.eos_token_id)[0, len(prompt):].tolist()
    assert greedy.token_ids == expected[: len(greedy.token_ids)]

    stop_server = _server(model_dir)

    async def with_stop():
        await stop_server.launch_server()
        text = tokenizer.decode(expected)
        # Stop at a string the new model is known to produce: generation ends at the token completing it.
        stop = text[2:6] if len(text) >= 6 else text
        await stop_server.update_weights(list(other.state_dict().items()), None)
        out = await stop_server.generate(prompt, {"temperature": 0, "max_tokens": 10, "stop": [stop]}, "c")
        return stop, out

    stop, out = asyncio.run(with_stop())
    # transformers matches stop strings on the text so far (prompt included), ending at the completing token.
    assert stop in tokenizer.decode(prompt + out.token_ids)
    assert stop not in tokenizer.decode(prompt + out.token_ids[:-1])
    assert len(out.token_ids) < 10


def test_hf_server_rejects_prompts_without_room(model_dir):
    server = _server(model_dir, prompt_length=4, response_length=4)

    async def scenario():
        await server.launch_server()
        await server.generate(list(range(1, 9)), {"temperature": 0}, "x")

    with pytest.raises(ValueError, match="no room"):
        asyncio.run(scenario())


# ------------------------------------------------------------------------------------------- metrics and report
def test_episode_metrics_average_env_fields_and_reward_components():
    from masksearch_rl.verl_ext.trainer import episode_metrics

    rows = [
        {"search_count": 2, "search_errors": 0, "response_truncated": False, "finish_reason": "answer",
         "reward_extra_info": {"acc": 1.0, "format": 1.0, "note": "text"}},
        {"search_count": 0, "search_errors": 1, "response_truncated": True, "finish_reason": "length",
         "reward_extra_info": {"acc": 0.0, "format": 0.0}},
        None,
    ]
    metrics = episode_metrics(rows)
    assert metrics["env/search_count/mean"] == 1.0
    assert metrics["env/search_errors/mean"] == 0.5
    assert metrics["env/response_truncated/mean"] == 0.5
    assert metrics["env/finish/answer"] == 0.5 and metrics["env/finish/length"] == 0.5
    assert metrics["reward/acc/mean"] == 0.5 and metrics["reward/format/mean"] == 0.5
    assert "reward/note/mean" not in metrics


def test_a_step_whose_searches_all_come_back_empty_is_loud(caplog):
    """A retrieval outage (every search failed or found no passage) shows as env/search_useless_frac = 1 and one
    warning -- never as a merely flat reward."""
    import logging

    from masksearch_rl.verl_ext import trainer

    trainer._last_useless_warning = -1e9
    healthy = [{"search_calls": 2, "search_errors": 0, "search_empty": 1}, {"search_calls": 1}]
    assert trainer.episode_metrics(healthy)["env/search_useless_frac"] == pytest.approx(1 / 3)
    episode_rows = [{"search_calls": 2, "search_errors": 1, "search_empty": 1}, {"search_calls": 1, "search_empty": 1}]
    with caplog.at_level(logging.WARNING, logger=trainer.__name__):
        metrics = trainer.episode_metrics(episode_rows)
        trainer.episode_metrics(episode_rows)  # the next step within a minute: no second warning
    assert metrics["env/search_useless_frac"] == 1.0 and metrics["env/search_empty/mean"] == 1.0
    assert len([r for r in caplog.records if "failed or found no passage" in r.getMessage()]) == 1


def test_report_reads_verl_file_logger_and_plots(tmp_path):
    from masksearch_rl.rl.report import load_metrics, plot_metrics, summarize

    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 2, "data": {"critic/score/mean": 0.5, "env/search_count/mean": 1.5, "response_length/mean": 80}},
        {"step": 1, "data": {"critic/score/mean": -0.5, "env/search_count/mean": 1.0, "response_length/mean": 90,
                             "reward/format/mean": 0.25}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    steps = load_metrics(path)
    assert [s["step"] for s in steps] == [1, 2]
    summary = summarize(steps)
    assert summary["reward"] == {"metric": "critic/score/mean", "first": -0.5, "last": 0.5, "steps": 2}
    assert summary["format_rate"]["steps"] == 1
    pngs = plot_metrics(steps, tmp_path / "plots")
    assert sorted(p.name for p in pngs) == [
        "format_rate.png", "response_length.png", "reward.png", "searches_per_episode.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    path.write_text('{"step": 1, "data": {}}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        load_metrics(path)
