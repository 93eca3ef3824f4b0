"""Retrieval server throughput and latency, side by side with a Search-R1-style baseline, in one run.

For each corpus size: build (or reuse) a synthetic world and its BM25 index — reporting build time and peak memory —
then serve the index one server at a time on the same machine: ``masksearch-rl serve`` (micro-batching over our
BM25 kernel), ``benchmarks/searchr1_baseline.py`` (Search-R1's per-query loop in a sync endpoint over plain bm25s),
and, as an ablation, that same per-query loop over our retriever. A closed-loop load generator with C
concurrent clients (each sends one single-query request, waits for the answer, sends the next — as agents in an RL
rollout do) measures throughput and p50/p99 latency at each C, and the script prints our/baseline ratios.

Our server runs ``--workers`` processes on one port. The load generator is ``wrk`` when it is installed
(``apt-get install wrk``: a C client whose CPU cost per request is a small fraction of the server's, so on a 2-core
machine the figures measure the server, not the client; closed loop, one connection per client, driven by
benchmarks/wrk_retrieve.lua), else a Python one (aiohttp, several processes, keep-alive, bodies encoded once), which
costs about as much CPU per request as the server. With 4 or more cores the load generator and the servers are
pinned to disjoint cores, printed at the start; on fewer they share the cores.

    python benchmarks/retrieval.py --passages 100000 1000000      # the figures in docs/benchmarks.md
    python benchmarks/retrieval.py --quick                         # 20k passages, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
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


def plan_cpus(client_cores: int | None) -> tuple[set[int] | None, set[int] | None]:
    """Disjoint core sets ``(load generator, server)``, or ``(None, None)`` when there are too few cores to split.

    Why: on a shared machine the load generator's HTTP client costs about as much CPU per request as the server,
    so the two fight over cores and the figures measure that fight. With 4 or more cores, a quarter (at least one)
    goes to the load generator by default and the rest to the server, each pinned with ``sched_setaffinity``.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 4 and not client_cores:
        return None, None
    count = client_cores or max(1, len(available) // 4)
    if not 0 < count < len(available):
        raise ValueError(f"--client-cores {count}: the machine has {len(available)} usable cores")
    return set(available[:count]), set(available[count:])


def _load_process(url: str, bodies: list[bytes], clients: int, requests: int, time_limit_s: float, cpus,
                  start, results) -> None:
    """One load-generator process: ``clients`` closed-loop clients over keep-alive connections, one event loop.

    Each client first sends one untimed request (its connection is opened then), all processes meet at ``start``,
    then the clients share ``requests`` timed requests. Puts ``(latencies_s, errors, t0, t1, cpu_s)`` on ``results``.
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    headers = {"Content-Type": "application/json"}

    async def run() -> tuple:
        latencies: list[float] = []
        errors = 0
        issued = 0
        connector = aiohttp.TCPConnector(limit=clients, force_close=False)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

            async def post(body: bytes) -> bool:
                try:
                    async with session.post(url + "/retrieve", data=body) as response:
                        await response.read()
                        return response.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return False

            await asyncio.gather(*(post(bodies[i % len(bodies)]) for i in range(clients)))  # open connections
            await asyncio.get_running_loop().run_in_executor(None, start.wait)
            deadline = time.monotonic() + time_limit_s

            async def client() -> None:
                nonlocal issued, errors
                while issued < requests and time.monotonic() < deadline:
                    body = bodies[issued % len(bodies)]
                    issued += 1
                    began = time.perf_counter()
                    if await post(body):
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors += 1

            cpu0, t0 = time.process_time(), time.time()
            await asyncio.gather(*(client() for _ in range(clients)))
            return latencies, errors, t0, time.time(), time.process_time() - cpu0

    results.put(asyncio.run(run()))


def closed_loop(url: str, queries: list[str], clients: int, requests: int, topk: int, time_limit_s: float,
                cpus: set[int] | None = None, processes: int = 1) -> dict:
    """``clients`` closed-loop clients over ``processes`` load-generator processes share ``requests`` requests.

    Each client sends one single-query request, waits for the answer, sends the next (an agent's traffic).
    Request bodies are encoded once up front, connections are kept alive, and several processes keep the load
    generator from being the bottleneck; ``client_cpu`` reports how busy they were (1.0 = one core each, saturated).
    """
    processes = max(1, min(processes, clients))
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes + 1), context.Queue()
    procs = []
    for p in range(processes):
        share = clients // processes + (p < clients % processes)
        offset = p * len(queries) // processes  # processes do not all send the same queries at once
        bodies = [json.dumps({"queries": [q], "topk": topk, "return_scores": True}).encode()
                  for q in queries[offset:] + queries[:offset]]
        proc = context.Process(target=_load_process, daemon=True,
                               args=(url, bodies, share, requests * share // clients, time_limit_s, cpus, start,
                                     results))
        proc.start()
        procs.append(proc)
    start.wait(timeout=120)
    parts = [results.get(timeout=time_limit_s + 120) for _ in procs]
    for proc in procs:
        proc.join()
    latencies = [x for part in parts for x in part[0]]
    errors = sum(part[1] for part in parts)
    wall = max(part[3] for part in parts) - min(part[2] for part in parts)
    lat_ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "qps": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "load_processes": processes,
        "client_cpu": round(sum(part[4] for part in parts) / wall / processes, 2),
    }


WRK_SCRIPT = ROOT / "benchmarks" / "wrk_retrieve.lua"


def closed_loop_wrk(url: str, queries: list[str], clients: int, duration_s: float, topk: int,
                    cpus: set[int] | None = None, threads: int = 1) -> dict:
    """``clients`` closed-loop connections from ``wrk`` for ``duration_s`` seconds (same fields as
    :func:`closed_loop`); ``client_cpu`` is wrk's own CPU time per second of wall time, per thread."""
    threads = max(1, min(threads, clients))
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"queries": [q], "topk": topk, "return_scores": True}) + "\n"
                                  for q in queries))
        command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(duration_s))}s", "--timeout", "30s",
                   "-s", str(WRK_SCRIPT), url, "--", str(bodies)]
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the servers are not reaped meanwhile: wrk's alone
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pin)
        out, err = child.communicate(timeout=duration_s + 120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"wrk failed ({child.returncode}): {err.strip()[-500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    wall = result["duration_us"] / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "clients": clients,
        "requests": result["requests"],
        "errors": result["socket_errors"] + result["status_errors"],
        "qps": round(result["requests"] / wall, 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "load_processes": threads,
        "client_cpu": round(cpu / wall / threads, 2),
        "load_generator": "wrk",
    }


def measure(server: ServerProcess, queries: list[str], concurrency: list[int], requests: int, topk: int,
            time_limit_s: float, cpus: set[int] | None, processes: int, generator: str = "python",
            duration_s: float = 10.0) -> list[dict]:
    if generator == "wrk":
        closed_loop_wrk(server.url, queries[::-1], 16, 3, topk, cpus, processes)  # warm-up
        rows = []
        for clients in concurrency:
            row = closed_loop_wrk(server.url, queries, clients, duration_s, topk, cpus, processes)
            _print_row(server.name, row)
            rows.append(row)
        return rows
    # Warm-up: JIT kernels, page cache of the memory-mapped index, every worker's first requests.
    closed_loop(server.url, queries[::-1], 16, min(400, requests), topk, 60, cpus, processes)
    rows = []
    for clients in concurrency:
        row = closed_loop(server.url, queries, clients, max(requests, 20 * clients), topk, time_limit_s, cpus,
                          processes)
        _print_row(server.name, row)
        rows.append(row)
    return rows


def _print_row(name: str, row: dict) -> None:
    print(f"  {name:9s} C={row['clients']:3d}  {row['qps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
          f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  (load gen {row.get('load_generator', 'python')}: "
          f"{row['load_processes']} proc/thread, {row['client_cpu']:.2f} core each)", flush=True)


def _cores(cpus: set[int] | None) -> str:
    if not cpus:
        return "all (not pinned)"
    ordered = sorted(cpus)
    return f"{len(ordered)} cores {ordered[0]}-{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) \
        else f"{len(ordered)} cores {ordered}"


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
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes for ours (default: one per server core, at most 16)")
    parser.add_argument("--client-cores", type=int, default=None,
                        help="cores pinned to the load generator (default: a quarter when the machine has >= 4)")
    parser.add_argument("--load-processes", type=int, default=None,
                        help="load-generator processes (default: one per load-generator core)")
    parser.add_argument("--baseline-time-limit", type=float, default=None, help="seconds per baseline level at most")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="measure our server only")
    parser.add_argument("--load-generator", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when installed (apt-get install wrk), else the Python client")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level with wrk")
    args = parser.parse_args()
    if args.load_generator == "auto":
        args.load_generator = "wrk" if shutil.which("wrk") else "python"
    elif args.load_generator == "wrk" and not shutil.which("wrk"):
        parser.error("--load-generator wrk: wrk is not installed (apt-get install wrk)")
    if args.quick:
        args.passages, args.requests, args.baseline_requests = [20_000], 1000, 300

    # bm25s probes JAX at import; on a GPU machine with a CUDA jaxlib each server process would grab GPU memory.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    client_cpus, server_cpus = plan_cpus(args.client_cores)
    usable = len(server_cpus or os.sched_getaffinity(0))
    workers = args.workers or max(1, min(16, usable))
    processes = args.load_processes or max(1, len(client_cpus or os.sched_getaffinity(0)))
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}); "
          f"python {sys.version.split()[0]}")
    print(f"server: {_cores(server_cpus)}, {workers} worker(s); load generator ({args.load_generator}): "
          f"{_cores(client_cpus)}, up to {processes} process(es)/thread(s)")
    results = []
    for passages in args.passages:
        print(f"\n== {passages:,} passages")
        built = build_world_and_index(args.work_dir, passages, args.seed)
        print(f"\n  build: {json.dumps({k: v for k, v in built.items() if k not in ('world', 'index')})}")
        queries = load_queries(Path(built["world"]))
        ours_cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", built["index"],
                    "--workers", str(workers)]
        base_cmd = [sys.executable, str(ROOT / "benchmarks" / "searchr1_baseline.py"), "--index", built["index"]]
        load = {"cpus": client_cpus, "processes": processes, "generator": args.load_generator,
                "duration_s": args.duration}
        logs = {name: open(args.work_dir / f"server-{name}-{passages}.log", "w")  # why a server failed to start
                for name in ("ours", "baseline", "loop")}
        with ServerProcess(ours_cmd, "ours", cwd=ROOT, cpus=server_cpus, log=logs["ours"]) as server:
            ours = measure(server, queries, args.concurrency, args.requests, args.topk, args.time_limit, **load)
        base = [{"qps": float("nan"), "p99_ms": float("nan")} for _ in ours]
        if args.baseline:
            with ServerProcess(base_cmd, "baseline", cwd=ROOT, cpus=server_cpus, log=logs["baseline"]) as server:
                base = measure(server, queries, args.concurrency, args.baseline_requests, args.topk,
                               args.baseline_time_limit or args.time_limit, **load)
        ablation = None
        if args.ablation:  # the baseline's per-query loop over OUR retriever: kernel gain vs batching gain
            with ServerProcess(base_cmd + ["--engine", "ours"], "loop+ours", cwd=ROOT, cpus=server_cpus,
                               log=logs["loop"]) as server:
                ablation = measure(server, queries, args.concurrency, args.requests, args.topk, args.time_limit,
                                   **load)
        print(f"  {'C':>3s} {'ours req/s':>11s} {'base req/s':>11s} {'ratio':>7s} {'ours p99':>9s} {'base p99':>9s}"
              + ("  loop+ours req/s" if ablation else ""))
        for i, (o, b) in enumerate(zip(ours, base)):
            ratio = o["qps"] / b["qps"] if b["qps"] else float("nan")
            extra = f"  {ablation[i]['qps']:15.1f}" if ablation else ""
            print(f"  {o['clients']:3d} {o['qps']:11.1f} {b['qps']:11.1f} {ratio:6.1f}x {o['p99_ms']:8.1f}ms "
                  f"{b['p99_ms']:8.1f}ms{extra}")
            o["ratio_vs_baseline"] = round(ratio, 1)
        for handle in logs.values():
            handle.close()
        results.append({"build": built, "ours": ours, "baseline": base, "loop_with_our_retriever": ablation,
                        "server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or []),
                        "workers": workers, "load_generator": args.load_generator})
        if args.out:  # after each size: a run cut short keeps what it measured
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
