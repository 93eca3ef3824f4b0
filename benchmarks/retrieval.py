"""Retrieval server throughput and latency, side by side with a Search-R1-style baseline, in one run.

For each corpus size: build (or reuse) a synthetic world and its BM25 index — reporting build time and peak memory —
then serve the index one server at a time on the same machine: ``masksearch-rl serve`` (micro-batching over our
BM25 kernel), ``benchmarks/searchr1_baseline.py`` (Search-R1's per-query loop in a sync endpoint over plain bm25s),
and, as an ablation, that same per-query loop over our retriever. A closed-loop load generator with C
concurrent clients (each sends one single-query request, waits for the answer, sends the next — as agents in an RL
rollout do) measures throughput and p50/p99 latency at each C, and the script prints our/baseline ratios.

    python benchmarks/retrieval.py --passages 100000 1000000      # the figures in docs/benchmarks.md
    python benchmarks/retrieval.py --quick                         # 20k passages, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from masksearch_rl.retrieval.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def build_world_and_index(work_dir: Path, passages: int, seed: int) -> dict:
    """Synthetic world + BM25 index, each built in a child process so its time and peak RSS are its own."""
    world = work_dir / f"world-{passages}"
    index = work_dir / f"index-{passages}"
    report: dict = {"passages": passages}
    if not (world / "corpus.jsonl").exists():
        code = (
            "from masksearch_rl.synthetic import write_synthetic_corpus as w;"
            f"w({str(world)!r}, {passages}, {max(2000, passages // 100)}, {seed})"
        )
        report["world_build_s"], report["world_peak_rss_mb"] = _timed_child(code)
    if not (index / "manifest.json").exists():
        code = (
            "from masksearch_rl.retrieval.index import build_index as b;"
            f"b({str(world / 'corpus.jsonl')!r}, {str(index)!r}, kind='bm25')"
        )
        report["index_build_s"], report["index_peak_rss_mb"] = _timed_child(code)
    else:
        report["index_reused"] = True
    report["index_disk_mb"] = round(sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) / 2**20, 1)
    return report | {"world": str(world), "index": str(index)}


def _timed_child(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; its wall time and its own peak RSS (os.wait4 reports per child)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"build step failed ({os.waitstatus_to_exitcode(status)}): {code}")
    return round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 1024, 1)


def load_queries(world: Path, limit: int = 5000) -> list[str]:
    """What agents search for: each question's oracle hop queries and the questions themselves."""
    queries: list[str] = []
    with open(world / "questions.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            queries.extend(record.get("oracle_queries", []))
            queries.append(record["question"])
            if len(queries) >= limit:
                break
    return queries[:limit]


async def closed_loop(url: str, queries: list[str], clients: int, requests: int, topk: int,
                      time_limit_s: float) -> dict:
    """``clients`` workers share ``requests`` single-query requests; returns throughput and latency percentiles."""
    latencies: list[float] = []
    errors = 0
    next_request = 0
    deadline = time.monotonic() + time_limit_s
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            nonlocal next_request, errors
            while next_request < requests and time.monotonic() < deadline:
                query = queries[next_request % len(queries)]
                next_request += 1
                started = time.perf_counter()
                try:
                    async with session.post(
                        url + "/retrieve", json={"queries": [query], "topk": topk, "return_scores": True}
                    ) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    lat_ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "qps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
    }


def measure(server: ServerProcess, queries: list[str], concurrency: list[int], requests: int, topk: int,
            time_limit_s: float) -> list[dict]:
    # Warm-up: JIT kernels, page cache of the memory-mapped index, connection set-up.
    asyncio.run(closed_loop(server.url, queries[::-1], 8, 200, topk, 60))
    rows = []
    for clients in concurrency:
        row = asyncio.run(closed_loop(server.url, queries, clients, max(requests, 20 * clients), topk, time_limit_s))
        print(f"  {server.name:9s} C={clients:3d}  {row['qps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
              f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=3000, help="requests per concurrency level (≥ 20×C)")
    parser.add_argument("--baseline-requests", type=int, default=600, help="the baseline is slower: fewer requests")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the per-query-loop server over our retriever")
    parser.add_argument("--quick", action="store_true", help="20k passages, fewer requests (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.passages, args.requests, args.baseline_requests = [20_000], 1000, 300

    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    results = []
    for passages in args.passages:
        print(f"\n== {passages:,} passages")
        built = build_world_and_index(args.work_dir, passages, args.seed)
        print(f"  build: {json.dumps({k: v for k, v in built.items() if k not in ('world', 'index')})}")
        queries = load_queries(Path(built["world"]))
        ours_cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", built["index"]]
        base_cmd = [sys.executable, str(ROOT / "benchmarks" / "searchr1_baseline.py"), "--index", built["index"]]
        with ServerProcess(ours_cmd, "ours", cwd=ROOT) as server:
            ours = measure(server, queries, args.concurrency, args.requests, args.topk, args.time_limit)
        with ServerProcess(base_cmd, "baseline", cwd=ROOT) as server:
            base = measure(server, queries, args.concurrency, args.baseline_requests, args.topk, args.time_limit)
        ablation = None
        if args.ablation:  # the baseline's per-query loop over OUR retriever: kernel gain vs batching gain
            with ServerProcess(base_cmd + ["--engine", "ours"], "loop+ours", cwd=ROOT) as server:
                ablation = measure(server, queries, args.concurrency, args.requests, args.topk, args.time_limit)
        print(f"  {'C':>3s} {'ours req/s':>11s} {'base req/s':>11s} {'ratio':>7s} {'ours p99':>9s} {'base p99':>9s}"
              + ("  loop+ours req/s" if ablation else ""))
        for i, (o, b) in enumerate(zip(ours, base)):
            ratio = o["qps"] / b["qps"] if b["qps"] else float("inf")
            extra = f"  {ablation[i]['qps']:15.1f}" if ablation else ""
            print(f"  {o['clients']:3d} {o['qps']:11.1f} {b['qps']:11.1f} {ratio:6.1f}x {o['p99_ms']:8.1f}ms "
                  f"{b['p99_ms']:8.1f}ms{extra}")
            o["ratio_vs_baseline"] = round(ratio, 1)
        results.append({"build": built, "ours": ours, "baseline": base, "loop_with_our_retriever": ablation})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
