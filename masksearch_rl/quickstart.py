"""The README's main job: the whole MaskSearch-RL path on the embedded synthetic world, on a CPU.

Stages (each skips work whose output already exists, so a killed run resumes):
  1. synthetic world  -> corpus.jsonl + questions.jsonl   (masksearch_rl.synthetic)
  2. BM25 index       -> index/                            (masksearch_rl.retrieval.index)
  3. retrieval server -> `masksearch-rl serve` on 127.0.0.1, queried over HTTP with the oracle search path of a few
                         multi-hop questions (each hop's answer must come back in the top results)
  4. RAMP items       -> ramp/items.jsonl + ramp/{train,val}.parquet (masksearch_rl.ramp)
  5. curriculum       -> the order of mask counts the staged sampler yields (masksearch_rl.curriculum)

Why a subprocess for the server: the quickstart then exercises exactly what a user runs on a cluster
(`masksearch-rl serve`), and talks to it with the same async client the agent loop uses.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


@dataclass
class QuickstartConfig:
    out_dir: Path = Path("runs/quickstart")
    passages: int = 2000
    questions: int = 200
    seed: int = 0
    topk: int = 3
    demo_questions: int = 4


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
    import pandas as pd

    from itertools import islice

    from masksearch_rl.curriculum.sampler import CurriculumConfig, MaskCountCurriculumSampler

    frame = pd.read_parquet(train_parquet)
    num_masks = [int(info["num_masks"]) for info in frame["extra_info"]]
    sampler = MaskCountCurriculumSampler(num_masks, CurriculumConfig(mode="staged", seed=cfg.seed))
    # The stream is endless (stages, then everything mixed); one nominal epoch shows the stage order.
    order = [num_masks[i] for i in islice(iter(sampler), len(sampler))]
    changes = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    console.print(f"{len(order)} draws; mask counts in sampling order change as {changes}")
    return {"items": len(order), "stage_order": changes}
