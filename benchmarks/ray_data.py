"""Throughput of data generation on the Ray Data engine (``--engine ray``; docs/benchmarks.md).

1. offline: ``ramp generate`` (offline extractor) over synthetic-world passages: the asyncio engine (one process)
   for scale, then ``--engine ray`` with 1 and 2 workers. Items/s of the whole command (shards written, Ray job,
   export) and of the Ray job alone (``job_items_per_s``: worker start-up included, input shards and export not).
2. llm: ``cot build --engine ray`` over RAMP items against the scripted OpenAI-compatible server (every reply after a
   fixed latency; ``--capacity`` requests served at once, the rest queued, as at a real server's batch limit) and our
   BM25 retrieval server, for rising LLM concurrency (the endpoint budget, over all workers together): items/s, LLM
   requests/s and tokens/s between the first and the last request, and the most requests the endpoint held.

One local Ray serves every run (num_cpus = workers + 3, no dashboard, 512 MiB object store).

    nice -n 19 .venv/bin/python benchmarks/ray_data.py --out runs/bench/ray_data.json
    nice -n 19 .venv/bin/python benchmarks/ray_data.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from masksearch_rl.jsonl import read_jsonl, write_jsonl  # noqa: E402
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp  # noqa: E402


def offline(root: Path, passages: int) -> list[dict]:
    from masksearch_rl.synthetic import write_synthetic_corpus

    world = root / "offline"
    write_synthetic_corpus(world, num_passages=passages, num_questions=1, seed=0, progress=False)
    corpus = world / "corpus.jsonl"
    rows = []
    started = time.perf_counter()
    summary = generate_ramp(RampConfig(corpus=corpus, out=world / "asyncio.jsonl", progress=False))
    seconds = time.perf_counter() - started
    done = summary["run"]["items"] + summary["run"]["dropped"]
    rows.append({"engine": "asyncio", "workers": 1, "items": done, "seconds": round(seconds, 2),
                 "items_per_s": round(done / seconds, 1)})
    for workers in (1, 2):
        ray_options = {"workers": workers, "batch_size": 500, "rows_per_file": 2000, "progress_interval_s": 2}
        started = time.perf_counter()
        summary = generate_ramp(RampConfig(corpus=corpus, out=world / f"ray{workers}.jsonl", progress=False,
                                           engine="ray", ray=ray_options))
        seconds = time.perf_counter() - started
        done = summary["run"]["items"] + summary["run"]["dropped"]
        assert read_jsonl(world / f"ray{workers}.jsonl") == sorted(read_jsonl(world / "asyncio.jsonl"),
                                                                    key=lambda r: r["id"]), "same items"
        rows.append({"engine": "ray", "workers": workers, "items": done, "seconds": round(seconds, 2),
                     "items_per_s": round(done / seconds, 1), "job_items_per_s": summary["ray"]["items_per_s"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def llm(root: Path, items: int, latency: float, capacity: int, levels: list[int]) -> list[dict]:
    from masksearch_rl.cot.pipeline import CotConfig, run_cot
    from masksearch_rl.cot.scripted import ScriptedServer
    from masksearch_rl.retrieval.index import build_index, load_index
    from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
    from masksearch_rl.synthetic import write_synthetic_corpus

    world = root / "llm"
    write_synthetic_corpus(world, num_passages=2000, num_questions=1, seed=1, progress=False)
    generate_ramp(RampConfig(corpus=world / "corpus.jsonl", out=world / "ramp.jsonl", limit=items * 2,
                             progress=False))
    tasks = read_jsonl(world / "ramp.jsonl")[:items]
    write_jsonl(world / "tasks.jsonl", tasks)
    retriever = load_index(build_index(world / "corpus.jsonl", world / "index", kind="bm25", show_progress=False))
    rows = []
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url:
        for concurrency in levels:
            with ScriptedServer(tasks, delay_s=latency, capacity=capacity) as server:
                llm_settings = {"default": {"base_url": server.base_url, "model": "scripted", "timeout_s": 60,
                                            "max_retries": 1, "concurrency": concurrency}}
                config = CotConfig(input=str(world / "tasks.jsonl"), out=str(world / f"cot_c{concurrency}.jsonl"),
                                   llm=llm_settings, search={"backend": {"type": "server", "url": url}, "topk": 3},
                                   concurrency=concurrency, progress=False, engine="ray",
                                   ray={"workers": 2, "batch_size": 8, "rows_per_file": 16, "progress_interval_s": 5})
                summary = run_cot(config)
                times = [r["t"] for r in server.requests]
                span = max(times) - min(times)
                tokens = summary["llm"]["prompt_tokens"] + summary["llm"]["completion_tokens"]
                row = {"concurrency": concurrency, "capacity": capacity, "latency_s": latency,
                       "items": summary["file"]["records"], "correct": summary["file"].get("correct", 0),
                       "requests": len(times), "seconds": round(span, 2),
                       "items_per_s": round(summary["file"]["records"] / span, 2),
                       "requests_per_s": round(len(times) / span, 1), "tokens_per_s": round(tokens / span),
                       "endpoint_max_in_flight": server.max_in_flight,
                       "budget_max_in_flight": summary["ray"]["endpoint_budget"][server.base_url]["max_in_flight"],
                       "job_seconds": summary["ray"]["seconds"], "failed": summary["errors_pending"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=20000)
    parser.add_argument("--items", type=int, default=48, help="CoT tasks per concurrency level")
    parser.add_argument("--latency", type=float, default=0.25, help="seconds per LLM reply")
    parser.add_argument("--capacity", type=int, default=8, help="requests the fake endpoint serves at once")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--skip", choices=["offline", "llm"], action="append", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.passages, args.items, args.concurrency = 2000, 8, [1, 4]
    import ray

    ray.init(num_cpus=5, object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {"offline": None if "offline" in args.skip else offline(Path(tmp), args.passages),
                       "llm": None if "llm" in args.skip else llm(Path(tmp), args.items, args.latency, args.capacity,
                                                                 args.concurrency)}
    finally:
        ray.shutdown()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
