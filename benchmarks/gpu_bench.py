"""Helpers of benchmarks/gpu_hf_rollout.sh: build a model of a given shape, wait for the retrieval server, and read
verl's per-step console metrics back out of its logs into one JSON.

Why a separate file: the driver is a shell script (it must also unpack the carried packages before any of our
Python imports work), and these three jobs are easier to get right in Python.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

# verl's console logger prints one line per step: "step:3 - key:value - key:value ...".
STEP_LINE = re.compile(r"step:(\d+) - (.*)$")
PAIR = re.compile(r"([\w/@.\-]+):([-+0-9.eE]+|np\.\w+\([-+0-9.eE]+\)|nan|inf)(?= - |$)")
# What the report needs from a PPO step, and from an SFT step (any key containing one of these).
PPO_KEYS = ("timing_s/step", "timing_s/gen", "timing_s/update_actor", "timing_s/old_log_prob",
            "timing_s/update_weights", "perf/throughput", "perf/total_num_tokens", "response_length/mean",
            "prompt_length/mean", "actor/perf/max_memory_allocated_gb", "timing_per_token_ms/gen")
SFT_HINTS = ("loss", "time", "throughput", "token", "lr", "grad_norm", "memory", "mfu")


def _number(text: str) -> float:
    inner = re.fullmatch(r"np\.\w+\((.*)\)", text)
    return float(inner.group(1) if inner else text)


def parse_steps(log: Path) -> list[dict[str, float]]:
    """Every ``step:N - k:v - ...`` line of a log, as dicts (ANSI colour codes and Ray's prefixes ignored)."""
    steps = []
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace")) if log.exists() else ""
    for line in text.splitlines():
        match = STEP_LINE.search(line)
        if not match:
            continue
        row = {"step": float(match.group(1))}
        for key, value in PAIR.findall(match.group(2)):
            try:
                row[key] = _number(value)
            except ValueError:
                continue
        steps.append(row)
    return steps


def summarise(steps: list[dict[str, float]], keys: tuple[str, ...] | None, hints: tuple[str, ...] = ()) -> dict:
    """Per-step values of the chosen keys, and their mean over steps after the first (the first pays warm-up)."""
    chosen = [k for k in (keys or ()) if any(k in s for s in steps)]
    chosen += sorted({k for s in steps for k in s if any(h in k for h in hints)} - set(chosen) - {"step"})
    out = {"steps": len(steps), "per_step": [{k: s.get(k) for k in ["step", *chosen] if k in s} for s in steps]}
    later = steps[1:] or steps
    out["mean_after_first"] = {
        k: round(statistics.fmean(s[k] for s in later if k in s), 4) for k in chosen if any(k in s for s in later)
    }
    return out


def cmd_build_model(args: argparse.Namespace) -> None:
    from masksearch_rl.tiny_model import build_tiny_model, corpus_texts

    started = time.perf_counter()
    out = build_tiny_model(Path(args.out), corpus_texts(Path(args.corpus)), shape=args.shape, seed=args.seed)
    info = json.loads((out / "masksearch_model.json").read_text())
    print(json.dumps({**info, "dir": str(out), "build_s": round(time.perf_counter() - started, 1)}))


def cmd_wait_server(args: argparse.Namespace) -> None:
    import httpx

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{args.url}/health", timeout=2.0).status_code == 200:
                print(f"retrieval server up at {args.url}")
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"retrieval server at {args.url} did not answer /health within {args.timeout}s")


def cmd_metrics(args: argparse.Namespace) -> None:
    """Collect every run's log (``name=path[:seconds]``) into one JSON."""
    result: dict = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for spec in args.runs:
        name, _, rest = spec.partition("=")
        path, _, wall = rest.partition(":")
        sft = name.startswith("sft")
        summary = summarise(parse_steps(Path(path)), None if sft else PPO_KEYS, SFT_HINTS if sft else ())
        if wall:
            summary["wall_s"] = float(wall)
        result[name] = summary
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, summary in result.items():
        if isinstance(summary, dict) and "mean_after_first" in summary:
            print(name, summary["steps"], "steps;", json.dumps(summary["mean_after_first"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(required=True)
    build = sub.add_parser("build-model")
    build.add_argument("--out", required=True)
    build.add_argument("--corpus", required=True)
    build.add_argument("--shape", default="tiny")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_build_model)
    wait = sub.add_parser("wait-server")
    wait.add_argument("--url", default="http://127.0.0.1:8000")
    wait.add_argument("--timeout", type=float, default=60)
    wait.set_defaults(func=cmd_wait_server)
    metrics = sub.add_parser("metrics")
    metrics.add_argument("--out", required=True)
    metrics.add_argument("runs", nargs="+", help="name=log_path[:wall_seconds]")
    metrics.set_defaults(func=cmd_metrics)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
