"""Launch scripts (single node, Ray, Slurm RL and SFT) parse, and the commands they print compose against the
installed verl 0.9.1 with the node/GPU counts as hydra overrides; the eval val parquet override composes too."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "recipes" / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("slurm/*.sbatch")])
SHARED_QA = Path(os.environ["MASKSEARCH_SHARED_DATA"]) / "qa"  # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def verl_imported():
    import verl  # noqa: F401  (loads our plugins, as main_ppo does)


def compose(config_dir: Path, name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=name, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env},
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_all_launch_scripts_exist():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"single_node.sh", "ray_head.sh", "ray_worker.sh", "ray_submit.sh", "slurm/ppo.sbatch",
            "slurm/sft.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_script_parses_and_is_executable(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n") and os.access(script, os.X_OK)
    if script.suffix == ".sbatch":
        header = script.read_text().split("set -euo pipefail")[0]
        for directive in ("--nodes=", "--gpus-per-node=", "--ntasks-per-node=1", "--time="):
            assert f"#SBATCH {directive}" in header
        assert "Usage" in header and "sbatch" in header


@pytest.mark.parametrize("nodes", ["n0", "n0 n1 n2 n3"])
def test_slurm_ppo_composes_with_node_and_gpu_counts(nodes):
    count = len(nodes.split())
    lines = dry_run("slurm/ppo.sbatch", "hotpotqa_dapo/qwen2.5-7b_8gpu", "paths.stage1_model=/shared/ramp-7b/hf",
                    NODES=nodes, SLURM_JOB_NUM_NODES=str(count), GPUS_PER_NODE="4",
                    MASKSEARCH_RETRIEVAL_URL="http://10.0.0.5:8000", MASKSEARCH_DATA_DIR="/shared/data")
    exports = [line for line in lines if line[0] == "export"]
    lines = [line for line in lines if line[0] != "export"]
    ray_lines, main = lines[:-1], lines[-1]
    # Multi-node: a Ray head on the first node, a worker on each other node; one node: no Ray set-up at all.
    assert len(ray_lines) == (count if count > 1 else 0)
    if count > 1:
        assert ray_lines[0][:6] == ["srun", "--nodes=1", "--ntasks=1", "-w", "n0", "ray"] and "--head" in ray_lines[0]
        assert [line[4] for line in ray_lines[1:]] == ["n1", "n2", "n3"]
        assert all("--address=n0:6379" in line and "--num-gpus=4" in line for line in ray_lines[1:])
        # main_ppo joins that cluster: RAY_ADDRESS names the head, and resources come from `ray start`, not ray.init.
        assert ["export", "RAY_ADDRESS=n0:6379"] in exports
        assert {"++ray_kwargs.ray_init.num_cpus=null", "++ray_kwargs.ray_init.num_gpus=null"} <= set(main)
    else:
        assert exports == []
    assert main[1:3] == ["-m", "verl.trainer.main_ppo"]
    i = main.index("--config-name")
    assert main[main.index("--config-path") + 1] == "pkg://recipes.configs.hotpotqa_dapo"
    cfg = compose(REPO / "recipes" / "configs" / "hotpotqa_dapo", main[i + 1], main[i + 2:])
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (count, 4)
    assert cfg.search_env.backend.url == "http://10.0.0.5:8000"
    assert cfg.data.train_files == "/shared/data/hotpotqa/train.parquet"
    assert cfg.actor_rollout_ref.model.path == "/shared/ramp-7b/hf"
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=False, use_critic=False)


def test_slurm_ppo_rejects_bad_input():
    result = subprocess.run(["bash", str(LAUNCH / "slurm/ppo.sbatch"), "ramp_dapo/nope"], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 2 and "no recipe 'ramp_dapo/nope'" in result.stderr
    result = subprocess.run(["bash", str(LAUNCH / "slurm/ppo.sbatch"), "ramp_dapo/qwen2.5-7b_8gpu"],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "DRY_RUN": "1", "NODES": "a b", "SLURM_JOB_NUM_NODES": "3"})
    assert result.returncode == 2 and "3 nodes allocated but 2 names" in result.stderr


def test_slurm_sft_runs_one_torchrun_per_node_and_composes():
    lines = dry_run("slurm/sft.sbatch", "stage1_ramp/qwen2.5-1.5b_8gpu", "trainer.total_epochs=2",
                    NODES="g0 g1", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="8")
    srun, torchrun, torchrun_1 = lines  # the srun line, then what node 0 and node 1 run
    assert srun[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"] and "NODE_RANK=$SLURM_NODEID" in srun[5]
    assert torchrun_1 == [arg.replace("--node_rank=0", "--node_rank=1") for arg in torchrun]
    assert srun[6].endswith("recipes/launch/sft_torchrun.sh") and srun[7:] == ["stage1_ramp/qwen2.5-1.5b_8gpu",
                                                                              "trainer.total_epochs=2"]
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=8", "--node_rank=0", "--master_addr=g0"} <= set(torchrun)
    i = torchrun.index("--config-name")
    config_path = Path(torchrun[torchrun.index("--config-path") + 1])
    assert torchrun[torchrun.index("-m", 3) + 1] == "masksearch_rl.sft.train"
    cfg = compose(config_path, torchrun[i + 1], torchrun[i + 2:])
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, cfg.trainer.total_epochs) == (2, 8, 2)


@pytest.mark.shared_data
def test_eval_val_parquet_override_composes_into_a_recipe(tmp_path):
    """`eval export` prints data.val_files=[...]; with it trainer.test_freq validates on the benchmarks."""
    from masksearch_rl.eval.export import export_parquet
    from masksearch_rl.eval.loaders import load_benchmark

    items = {"hotpotqa": load_benchmark(SHARED_QA / "hotpotqa_500.jsonl", limit=2),
             "musique": load_benchmark(SHARED_QA / "musique_500.jsonl", limit=2)}
    result = export_parquet(items, tmp_path / "val")
    cfg = compose(REPO / "recipes" / "configs" / "hotpotqa_dapo", "qwen2.5-1.5b_8gpu",
                  [result["override"], "trainer.test_freq=10"])
    assert list(cfg.data.val_files) == [str(Path(p).resolve()) for p in result["files"].values()]
    assert cfg.trainer.test_freq == 10


def test_selfevolve_loop_trains_logs_and_serves_the_hf_checkpoint():
    lines = dry_run("selfevolve_loop.sh", "1", "stage1_ramp/qwen2.5-1.5b_8gpu", ITEMS="items.jsonl",
                    SEED_SET="cot.jsonl", JUDGE_URL="http://judge/v1", JUDGE_MODEL="judge", WANDB_PROJECT="ms",
                    SFT_TOKENIZER="Qwen/Qwen2.5-1.5B-Instruct")
    export, sft, serve, iterate = (line[1:] for line in lines[:4])
    assert export[3:5] == ["sft", "export"]
    assert export[export.index("--tokenizer") + 1] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert export[export.index("--max-tokens") + 1] == "8192"
    script = next(i for i, arg in enumerate(sft) if arg.endswith("sft_torchrun.sh"))
    cfg = compose(REPO / "recipes" / "configs" / "sft" / "stage1_ramp", "qwen2.5-1.5b_8gpu", sft[script + 2:])
    # The teacher's SFT logs to W&B and saves a Hugging Face dir, which is what vLLM then serves.
    assert list(cfg.trainer.logger) == ["console", "wandb"] and cfg.trainer.experiment_name == "selfevolve-iter1"
    assert "hf_model" in cfg.checkpoint.save_contents
    assert serve[:2] == ["vllm", "serve"] and serve[2] == f"{cfg.trainer.default_local_dir}/hf_model"
    assert iterate[3:5] == ["selfevolve", "iterate"]
    assert iterate[iterate.index("--wandb-project") + 1] == "ms"


def test_ray_head_and_worker_start_ray_with_the_node_settings():
    """RAY names the ray CLI; `echo` shows exactly what each node would run."""
    env = {**os.environ, "RAY": "echo", "N_GPUS": "4", "RAY_PORT": "7000", "DASHBOARD_PORT": "9000"}
    head = subprocess.run(["bash", str(LAUNCH / "ray_head.sh")], capture_output=True, text=True, env=env)
    assert head.returncode == 0, head.stderr
    assert shlex.split(head.stdout) == ["start", "--head", "--port=7000", "--num-gpus=4", "--dashboard-host=0.0.0.0",
                                        "--dashboard-port=9000"]
    assert "ray_worker.sh" in head.stderr and "ray_submit.sh" in head.stderr
    worker = subprocess.run(["bash", str(LAUNCH / "ray_worker.sh"), "10.0.0.1"], capture_output=True, text=True,
                            env=env)
    assert worker.returncode == 0 and shlex.split(worker.stdout) == ["start", "--address=10.0.0.1:7000",
                                                                     "--num-gpus=4"]
    missing = subprocess.run(["bash", str(LAUNCH / "ray_worker.sh")], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "HEAD_ADDRESS"})
    assert missing.returncode == 2 and "HEAD_ADDRESS" in missing.stderr


def test_selfevolve_sbatch_spreads_the_teacher_sft_over_the_allocation():
    lines = dry_run("slurm/selfevolve.sbatch", "2", "stage1_ramp/qwen2.5-1.5b_8gpu", NODES="g0 g1",
                    SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="4", ITEMS="items.jsonl", SEED_SET="cot.jsonl",
                    JUDGE_URL="http://judge/v1", JUDGE_MODEL="judge")
    sft = [line[1:] for line in lines if any(arg.endswith("sft.sbatch") for arg in line)]
    serve = [line[1:] for line in lines if line[1:3] == ["vllm", "serve"]]
    assert len(sft) == len(serve) == 2  # two iterations
    assert sft[0][2].endswith("recipes/launch/slurm/sft.sbatch") and sft[0][3] == "stage1_ramp/qwen2.5-1.5b_8gpu"
    assert serve[1][2].endswith("iter_2/teacher_sft/hf_model") and serve[1][serve[1].index("--tensor-parallel-size") + 1] == "4"
    # What that sft.sbatch line then runs on each node composes, with the allocation's counts.
    torchrun = dry_run("slurm/sft.sbatch", *sft[0][3:], NODES="g0 g1", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="4")[1]
    i = torchrun.index("--config-name")
    cfg = compose(Path(torchrun[torchrun.index("--config-path") + 1]), torchrun[i + 1], torchrun[i + 2:])
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (2, 4)
    assert cfg.trainer.default_local_dir == "runs/selfevolve/iter_1/teacher_sft"


def test_ray_nodes_take_their_own_address_temp_dir_resources_and_ports(tmp_path):
    """What two nodes on one machine need (tests/test_multiprocess.py starts them for real): each its own node IP,
    temp dir, logical resources and ports; a worker finding a Ray token joins in token mode."""
    token = tmp_path / "token"
    token.write_text("x" * 32)
    env = {**os.environ, "RAY": "ray", "DRY_RUN": "1", "N_GPUS": "1", "NUM_CPUS": "8", "RAY_PORT": "7000",
           "NODE_IP": "127.0.0.2", "RAY_TEMP_DIR": "/tmp/ray-w", "RAY_RESOURCES": '{"w": 1}',
           "RAY_START_ARGS": "--node-manager-port=7101 --disable-usage-stats", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_AUTH_MODE", None)
    worker = subprocess.run(["bash", str(LAUNCH / "ray_worker.sh"), "127.0.0.1"], capture_output=True, text=True,
                            env=env)
    assert worker.returncode == 0, worker.stderr
    assert shlex.split(worker.stdout) == [
        "RAY_AUTH_MODE=token", "ray", "start", "--address=127.0.0.1:7000", "--num-gpus=1", "--num-cpus=8",
        "--node-ip-address=127.0.0.2", "--temp-dir=/tmp/ray-w", '--resources={"w": 1}', "--node-manager-port=7101",
        "--disable-usage-stats"]
    head = subprocess.run(["bash", str(LAUNCH / "ray_head.sh")], capture_output=True, text=True,
                          env={**env, "DASHBOARD_HOST": "127.0.0.1", "NODE_IP": "127.0.0.1"})
    assert head.returncode == 0, head.stderr
    assert shlex.split(head.stdout)[:8] == ["ray", "start", "--head", "--port=7000", "--num-gpus=1",
                                            "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--num-cpus=8"]
    down = subprocess.run(["bash", str(LAUNCH / "ray_down.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1"})
    assert down.returncode == 0 and down.stdout.split() == ["ray", "stop"]  # no temp dir: plain `ray stop`
    mine = subprocess.run(["bash", str(LAUNCH / "ray_down.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "RAY_TEMP_DIR": str(tmp_path / "no-such-ray")})
    assert mine.returncode == 0 and "no Ray processes under" in mine.stderr


def test_ray_submit_joins_the_cluster_without_local_resource_counts():
    """The CPU recipes give ray.init logical slots; a driver joining a running cluster must not (Ray refuses)."""
    [cmd] = dry_run("ray_submit.sh", "quickstart/tiny_cpu", NNODES="2", N_GPUS="1", RAY="ray",
                    MASKSEARCH_RETRIEVAL_URL="http://10.0.0.5:8000", MASKSEARCH_LOG_LEVEL="INFO",
                    VERL_PLATFORM="cpu")
    assert cmd[:3] == ["ray", "job", "submit"]
    import json

    runtime_env = json.loads(next(a for a in cmd if a.startswith("--runtime-env-json=")).split("=", 1)[1])
    assert runtime_env["env_vars"]["MASKSEARCH_LOG_LEVEL"] == "INFO"
    assert runtime_env["env_vars"]["VERL_PLATFORM"] == "cpu"
    main = cmd[cmd.index("--") + 1:]
    i = main.index("--config-name")
    cfg = compose(REPO / "recipes" / "configs" / "quickstart", main[i + 1], main[i + 2:])
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (2, 1)
    assert cfg.ray_kwargs.ray_init.num_cpus is None and cfg.ray_kwargs.ray_init.num_gpus is None
