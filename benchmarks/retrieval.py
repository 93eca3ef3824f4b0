"""Our retrieval server against Search-R1's real one (pyserini BM25 over Lucene), same corpus, same queries, one run.

For each corpus size: a synthetic world, written as a FlashRAG/Search-R1 corpus (``{"id", "contents"}`` lines); its
indexes, each built in a child process whose wall time and peak RSS are its own: ours (``build_index``, default
options), ours with the ``pyserini`` preset (for top-3 agreement) and Lucene's (``benchmarks/searchr1_real.py``:
pyserini's indexer as Search-R1 calls it). Then, one server at a time on the same machine:

- **searchr1**: Search-R1's ``retrieval_server.py``, unmodified (``--searchr1 <checkout>``; needs the ``bench`` extra);
- **ours**: ``masksearch-rl serve --index ...`` with its default settings;
- **stand-in** (``--standin``): ``benchmarks/searchr1_baseline.py``, Search-R1's serving design over bm25s' per-query
  numpy path; kept to compare with older figures, it is NOT Search-R1's server.

Two request shapes: single-query POSTs from C closed-loop clients (``wrk``: a C client, one connection per client,
bodies rotated by benchmarks/wrk_retrieve.lua; ``apt-get install wrk``) — the traffic of agents that each search on
their own; and Search-R1's own client shape, one client posting a whole rollout step (2,560 queries) at once.
Top-3 agreement: the share of queries whose top 3 passages (by contents) are the same set on our ``pyserini``-preset
index and on Lucene's, and the mean overlap of the two top-3 lists.

    python benchmarks/retrieval.py --passages 1000000 --searchr1 /tmp/Search-R1     # docs/benchmarks.md
    python benchmarks/retrieval.py --quick --searchr1 /tmp/Search-R1                  # 20k passages, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from masksearch_rl.retrieval.server_process import ServerProcess
from masksearch_rl.retrieval.types import DEFAULT_TOPK

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = ROOT / "benchmarks" / "wrk_retrieve.lua"
BATCH_QUERIES = 2560  # Search-R1's trainer: 512 prompts x 5 responses, one POST per turn


def _timed_child(args: list[str]) -> tuple[float, float]:
    """Run ``args``; its wall time and the peak of its process tree's summed RSS in MB, sampled every 0.1 s.

    Why sampled and summed: the BM25 build tokenises in worker processes, and the kernel's per-child peak
    (``wait4``'s ru_maxrss) is the largest single process, not what the build holds at once. Summing RSS counts
    pages shared between processes more than once, so the figure errs high.
    """
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(args, cwd=ROOT)
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            total = 0
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.1)
    if child.returncode != 0:
        raise RuntimeError(f"build step failed ({child.returncode}): {args}")
    return round(time.perf_counter() - started, 1), round(peak / 2**20, 1)


def _disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def build_all(work_dir: Path, passages: int, seed: int, lucene: bool, preset: bool) -> dict:
    """World, Search-R1-format corpus and every index; reuses what exists. Returns paths and build figures."""
    world, corpus = work_dir / f"world-{passages}", work_dir / f"passages-{passages}.jsonl"
    report: dict = {"passages": passages}
    if not (world / "corpus.jsonl").exists():
        code = ("from masksearch_rl.synthetic import write_synthetic_corpus as w;"
                f"w({str(world)!r}, {passages}, {max(2000, passages // 100)}, {seed})")
        report["world_build_s"], _ = _timed_child([sys.executable, "-c", code])
    if not corpus.exists():  # the corpus as Search-R1 and FlashRAG ship it: id and contents only
        tmp = corpus.with_suffix(".tmp")
        with open(world / "corpus.jsonl", encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
            for line in src:
                record = json.loads(line)
                out.write(json.dumps({"id": record["id"], "contents": record["contents"]}, ensure_ascii=False) + "\n")
        tmp.rename(corpus)
    report["corpus_mb"] = round(corpus.stat().st_size / 2**20, 1)
    builds = {"ours": (work_dir / f"index-{passages}", "{}")}
    if preset:
        builds["ours_pyserini"] = (work_dir / f"index-{passages}-pyserini", "{'preset': 'pyserini'}")
    for name, (index, options) in builds.items():
        if not (index / "manifest.json").exists():
            code = (f"from masksearch_rl.retrieval.index import build_index as b;"
                    f"b({str(corpus)!r}, {str(index)!r}, kind='bm25', show_progress=False, **{options})")
            report[f"{name}_build_s"], report[f"{name}_peak_rss_mb"] = _timed_child([sys.executable, "-c", code])
        report[f"{name}_disk_mb"] = _disk_mb(index)
        report[f"{name}_index"] = str(index)
    if lucene:
        index = work_dir / f"lucene-{passages}"
        if not (index / "segments.gen").exists() and not any(index.glob("segments_*")):
            args = [sys.executable, str(ROOT / "benchmarks" / "searchr1_real.py"), "build", "--corpus", str(corpus),
                    "--index", str(index)]
            report["lucene_build_s"], report["lucene_peak_rss_mb"] = _timed_child(args)
        report["lucene_disk_mb"] = _disk_mb(index)
        report["lucene_index"] = str(index)
    return report | {"world": str(world), "corpus": str(corpus)}


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


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its live descendants (0 without a pid)."""
    if pid is None:
        return 0.0
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def wrk(url: str, queries: list[str], clients: int, duration_s: float, topk: int,
        server_pid: int | None = None) -> dict:
    """``clients`` closed-loop connections from ``wrk`` for ``duration_s`` seconds, single-query bodies; with
    ``server_pid``, also the server's CPU time per request (its process and its children)."""
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"queries": [q], "topk": topk, "return_scores": True}) + "\n"
                                  for q in queries))
        command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration_s))}s", "--timeout", "30s",
                   "-s", str(WRK_SCRIPT), url, "--", str(bodies)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load = os.getloadavg()[0]
        server_before = tree_cpu_s(server_pid)
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 120)
        server_cpu = tree_cpu_s(server_pid) - server_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    wall = result["duration_us"] / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "clients": clients, "requests": result["requests"],
        "errors": result["socket_errors"] + result["status_errors"],
        "qps": round(result["requests"] / wall, 1),
        "p50_ms": round(result["p50_us"] / 1000, 2), "p99_ms": round(result["p99_us"] / 1000, 2),
        "wrk_cpu": round(cpu / wall, 2), "load_avg_1m": round(load, 2),
        # the server's own CPU per request: what a request costs whatever share of the cores the server got
        "server_cores": round(server_cpu / wall, 2),
        "server_cpu_ms_per_req": round(1000 * server_cpu / max(1, result["requests"]), 3),
    }


def batched(url: str, queries: list[str], posts: int, topk: int, server_pid: int | None = None) -> dict:
    """One client posting ``BATCH_QUERIES`` queries at once, ``posts`` times (Search-R1's client shape)."""
    rotated = (queries * (BATCH_QUERIES // len(queries) + 2))
    times, cpus = [], []
    with httpx.Client(timeout=600) as client:
        for i in range(posts + 1):  # the first is a warm-up
            start = (i * 997) % len(queries)
            body = {"queries": rotated[start : start + BATCH_QUERIES], "topk": topk, "return_scores": True}
            began, cpu_before = time.perf_counter(), tree_cpu_s(server_pid)
            response = client.post(url + "/retrieve", json=body)
            elapsed, cpu = time.perf_counter() - began, tree_cpu_s(server_pid) - cpu_before
            if response.status_code != 200 or len(response.json()["result"]) != BATCH_QUERIES:
                raise RuntimeError(f"batched POST to {url} failed: HTTP {response.status_code} {response.text[:300]}")
            if i:
                times.append(elapsed)
                cpus.append(cpu)
    return {"queries_per_post": BATCH_QUERIES, "posts": posts, "seconds_per_post": round(sum(times) / posts, 3),
            "qps": round(BATCH_QUERIES * posts / sum(times), 1), "load_avg_1m": round(os.getloadavg()[0], 2),
            "server_cpu_ms_per_query": round(1000 * sum(cpus) / (BATCH_QUERIES * posts), 3)}


def top3(url: str, queries: list[str]) -> list[list[str]]:
    """Each query's top-3 passage contents from one server (batches of 500)."""
    found = []
    with httpx.Client(timeout=600) as client:
        for start in range(0, len(queries), 500):
            body = {"queries": queries[start : start + 500], "topk": 3, "return_scores": True}
            result = client.post(url + "/retrieve", json=body).json()["result"]
            found.extend([hit["document"]["contents"] for hit in hits] for hits in result)
    return found


def agreement(ours: list[list[str]], theirs: list[list[str]]) -> dict:
    same = sum(set(a) == set(b) for a, b in zip(ours, theirs))
    overlap = sum(len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(ours, theirs) if b)
    with_hits = sum(1 for b in theirs if b)
    return {"queries": len(theirs), "same_top3_set": round(same / len(theirs), 4),
            "mean_top3_overlap": round(overlap / max(1, with_hits), 4)}


def measure(servers: dict[str, ServerProcess], queries: list[str], concurrency: list[int], duration_s: float,
            rounds: int, posts: int, topk: int) -> dict:
    """Every server at every level, interleaved: ``rounds`` short wrk runs per server and level, taken in turn
    (A B A B ...), so that a change in the machine's load (other jobs) falls on both servers alike. A level's
    figures are the medians over its rounds; ``ratio`` figures are medians of the per-round ratios."""
    import statistics

    for server in servers.values():
        wrk(server.url, queries[::-1], 16, 3, topk)  # warm-up: JIT, page cache, every worker's first requests
    figures: dict = {name: {"single": [], "batched": None} for name in servers}
    for clients in concurrency:
        per_round: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                per_round[name].append(wrk(server.url, queries, clients, duration_s / rounds, topk,
                                           server.proc.pid if server.proc else None))
        for name, runs in per_round.items():
            row = {"clients": clients, "rounds": runs,
                   **{key: round(statistics.median(r[key] for r in runs), 2)
                      for key in ("qps", "p50_ms", "p99_ms", "load_avg_1m", "server_cores",
                                  "server_cpu_ms_per_req")},
                   "errors": sum(r["errors"] for r in runs), "requests": sum(r["requests"] for r in runs)}
            figures[name]["single"].append(row)
            print(f"  {name:9s} C={clients:3d} {row['qps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                  f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  server CPU {row['server_cpu_ms_per_req']:.2f} "
                  f"ms/req on {row['server_cores']:.2f} cores  (medians of {rounds} rounds; qps by round "
                  f"{[r['qps'] for r in runs]}, load {[r['load_avg_1m'] for r in runs]})", flush=True)
    if posts:
        per_post: dict[str, list[dict]] = {name: [] for name in servers}
        for _ in range(posts):
            for name, server in servers.items():
                per_post[name].append(batched(server.url, queries, 1, topk, server.proc.pid if server.proc else None))
        for name, runs in per_post.items():
            figures[name]["batched"] = {"queries_per_post": BATCH_QUERIES, "posts": posts, "rounds": runs,
                                        "qps": round(statistics.median(r["qps"] for r in runs), 1),
                                        "server_cpu_ms_per_query": round(statistics.median(
                                            r["server_cpu_ms_per_query"] for r in runs), 3)}
            print(f"  {name:9s} {BATCH_QUERIES} queries/POST: {figures[name]['batched']['qps']:8.1f} q/s "
                  f"(median of {posts}; {[r['qps'] for r in runs]}); server CPU "
                  f"{figures[name]['batched']['server_cpu_ms_per_query']:.3f} ms/query", flush=True)
    return figures


@contextlib.contextmanager
def start_server(cmd: list[str], name: str, log, attempts: int = 3):
    """A started :class:`ServerProcess`; a start that fails (e.g. its free port was taken by another program
    before the server bound it) is retried on a new port, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        server = ServerProcess(cmd, name, cwd=ROOT, log=log, startup_timeout_s=900)
        try:
            server.__enter__()
        except RuntimeError as err:
            if attempt == attempts:
                raise
            print(f"  {name} did not start ({err}); retrying on another port", flush=True)
            time.sleep(2 * attempt)
            continue
        try:
            yield server
        finally:
            server.__exit__(None, None, None)
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per server and wrk level")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    parser.add_argument("--batched-posts", type=int, default=3,
                        help="2,560-query POSTs per server, interleaved (0: skip)")
    parser.add_argument("--topk", type=int, default=DEFAULT_TOPK)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    parser.add_argument("--searchr1", type=Path, default=None, help="Search-R1 checkout: run its real server")
    parser.add_argument("--standin", action="store_true", help="also measure the old stand-in baseline")
    parser.add_argument("--no-agreement", dest="agreement", action="store_false",
                        help="skip the pyserini-preset index and the top-3 agreement")
    parser.add_argument("--agreement-queries", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="20k passages, 3 s per level (smoke run)")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                        help="extra arguments for `masksearch-rl serve` (after everything else)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    if args.quick:
        args.passages, args.duration, args.batched_posts = [20_000], 3.0, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bm25s probes JAX at import; never grab a GPU per process
    print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}); python "
          f"{sys.version.split()[0]}; load average {os.getloadavg()}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for passages in args.passages:
        print(f"\n== {passages:,} passages", flush=True)
        built = build_all(args.work_dir, passages, args.seed, args.searchr1 is not None,
                          args.agreement and args.searchr1 is not None)
        print(f"  build: {json.dumps({k: v for k, v in built.items() if not str(v).startswith('/')})}", flush=True)
        queries = load_queries(Path(built["world"]))
        servers = {}
        if args.searchr1:
            servers["searchr1"] = [sys.executable, str(ROOT / "benchmarks" / "searchr1_real.py"), "serve",
                                   "--searchr1", str(args.searchr1), "--index", built["lucene_index"],
                                   "--corpus", built["corpus"]]
        servers["ours"] = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", built["ours_index"],
                           *args.serve_args]
        if args.standin:
            servers["stand-in"] = [sys.executable, str(ROOT / "benchmarks" / "searchr1_baseline.py"),
                                   "--index", built["ours_index"]]
        with contextlib.ExitStack() as stack:  # all servers up at once (idle ones cost no CPU), measured in turn
            running = {}
            for name, cmd in servers.items():
                log = stack.enter_context(open(args.work_dir / f"server-{name}-{passages}.log", "w"))
                running[name] = stack.enter_context(start_server(cmd, name, log))
            figures = measure(running, queries, args.concurrency, args.duration, args.rounds, args.batched_posts,
                              args.topk)
        agree = None
        if args.agreement and args.searchr1:
            sample = queries[: args.agreement_queries]
            cmd = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", built["ours_pyserini_index"]]
            with open(args.work_dir / f"server-preset-{passages}.log", "w") as log, \
                    start_server(cmd, "ours-preset", log) as server:
                ours_top = top3(server.url, sample)
            cmd = servers["searchr1"]
            with open(args.work_dir / f"server-searchr1-agree-{passages}.log", "w") as log, \
                    start_server(cmd, "searchr1", log) as server:
                their_top = top3(server.url, sample)
            agree = agreement(ours_top, their_top)
            print(f"  top-3 agreement, pyserini preset vs Lucene: {agree}", flush=True)
        base = figures.get("searchr1")
        if base:
            import statistics

            def ratio(mine: dict, theirs: dict) -> float:  # median over the interleaved rounds
                pairs = zip(mine["rounds"], theirs["rounds"])
                return round(statistics.median(m["qps"] / t["qps"] for m, t in pairs), 2)

            print(f"\n  {'shape':>22s} {'searchr1':>10s} {'ours':>10s} {'ratio':>7s} {'p99 ours':>9s} "
                  f"{'CPU/req ratio':>14s}")
            for theirs, mine in zip(base["single"], figures["ours"]["single"]):
                mine["ratio_vs_searchr1"] = ratio(mine, theirs)
                mine["cpu_ratio_vs_searchr1"] = round(theirs["server_cpu_ms_per_req"]
                                                      / max(1e-9, mine["server_cpu_ms_per_req"]), 2)
                print(f"  {'C=' + str(mine['clients']) + ' single-query':>22s} {theirs['qps']:10.1f} "
                      f"{mine['qps']:10.1f} {mine['ratio_vs_searchr1']:6.2f}x {mine['p99_ms']:7.1f}ms "
                      f"{mine['cpu_ratio_vs_searchr1']:13.2f}x")
            if base["batched"] and figures["ours"]["batched"]:
                theirs, mine = base["batched"], figures["ours"]["batched"]
                mine["ratio_vs_searchr1"] = ratio(mine, theirs)
                mine["cpu_ratio_vs_searchr1"] = round(theirs["server_cpu_ms_per_query"]
                                                      / max(1e-9, mine["server_cpu_ms_per_query"]), 2)
                print(f"  {'2,560 per POST':>22s} {theirs['qps']:10.1f} {mine['qps']:10.1f} "
                      f"{mine['ratio_vs_searchr1']:6.2f}x {'':>9s} {mine['cpu_ratio_vs_searchr1']:13.2f}x")
        results.append({"build": built, "servers": figures, "agreement": agree,
                        "serve_args": args.serve_args})
        if args.out:  # after each size: a run cut short keeps what it measured
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
