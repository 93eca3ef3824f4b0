"""More than one training process, rehearsed on one CPU machine (gloo): what a cluster run does, at toy size.

1. torchrun SFT with 2 processes through recipes/launch/sft_torchrun.sh -> a sharded checkpoint + an HF model dir,
   which every RL run below starts from (the RL stage loads what multi-process SFT wrote).
2. DAPO through verl's main_ppo with 2 FSDP ranks (trainer.n_gpus_per_node=2: two logical device slots) next to the
   same run with 1 rank: parameters are really sharded (each rank's checkpoint file holds about half of them), loss,
   grad norm, entropy and reward agree step by step, and the 2-rank checkpoint merges in one process
   (verl.model_merger, our documented export path) into an HF model directory equal to the 1-rank run's, which
   the eval harness's HF policy loads.
3. Two Ray nodes on one machine, started by recipes/launch/ray_head.sh and ray_worker.sh (own ports, temp dirs,
   the worker at 127.0.0.2, logical resources), a job submitted with ray_submit.sh and
   trainer.nnodes=2: training actors and agent-loop workers on both nodes, every agent-loop worker reaching the
   retrieval server, offline W&B; ray_down.sh removes exactly the processes these nodes started.

Determinism: the RL runs roll out greedily (top-k 1), one response per prompt (GRPO's advantage of a lone
response is its score), with an entropy bonus so every update has a gradient; DAPO's group filter is off (greedy
groups would all be filtered). The batch order is the curriculum sampler's, seeded, the same for any world size.

Marked ``multiproc``: not part of ``make test``; ``make test-multiproc`` (called by .ci/run) runs this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "recipes" / "launch"
RECIPE = "quickstart/tiny_cpu"
SFT_STEPS = 20
RL_STEPS = 2
WALL: dict[str, float] = {}  # measured wall times, printed at the end (docs/cluster.md quotes them)


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's environment without anything that would join another Ray cluster or platform."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VERL_PLATFORM", "WANDB_MODE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(VERL_PLATFORM="cpu", RAY_USAGE_STATS_ENABLED="0", MASKSEARCH_LOG_LEVEL="INFO", **extra)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic world -> BM25 index -> RAMP parquet -> tiny model -> oracle SFT parquet (the quickstart's stages)."""
    from masksearch_rl.quickstart import QuickstartConfig, stage_index, stage_model, stage_ramp, stage_world
    from masksearch_rl.rl.launch import compose_recipe
    from masksearch_rl.sft.oracle import OracleConfig, write_oracle_sft

    out = tmp_path_factory.mktemp("multiproc")
    started = time.perf_counter()
    cfg = QuickstartConfig(out_dir=out, passages=400, questions=40)
    stage_world(out / "world", cfg)
    stage_index(out / "world" / "corpus.jsonl", out / "index")
    stage_ramp(out / "world" / "corpus.jsonl", out / "ramp", cfg)
    model = stage_model(out / "world" / "corpus.jsonl", out / "model", cfg)
    search_env = compose_recipe(RECIPE).search_env
    write_oracle_sft(out / "ramp" / "items.jsonl", out / "index", out / "sft_data",
                     OracleConfig(topk=int(search_env.topk), max_info_tokens=int(search_env.max_info_tokens),
                                  tokenizer=str(model), wording="fixed", seed=0))
    WALL["data"] = time.perf_counter() - started
    return out


@pytest.fixture(scope="module")
def server(world):
    from masksearch_rl.retrieval.server_process import ServerProcess

    cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(world / "index")]
    with open(world / "server.log", "w") as log, ServerProcess(cmd, log=log) as process:
        yield process.url


# ------------------------------------------------------------------------------------------ 1. torchrun SFT x 2
@pytest.fixture(scope="module")
def sft(world):
    """``N_GPUS=2 recipes/launch/sft_torchrun.sh quickstart/tiny_cpu ...``: torchrun, 2 processes, gloo."""
    from masksearch_rl.retrieval.server_process import free_port

    data, ckpt = world / "sft_data", world / "sft_ckpt"
    cmd = [
        "bash", str(LAUNCH / "sft_torchrun.sh"), "quickstart/tiny_cpu",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
        f"model.path={world / 'model'}", f"trainer.default_local_dir={ckpt}",
        f"trainer.total_training_steps={SFT_STEPS}", f"trainer.save_freq={SFT_STEPS}",
        f"hydra.run.dir={world / 'sft_hydra'}",
        "data.custom_cls.path=pkg://masksearch_rl.sft.rl_layout_dataset", "data.custom_cls.name=RLLayoutSFTDataset",
    ]
    for _ in range(3):  # a free port can be taken by another process before torchrun binds it: try another
        env = _env(N_GPUS="2", PYTHON=sys.executable, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=world, env=env, capture_output=True, text=True, timeout=900)
        WALL["sft_torchrun_2proc"] = time.perf_counter() - started
        log = result.stdout + result.stderr
        if result.returncode == 0 or "EADDRINUSE" not in log:
            break
    (world / "sft.log").write_text(log)
    assert result.returncode == 0, log[-6000:]
    return ckpt, log


def test_torchrun_sft_with_two_processes_writes_a_sharded_checkpoint_and_an_hf_model(sft):
    from transformers import AutoModelForCausalLM

    ckpt, log = sft
    step_dir = ckpt / f"global_step_{SFT_STEPS}"
    # Two processes really trained: one model/optimizer shard per rank of a world of 2.
    for rank in (0, 1):
        assert (step_dir / f"model_world_size_2_rank_{rank}.pt").is_file()
        assert (step_dir / f"optim_world_size_2_rank_{rank}.pt").is_file()
    losses = [float(x) for x in re.findall(r"train/loss:([\d.]+)", log)]
    assert len(losses) == SFT_STEPS and losses[-1] < losses[0] - 1.0, losses
    # The trained model, as an HF directory at the path the RL stage is given.
    model = AutoModelForCausalLM.from_pretrained(ckpt / "hf_model")
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


# ------------------------------------------------------------------------------------------ 2. FSDP: 2 ranks vs 1
def _overrides(world: Path, sft_ckpt: Path, url: str, run_dir: Path) -> list[str]:
    return [
        f"paths.data_dir={world}",
        f"paths.model_dir={sft_ckpt / 'hf_model'}",  # the torchrun SFT's model: the RL stage loads it
        f"paths.ckpt_dir={run_dir / 'checkpoints'}",
        f"search_env.backend.url={url}",
        f"trainer.total_training_steps={RL_STEPS}",
        f"trainer.save_freq={RL_STEPS}",
        "trainer.test_freq=-1",
        "trainer.logger=[console,file]",
        f"trainer.rollout_data_dir={run_dir / 'rollouts'}",
        # Deterministic rollouts (see the module docstring): top-1 sampling is greedy decoding. Not temperature=0:
        # verl's trainer divides the logits by the rollout temperature when it recomputes log-probs.
        "actor_rollout_ref.rollout.top_k=1",
        "actor_rollout_ref.rollout.n=1",
        "algorithm.filter_groups.enable=false",
        "actor_rollout_ref.actor.entropy_coeff=0.01",
    ]


def _run_ppo(name: str, world: Path, sft_ckpt: Path, url: str, ranks: int) -> dict:
    from masksearch_rl.rl.launch import PPORun, run_ppo
    from masksearch_rl.rl.report import load_metrics

    import tempfile

    run_dir = world / name
    # Its own Ray temp dir, short: Ray's socket paths live under it (a Unix socket path has at most 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="msr-")
    overrides = [*_overrides(world, sft_ckpt, url, run_dir), f"trainer.n_gpus_per_node={ranks}",
                 f"++ray_kwargs.ray_init._temp_dir={ray_tmp}"]
    env = {k: v for k, v in _env().items() if k in ("VERL_PLATFORM", "MASKSEARCH_LOG_LEVEL", "RAY_USAGE_STATS_ENABLED")}
    run = PPORun(RECIPE, overrides, log_path=run_dir / "main_ppo.log", metrics_path=run_dir / "metrics.jsonl",
                 env=env, timeout_s=900)
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        WALL[name] = run_ppo(run)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    # main_ppo's local Ray is gone with it: nothing of it may be left running.
    assert _wait_gone([ray_tmp]) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)
    steps = [s for s in load_metrics(run_dir / "metrics.jsonl") if "actor/pg_loss" in s]
    return {"dir": run_dir, "steps": steps, "log": run.log_path.read_text(),
            "actor": run_dir / "checkpoints" / "masksearch-rl" / "quickstart-tiny-cpu" / f"global_step_{RL_STEPS}"
            / "actor"}


@pytest.fixture(scope="module")
def fsdp(world, sft, server):
    one = _run_ppo("rl_1rank", world, sft[0], server, ranks=1)
    two = _run_ppo("rl_2rank", world, sft[0], server, ranks=2)
    return one, two


def test_dapo_with_two_fsdp_ranks_runs_the_steps_from_the_torchrun_sft_model(fsdp, sft):
    _, two = fsdp
    assert [s["step"] for s in two["steps"]] == list(range(1, RL_STEPS + 1))
    for step in two["steps"]:
        assert math.isfinite(step["actor/pg_loss"]) and step["actor/grad_norm"] > 0
        assert abs(step["rollout_corr/kl"]) < 0.05  # both rollout replicas got the trained weights
    # Each HF rollout replica loaded the torchrun SFT's model (MASKSEARCH_LOG_LEVEL=INFO makes them say so).
    loaded = re.findall(r"HF rollout server (\d+) ready on cpu \(([^,]+),", two["log"])
    assert sorted({int(rank) for rank, _ in loaded}) == [0, 1], loaded
    assert {Path(path).resolve() for _, path in loaded} == {(sft[0] / "hf_model").resolve()}


def _shard_numels(path: Path) -> dict[str, int]:
    import torch
    from torch.distributed.tensor import DTensor

    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: (v.to_local() if isinstance(v, DTensor) else v).numel() for k, v in state.items()
            if hasattr(v, "numel")}


def test_two_ranks_hold_disjoint_halves_of_the_parameters(fsdp):
    one, two = fsdp
    full = _shard_numels(one["actor"] / "model_world_size_1_rank_0.pt")
    shards = [_shard_numels(two["actor"] / f"model_world_size_2_rank_{rank}.pt") for rank in (0, 1)]
    assert set(shards[0]) == set(shards[1]) == set(full)
    total = sum(full.values())
    # Every tensor is split across the ranks (FSDP2 shards dim 0), nothing is replicated...
    for name, numel in full.items():
        assert shards[0][name] + shards[1][name] == numel, name
    # ...so each rank holds about half of the model, not all of it.
    for shard in shards:
        assert 0.4 * total < sum(shard.values()) < 0.6 * total


def test_two_ranks_match_one_rank_step_by_step(fsdp):
    one, two = fsdp
    assert len(one["steps"]) == len(two["steps"]) == RL_STEPS
    keys = ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/entropy", "actor/grad_norm",
            "actor/pg_clipfrac", "reward/format/mean")
    for a, b in zip(one["steps"], two["steps"]):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def merged(fsdp, world):
    """verl.model_merger (one process) turns each run's sharded actor checkpoint into an HF model directory."""
    out = {}
    for run in fsdp:
        target = run["dir"] / "hf"
        cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
               "--local_dir", str(run["actor"]), "--target_dir", str(target)]
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=world, env=_env(), capture_output=True, text=True, timeout=600)
        WALL[f"merge_{run['dir'].name}"] = time.perf_counter() - started
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        out[run["dir"].name] = target
    return out


def test_two_rank_checkpoint_merges_in_one_process_into_the_one_rank_model(merged, fsdp, sft):
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    def full(actor_dir: Path, world: int) -> dict:
        """Each parameter as the ranks' shards put back together (FSDP2 shards dim 0), in the training dtype."""
        shards = [torch.load(actor_dir / f"model_world_size_{world}_rank_{r}.pt", map_location="cpu",
                             weights_only=False) for r in range(world)]
        return {name: torch.cat([s[name].to_local() if isinstance(s[name], DTensor) else s[name] for s in shards])
                for name in shards[0]}

    one, two = full(fsdp[0]["actor"], 1), full(fsdp[1]["actor"], 2)
    start = load_file(sft[0] / "hf_model" / "model.safetensors")
    # The merge is exact: verl.model_merger, in one process, writes what the two ranks held (in the dtype of the
    # checkpoint's HF config, which verl writes as bfloat16 even for fp32 training; the merged dir says so).
    merged_two = load_file(merged["rl_2rank"] / "model.safetensors")
    assert set(merged_two) <= set(two)
    for name, tensor in merged_two.items():
        assert torch.equal(tensor, two[name].to(tensor.dtype)), name
    # The two runs took the same two optimizer steps: the 2-rank update equals the 1-rank update to within 1% of
    # its size, tensor by tensor, in fp32 (elementwise, Adam turns float-level gradient differences on near-zero
    # gradients into steps of up to lr, so the comparison is in norm).
    assert set(one) == set(two)
    moved = 0.0
    for name in one:
        base = start[name].float() if name in start else start["model.embed_tokens.weight"].float()
        update = (one[name].float() - base).norm()
        moved += float(update)
        assert (two[name].float() - one[name].float()).norm() <= 0.01 * update + 1e-7, name
    assert moved > 0  # training moved the weights


def test_merged_two_rank_checkpoint_loads_in_the_eval_policy(merged, world):
    import asyncio

    from envs.prompts import ramp_messages
    from masksearch_rl.eval.hf_policy import HFPolicy

    policy = HFPolicy(str(merged["rl_2rank"]), max_batch=2)
    item = json.loads((world / "ramp" / "items.jsonl").read_text().splitlines()[0])
    messages = ramp_messages(item["query"])
    reply = asyncio.run(policy.generate(messages, [], stop=["</search>", "</answer>"], max_tokens=32))
    assert reply.text and reply.finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------ 3. two Ray nodes
def _ray_env(**extra: str) -> dict[str, str]:
    env = _env(RAY=str(Path(sys.executable).parent / "ray"), PYTHON=sys.executable, **extra)
    # A head that finds a Ray token turns token authentication on; clients here then need token mode too
    # (ray_worker.sh and ray_submit.sh do this themselves).
    if Path.home().joinpath(".ray", "auth_token").is_file() and "RAY_AUTH_MODE" not in env:
        env["RAY_AUTH_MODE"] = "token"
    return env


def _ray_processes(temp_dirs: list[str]) -> list[str]:
    """Command lines of live processes naming one of ``temp_dirs`` (what ray_down.sh looks for)."""
    # -ww: whole command lines (ps cuts them at $COLUMNS otherwise, and something in this process sets it).
    lines = subprocess.run(["ps", "-ww", "-eo", "stat=,args="], capture_output=True, text=True).stdout.splitlines()
    return [line for line in lines if not line.lstrip().startswith("Z") and any(d in line for d in temp_dirs)]


def _wait_gone(temp_dirs: list[str], timeout_s: float = 30.0) -> list[str]:
    """The processes of ``temp_dirs`` still alive after up to ``timeout_s`` (Ray's daemons exit a moment after the
    driver or the signal)."""
    deadline = time.monotonic() + timeout_s
    while (left := _ray_processes(temp_dirs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _state(ray_env: dict[str, str], dashboard: str, what: str) -> list[dict]:
    result = subprocess.run([ray_env["RAY"], "list", what, f"--address={dashboard}", "--format=json", "--detail",
                             "--limit=1000"], capture_output=True, text=True, env=ray_env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def ray_nodes(world):
    """Head + worker on this machine via the project's scripts: own ports, temp dirs, node IPs and resources."""
    import tempfile

    from masksearch_rl.retrieval.server_process import free_port

    # Short temp dirs: Ray's socket paths live under them (a Unix socket path has at most 107 bytes).
    head_tmp, worker_tmp = tempfile.mkdtemp(prefix="msr-h-"), tempfile.mkdtemp(prefix="msr-w-")
    def ports(*names: str) -> str:
        return " ".join(f"--{name}={free_port()}" for name in names)

    node_ports = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                  "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    wandb_dir = world / "ray_wandb"
    wandb_dir.mkdir()
    temp_dirs = [head_tmp, worker_tmp]
    started = time.perf_counter()
    try:
        for attempt in range(3):  # free ports can be taken by others before Ray binds them: start over with new ones
            port, dashboard_port = free_port(), free_port()
            dashboard = f"http://127.0.0.1:{dashboard_port}"
            common = dict(N_GPUS="1", NUM_CPUS="8", RAY_PORT=str(port), WANDB_MODE="offline")
            # The head keeps Ray's choice of address (Ray replaces 127.0.0.1 by the machine's); the worker takes
            # another loopback address, so the two nodes differ in address as on a cluster.
            head_env = _ray_env(**common, RAY_TEMP_DIR=head_tmp, DASHBOARD_PORT=str(dashboard_port),
                                DASHBOARD_HOST="127.0.0.1", RAY_RESOURCES='{"masksearch_head": 1}',
                                RAY_START_ARGS=ports(*node_ports, "ray-client-server-port") + " --disable-usage-stats")
            worker_env = _ray_env(**common, NODE_IP="127.0.0.2", RAY_TEMP_DIR=worker_tmp, HEAD_ADDRESS="127.0.0.1",
                                  RAY_RESOURCES='{"masksearch_worker": 1}', RAY_START_ARGS=ports(*node_ports))
            outputs = []
            for script, env in (("ray_head.sh", head_env), ("ray_worker.sh", worker_env)):
                result = subprocess.run(["bash", str(LAUNCH / script)], env=env, capture_output=True, text=True,
                                        timeout=180)
                outputs.append((script, result))
                if result.returncode != 0:
                    break
            if all(r.returncode == 0 for _, r in outputs) or attempt == 2:
                break
            subprocess.run(["bash", str(LAUNCH / "ray_down.sh")], env={**head_env, "RAY_TEMP_DIR": " ".join(temp_dirs)},
                           capture_output=True, timeout=120)
        for script, result in outputs:
            assert result.returncode == 0, f"{script}:\n{(result.stdout + result.stderr)[-4000:]}"
        deadline = time.monotonic() + 120
        while True:
            nodes = [n for n in _state(head_env, dashboard, "nodes") if n["state"] == "ALIVE"]
            if len(nodes) == 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(nodes) == 2 and "127.0.0.2" in {n["node_ip"] for n in nodes}, nodes
        WALL["ray_two_nodes_up"] = time.perf_counter() - started
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{port}", "env": head_env, "nodes": nodes,
               "temp_dirs": temp_dirs,
               "wandb_dir": wandb_dir}
    finally:
        down = subprocess.run(["bash", str(LAUNCH / "ray_down.sh")],
                              env={**_ray_env(), "RAY_TEMP_DIR": " ".join(temp_dirs)},
                              capture_output=True, text=True, timeout=120)
        print(down.stderr.strip())
        if down.returncode == 0:
            for path in temp_dirs:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_job(world, sft, server, ray_nodes):
    run_dir = world / "rl_2node"
    env = {**ray_nodes["env"], "NNODES": "2", "N_GPUS": "1", "RAY_ADDRESS": ray_nodes["dashboard"],
           "MASKSEARCH_RETRIEVAL_URL": server, "MASKSEARCH_DATA_DIR": str(world),
           "MASKSEARCH_CKPT_DIR": str(run_dir / "checkpoints"), "WANDB_MODE": "offline",
           "WANDB_DIR": str(ray_nodes["wandb_dir"])}
    cmd = ["bash", str(LAUNCH / "ray_submit.sh"), RECIPE, f"paths.model_dir={sft[0] / 'hf_model'}",
           f"trainer.total_training_steps={RL_STEPS}", f"trainer.save_freq={RL_STEPS}", "trainer.test_freq=-1",
           "trainer.logger=[console,wandb]", "trainer.experiment_name=two-nodes",
           # One agent-loop worker per node (verl places them node by node).
           "actor_rollout_ref.rollout.agent.num_workers=2",
           "algorithm.filter_groups.enable=false"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=world, env=env, capture_output=True, text=True, timeout=900)
    WALL["rl_2node_job"] = time.perf_counter() - started
    log = result.stdout + result.stderr
    (run_dir).mkdir(exist_ok=True)
    (run_dir / "job.log").write_text(log)
    assert result.returncode == 0, log[-8000:]
    actors = _state(ray_nodes["env"], ray_nodes["dashboard"], "actors")
    return {"log": log, "actors": actors, "dir": run_dir}


def test_two_ray_nodes_run_dapo_steps_submitted_with_ray_submit(ray_job, ray_nodes):
    log = ray_job["log"]
    assert re.search(rf"step:{RL_STEPS} - ", log), log[-4000:]
    assert "trainer.nnodes=2" in log
    node_ip = {n["node_id"]: n["node_ip"] for n in ray_nodes["nodes"]}
    placed: dict[str, set[str]] = {}
    for actor in ray_job["actors"]:
        placed.setdefault(actor["class_name"], set()).add(node_ip.get(actor["node_id"], "?"))
    # verl's training workers (one FSDP rank per node), the HF rollout replicas and the agent-loop workers that
    # call the retrieval server: on both nodes.
    both = set(node_ip.values())
    training = {ip for name, ips in placed.items() if name.endswith("WorkerDict") for ip in ips}
    assert training == both, placed
    agent_loop = {ip for name, ips in placed.items() if name.startswith("AgentLoopWorker") for ip in ips}
    assert agent_loop == both, placed
    # Rank 1's checkpoint shard was written from the worker node onto the shared directory.
    actor_dir = ray_job["dir"] / "checkpoints" / "masksearch-rl" / "two-nodes" / f"global_step_{RL_STEPS}" / "actor"
    assert sorted(p.name for p in actor_dir.glob("model_world_size_2_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]


def test_the_retrieval_url_reaches_agent_loop_workers_on_both_nodes(ray_job, server):
    # Each agent-loop worker logs the backend it built (MASKSEARCH_LOG_LEVEL=INFO, forwarded by ray_submit.sh);
    # Ray prefixes a line from another node with its address.
    ready = [line for line in ray_job["log"].splitlines() if "search backend" in line and "ready" in line]
    assert ready and all(server in line for line in ready), ready
    assert any("AgentLoopWorker" in line and "ip=127.0.0.2" in line for line in ready), ready
    assert any("AgentLoopWorker" in line and "ip=127.0.0.2" not in line for line in ready), ready



PROBE = '''
import asyncio, json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=0)
def search(url):
    from masksearch_rl.retrieval.client import RetrievalServerBackend

    async def once():
        backend = RetrievalServerBackend(url)
        try:
            return await backend.search(["river", "town"], 3)
        finally:
            await backend.aclose()

    return ray.get_runtime_context().get_node_id(), [len(hits) for hits in asyncio.run(once())]

ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
tasks = [search.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(sys.argv[2])
         for n in nodes]
print(json.dumps(ray.get(tasks)))
'''


def test_the_retrieval_server_answers_ray_workers_on_both_nodes(ray_job, ray_nodes, server):
    """The tiny model of this rehearsal rarely searches; so a Ray task pinned to each node searches through the
    client the agent loop uses, at the URL the job was given."""
    result = subprocess.run([sys.executable, "-c", PROBE, ray_nodes["gcs"], server], capture_output=True, text=True,
                            env=ray_nodes["env"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert {node for node, _ in answers} == {n["node_id"] for n in ray_nodes["nodes"]}
    assert all(counts == [3, 3] for _, counts in answers), answers


def test_offline_wandb_logged_both_steps_of_the_two_node_run(ray_job, ray_nodes, wandb_history):
    history = wandb_history(ray_nodes["wandb_dir"])
    assert set(range(1, RL_STEPS + 1)) <= set(history), sorted(history)
    for step in range(1, RL_STEPS + 1):
        assert math.isfinite(history[step]["actor/pg_loss"])
        assert "env/search_count/mean" in history[step]
    # The run's config (in the offline transaction log; files/config.yaml is written only by a sync).
    trainer = _offline_config(ray_nodes["wandb_dir"])["trainer"]
    assert (trainer["nnodes"], trainer["n_gpus_per_node"]) == (2, 1)


def _offline_config(root: Path) -> dict:
    """The config an offline W&B run under ``root/wandb`` recorded (its ``config`` records, in order)."""
    from wandb.proto import wandb_internal_pb2

    [path] = root.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, config = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):  # the LevelDB-style log tests/conftest.py:read_offline_history reads
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            # The run record carries the config given to wandb.init; config records, later updates.
            for update in ([record.run.config] if record.HasField("run") else []) + (
                    [record.config] if record.HasField("config") else []):
                config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                               for item in update.update})
    return config


def test_ray_down_removes_exactly_the_processes_of_our_two_nodes(ray_job, ray_nodes):
    """Runs after the job: ray_down.sh with both temp dirs leaves none of our Ray processes (and no other)."""
    temp_dirs = ray_nodes["temp_dirs"]
    before = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    others = {line.split()[0] for line in before.splitlines() if "raylet" in line and
              not any(d in line for d in temp_dirs)}
    assert _ray_processes(temp_dirs), "our nodes should be up before ray_down.sh"
    down = subprocess.run(["bash", str(LAUNCH / "ray_down.sh")],
                          env={**ray_nodes["env"], "RAY_TEMP_DIR": " ".join(temp_dirs)},
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _wait_gone(temp_dirs, timeout_s=5) == []
    after = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    assert others <= {line.split()[0] for line in after.splitlines()}, "another Ray instance was touched"


def test_report_wall_times():
    """Last in the file: the measured wall times (seconds), for docs/cluster.md."""
    print("\nwall times (s):", json.dumps({k: round(v, 1) for k, v in WALL.items()}))
