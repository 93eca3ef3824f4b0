"""The README's main job: the whole MaskSearch-RL path on the embedded synthetic world, on a CPU.

Stages (each skips work whose output already exists, so a killed run resumes):
  1. synthetic world  -> corpus.jsonl + questions.jsonl   (masksearch_rl.synthetic)
  2. BM25 index       -> index/                            (masksearch_rl.retrieval.index)
  3. retrieval server -> `masksearch-rl serve` on 127.0.0.1, queried over HTTP with the oracle search path of a few
                         multi-hop questions (each hop's answer must come back in the top results)
  4. RAMP items       -> ramp/items.jsonl + ramp/{train,val}.parquet (masksearch_rl.ramp)
  5. curriculum       -> the order of mask counts the staged sampler yields (masksearch_rl.curriculum)
  6. tiny model       -> model/: a tokenizer trained on the world + a random-weight Qwen2 (masksearch_rl.tiny_model)
  7. SFT warm-up      -> sft/: oracle search trajectories, a short run of verl's SFT trainer (masksearch_rl.sft)
  8. RL               -> rl/: DAPO steps through verl's own main_ppo with our agent loop, search env, reward,
                         curriculum, CPU platform and HF rollout (recipes/configs/quickstart/tiny_cpu.yaml), with a
                         validation pass at the end; W&B in offline mode
  9. report           -> rl/plots/*.png and the printed summary (reward, format rate, searches, response length)

Why a subprocess for the server: the quickstart then exercises exactly what a user runs on a cluster
(`masksearch-rl serve`), and talks to it with the same async client the agent loop uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from envs.search_client import DEFAULT_TOPK
from masksearch_rl.jsonl import atomic_path

console = Console()

MODEL_SHAPE = "mini"  # masksearch_rl.tiny_model.SHAPES: ~1M parameters, learns the tag layout in ~200 SFT steps
RL_RECIPE = "quickstart/tiny_cpu"  # under recipes/configs


@dataclass
class QuickstartConfig:
    out_dir: Path = Path("runs/quickstart")
    passages: int = 2000
    questions: int = 200
    seed: int = 0
    topk: int = DEFAULT_TOPK
    demo_questions: int = 4
    # Training (stages 6-9); `train=False` stops after the data stages.
    train: bool = True
    sft_steps: int = 200
    rl_steps: int = 4
    wandb: bool = True  # offline unless WANDB_MODE says otherwise
    rl_timeout_s: float = 3600.0


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run every stage and return a summary dict (also written to ``out_dir/summary.json``)."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    world_dir = cfg.out_dir / "world"
    summary["world"] = stage_world(world_dir, cfg)
    index_dir = cfg.out_dir / "index"
    summary["index"] = stage_index(world_dir / "corpus.jsonl", index_dir)
    summary["search"] = stage_search(index_dir, world_dir / "questions.jsonl", cfg)
    summary["ramp"] = stage_ramp(world_dir / "corpus.jsonl", cfg.out_dir / "ramp", cfg)
    summary["curriculum"] = stage_curriculum(cfg.out_dir / "ramp" / "train.parquet", cfg)
    if cfg.train:
        model_dir = stage_model(world_dir / "corpus.jsonl", cfg.out_dir / "model", cfg)
        if cfg.sft_steps > 0:
            summary["sft"] = stage_sft(cfg.out_dir / "ramp" / "items.jsonl", index_dir, model_dir, cfg)
            model_dir = Path(summary["sft"]["model_dir"])
        summary["rl"] = stage_rl(index_dir, model_dir, cfg)
        summary["report"] = stage_report(cfg.out_dir / "rl", cfg)
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.rule("[bold green]quickstart done")
    console.print(f"summary: {cfg.out_dir / 'summary.json'}")
    return summary


def stage_world(world_dir: Path, cfg: QuickstartConfig) -> dict:
    console.rule("1. synthetic world")
    from masksearch_rl.synthetic import write_synthetic_corpus

    if (world_dir / "corpus.jsonl").exists() and (world_dir / "questions.jsonl").exists():
        console.print(f"reusing {world_dir}")
        return {"reused": True}
    summary = write_synthetic_corpus(world_dir, cfg.passages, cfg.questions, cfg.seed)
    console.print(summary)
    return summary


def stage_index(corpus: Path, index_dir: Path) -> dict:
    console.rule("2. BM25 index")
    from masksearch_rl.retrieval.index import build_index

    if (index_dir / "manifest.json").exists():
        console.print(f"reusing {index_dir}")
    else:
        started = time.perf_counter()
        build_index(corpus, index_dir, kind="bm25")
        console.print(f"built {index_dir} in {time.perf_counter() - started:.1f}s")
    return json.loads((index_dir / "manifest.json").read_text())


def stage_search(index_dir: Path, questions_path: Path, cfg: QuickstartConfig) -> dict:
    console.rule("3. retrieval server + multi-hop searches over HTTP")
    from masksearch_rl.jsonl import read_jsonl

    questions = [q for q in read_jsonl(questions_path) if q["hops"] >= 2][: cfg.demo_questions]
    from masksearch_rl.retrieval.server_process import ServerProcess

    log_path = index_dir.parent / "server.log"
    cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(index_dir)]
    with open(log_path, "w") as log, ServerProcess(cmd, log=log) as server:
        found, total = asyncio.run(_ask(server.url, questions, cfg.topk))
    console.print(f"oracle hops whose supporting passage came back in the top {cfg.topk}: {found}/{total}")
    return {"hops_found": found, "hops_total": total, "server_log": str(log_path)}


async def _ask(url: str, questions: list[dict], topk: int) -> tuple[int, int]:
    from masksearch_rl.retrieval.client import RetrievalServerBackend

    backend = RetrievalServerBackend(url)
    found = total = 0
    try:
        for question in questions:
            table = Table(title=f"{question['question']}  (answer: {question['answer']})", show_lines=False)
            table.add_column("hop")
            table.add_column("query")
            table.add_column("top hit")
            table.add_column("needed", justify="center")
            results = await backend.search(question["oracle_queries"], topk)
            for hop, (query, hits, needed) in enumerate(
                zip(question["oracle_queries"], results, question["supporting_ids"]), start=1
            ):
                hit_ids = [hit.id for hit in hits]
                total += 1
                found += needed in hit_ids
                top = hits[0].text[:90] + "…" if hits else "(none)"
                table.add_row(str(hop), query, top, "yes" if needed in hit_ids else "no")
            console.print(table)
    finally:
        await backend.aclose()
    return found, total


def stage_ramp(corpus: Path, ramp_dir: Path, cfg: QuickstartConfig) -> dict:
    console.rule("4. RAMP items (offline extractor) + verl parquet")
    from masksearch_rl.ramp.export import export_parquet
    from masksearch_rl.ramp.masking import MaskingConfig
    from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp

    items = ramp_dir / "items.jsonl"
    # Uniform k over 1..4 gives every curriculum stage enough items (the paper's rule masks 4 whenever it can).
    masking = MaskingConfig(k_dist="uniform")
    summary = generate_ramp(RampConfig(corpus=corpus, out=items, seed=cfg.seed, workers=1, masking=masking))
    export = export_parquet(items, ramp_dir, val_fraction=0.05, seed=cfg.seed)
    totals = summary["totals"]
    console.print(
        f"{totals['items']} items, {totals['dropped']} dropped {totals['drop_reasons']}; "
        f"masks per item {totals['mask_histogram']}; parquet: {export['train']} train / {export['val']} val"
    )
    with open(items, encoding="utf-8") as handle:
        example = json.loads(handle.readline())
    console.print(f"example query: {example['query'][:300]}\nmasks: {example['masks']}")
    return {"totals": totals, "export": export}


def stage_curriculum(train_parquet: Path, cfg: QuickstartConfig) -> dict:
    console.rule("5. curriculum sampler (staged: 1 -> 2 -> 3 -> 4 masks)")
    from itertools import islice

    import pandas as pd

    from masksearch_rl.curriculum.sampler import CurriculumConfig, MaskCountCurriculumSampler

    frame = pd.read_parquet(train_parquet)
    num_masks = [int(info["num_masks"]) for info in frame["extra_info"]]
    sampler = MaskCountCurriculumSampler(num_masks, CurriculumConfig(mode="staged", seed=cfg.seed))
    # The stream is endless (stages, then everything mixed); one nominal epoch shows the stage order.
    order = [num_masks[i] for i in islice(iter(sampler), len(sampler))]
    changes = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    console.print(f"{len(order)} draws; mask counts in sampling order change as {changes}")
    return {"items": len(order), "stage_order": changes}


def stage_model(corpus: Path, model_dir: Path, cfg: QuickstartConfig) -> Path:
    console.rule("6. tiny policy model (tokenizer trained on the world, random-weight Qwen2)")
    from masksearch_rl.tiny_model import build_tiny_model, corpus_texts

    if (model_dir / "config.json").exists():
        console.print(f"reusing {model_dir}")
        return model_dir
    build_tiny_model(model_dir, corpus_texts(corpus), shape=MODEL_SHAPE, seed=cfg.seed)
    console.print(f"wrote {model_dir}: {json.loads((model_dir / 'masksearch_model.json').read_text())}")
    return model_dir


def stage_sft(ramp_items: Path, index_dir: Path, model_dir: Path, cfg: QuickstartConfig) -> dict:
    console.rule("7. SFT warm-up on oracle search trajectories (verl's SFT trainer, RL token layout)")
    from masksearch_rl.rl.launch import compose_recipe
    from masksearch_rl.sft.oracle import OracleConfig
    from masksearch_rl.sft.warmup import run_sft_warmup

    # The oracle's searches show what the RL environment will show: same top-k, same information budget in the
    # policy's own tokens. Fixed thoughts: a model this small learns the layout, not prose.
    search_env = compose_recipe(RL_RECIPE).search_env
    oracle = OracleConfig(topk=int(search_env.topk), max_info_tokens=int(search_env.max_info_tokens),
                          tokenizer=str(model_dir), wording="fixed", seed=cfg.seed)
    started = time.perf_counter()
    warmed = run_sft_warmup(ramp_items, index_dir, model_dir, cfg.out_dir / "sft", steps=cfg.sft_steps,
                            oracle=oracle, layout="rl")
    console.print(f"warmed-up policy: {warmed} ({time.perf_counter() - started:.0f}s; verl's log: "
                  f"{cfg.out_dir / 'sft' / 'train.log'})")
    return {"model_dir": str(warmed), "steps": cfg.sft_steps}


def stage_rl(index_dir: Path, model_dir: Path, cfg: QuickstartConfig) -> dict:
    console.rule(f"8. RL: {cfg.rl_steps} DAPO steps through verl's main_ppo (CPU platform, HF rollout)")
    import torch

    from masksearch_rl.retrieval.server_process import ServerProcess
    from masksearch_rl.rl.launch import PPORun, run_ppo

    rl_dir = (cfg.out_dir / "rl").resolve()
    done_path = rl_dir / "done.json"
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("rl_steps") == cfg.rl_steps and done.get("model_dir") == str(Path(model_dir).resolve()):
            console.print(f"reusing the finished run in {rl_dir} (delete {done_path} to train again)")
            return done
    rl_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = rl_dir / "metrics.jsonl"
    env = {"VERL_PLATFORM": os.environ.get("VERL_PLATFORM") or ("nvidia" if torch.cuda.is_available() else "cpu")}
    loggers = ["console", "file"]
    if cfg.wandb:
        loggers.append("wandb")
        env.setdefault("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
        env["WANDB_DIR"] = str(rl_dir)
    data_dir = cfg.out_dir.resolve()
    overrides = [
        f"paths.data_dir={data_dir}",
        f"paths.model_dir={Path(model_dir).resolve()}",
        f"trainer.total_training_steps={cfg.rl_steps}",
        f"trainer.logger=[{','.join(loggers)}]",
        f"trainer.validation_data_dir={rl_dir / 'validation'}",
        f"trainer.rollout_data_dir={rl_dir / 'rollouts'}",  # every training rollout with its reward components
    ]
    if env["VERL_PLATFORM"] != "cpu":
        overrides.append("trainer.device=cuda")
    log_path = rl_dir / "server.log"
    cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(index_dir)]
    with open(log_path, "w") as log, ServerProcess(cmd, log=log) as server:
        overrides.append(f"search_env.backend.url={server.url}")
        run = PPORun(RL_RECIPE, overrides, log_path=rl_dir / "main_ppo.log", metrics_path=metrics_path,
                     env=env, timeout_s=cfg.rl_timeout_s)
        wall_s = run_ppo(run)
    console.print(f"verl finished {cfg.rl_steps} steps + validation in {wall_s:.0f}s; metrics: {metrics_path}")
    done = {"wall_s": round(wall_s, 1), "metrics": str(metrics_path), "log": str(run.log_path), "platform": env,
            "rl_steps": cfg.rl_steps, "model_dir": str(Path(model_dir).resolve())}
    with atomic_path(done_path) as tmp:
        tmp.write_text(json.dumps(done, indent=2))
    return done


def stage_report(rl_dir: Path, cfg: QuickstartConfig) -> dict:
    console.rule("9. report")
    from masksearch_rl.rl.report import load_metrics, plot_metrics, summarize

    steps = load_metrics(rl_dir / "metrics.jsonl")
    plots = plot_metrics(steps, rl_dir / "plots")
    table = Table(title="training curves (first -> last logged step)")
    for column in ("curve", "metric", "first", "last", "steps"):
        table.add_column(column)
    curves = summarize(steps)
    for name, row in curves.items():
        table.add_row(name, row["metric"], f"{row['first']:.3f}", f"{row['last']:.3f}", str(row["steps"]))
    console.print(table)
    validation = {k: v for s in steps for k, v in s.items() if k.startswith("val-")}
    shown = {k: v for k, v in validation.items() if k.endswith("/mean@1") or "/acc/" in k or "/format/" in k}
    if shown:
        console.print({k: round(float(v), 4) for k, v in sorted(shown.items())})
    console.print("plots: " + ", ".join(str(p) for p in plots))
    return {"curves": curves, "plots": [str(p) for p in plots], "validation": validation}
