"""Rule-based reward throughput on realistic search-agent trajectories (one process, one core).

    .venv/bin/python benchmarks/reward_scoring.py                # full run: 20k trajectories, best of 5 passes
    .venv/bin/python benchmarks/reward_scoring.py --quick        # 4k trajectories, 2 passes (CI smoke)
    taskset -c 0 .venv/bin/python benchmarks/reward_scoring.py   # pin to one core

Trajectories look like a RAMP policy's output: 1-4 searches, each answered by an <information> block with three
~80-word passages, think blocks, and a final answer with one span per mask (2-4 masks); a fifth are malformed in
the usual ways (no answer, text after the answer, wrong span count, unclosed tag) and a tenth are QA rows.
Reported, per CPU-second of the best pass: the whole verl entry (config lookup, ground truth parsing, format check,
answer match, combination) called directly (compute_score_sync) and awaited (async compute_score, what verl's
reward manager awaits), their paired difference, the same with the recipes' reward_kwargs passed on every call as
verl passes them, and a sync compute_score run the way verl runs one (a thread-pool hop per sample); then the format
check and answer match alone. The ways to call take turns within each pass. Target: >= 50k scores/s.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import time
import timeit

from envs.prompts import answer_block, information_block
from reward.answer_match import score_spans
from reward.format import check_format, extract_answer
from reward.masksearch_reward import compute_score, compute_score_sync

WORDS = (
    "the river city founded in by king empire museum north coast population census station railway bridge cathedral "
    "university professor novel album released band football club season league war treaty signed council mayor "
    "island mountain valley province capital century bishop army general battle festival theatre opera painter"
).split()
# What recipes/configs/dapo_base.yaml sets under reward.custom_reward_function.reward_kwargs.
RECIPE_REWARD_KWARGS = {"ramp_metric": "recall", "qa_metric": "em"}

NAMES = [
    "Paris",
    "Gustave Eiffel",
    "1889",
    "Lyon",
    "Marie Curie",
    "Nobel Prize",
    "Seine",
    "Napoleon III",
    "42",
    "Rhône",
]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_trajectory(rng: random.Random) -> tuple[str, str, object]:
    """(data_source, response, ground_truth)."""
    is_qa = rng.random() < 0.1
    num_masks = 1 if is_qa else rng.randint(2, 4)
    gold = rng.sample(NAMES, num_masks)
    parts = [f"<think> {_sentence(rng, 25)} </think>\n"]
    for _ in range(rng.randint(1, 4)):
        parts.append(f"<search> {_sentence(rng, 6)} </search>")
        docs = "\n".join(f"Doc {i + 1}(Title: {rng.choice(NAMES)}) {_sentence(rng, 80)}" for i in range(3))
        parts.append(information_block(docs))
        parts.append(f"<think> {_sentence(rng, 30)} </think>\n")
    predicted = [g if rng.random() < 0.6 else rng.choice(NAMES) for g in gold]
    parts.append(answer_block(predicted[0] if is_qa else predicted))
    parts.append("<|im_end|>")
    response = "".join(parts)
    fault = rng.random()
    if fault < 0.05:
        response = response.replace("<answer>", "")
    elif fault < 0.10:
        response += " I hope this helps."
    elif fault < 0.15 and not is_qa:
        response = response.replace(" | ", " ", 1)
    elif fault < 0.20:
        response = response.replace("</think>", "", 1)
    if is_qa:
        return "hotpotqa", response, {"target": [gold[0], gold[0].lower()]}
    return "ramp", response, {"target": gold, "masks": gold}


def _rate(fn, items, passes: int) -> float:
    """Items per CPU-second of this process (best pass): on a shared machine wall time also counts other jobs."""
    best = float("inf")
    for _ in range(passes):
        start = time.process_time()
        for item in items:
            fn(*item)
        best = min(best, time.process_time() - start)
    return len(items) / best


def _entry_times(items, passes: int, kwargs: dict) -> dict[str, list[float]]:
    """CPU seconds per pass of each way to call the reward, the ways taking turns within every pass so that load
    from other jobs falls on all of them alike. The async entry is awaited on one event loop (made once, outside
    the timing), one sample after another, as verl's manager awaits it; "executor" is how verl runs a *sync*
    compute_score (``loop.run_in_executor(None, ...)``, one hop to a worker thread per sample; process CPU time
    counts that thread too)."""
    loop = asyncio.new_event_loop()
    tenth = max(1, len(items) // 10)

    async def awaited() -> float:
        start = time.process_time()
        for ds, r, gt in items:
            await compute_score(ds, r, gt, {}, **kwargs)
        return time.process_time() - start

    async def executor() -> float:  # ~10x slower: a tenth of the items, scaled up to all of them
        start = time.process_time()
        for ds, r, gt in items[:tenth]:
            await loop.run_in_executor(None, lambda: compute_score_sync(ds, r, gt, {}, **kwargs))
        return (time.process_time() - start) * len(items) / tenth

    def direct() -> float:
        start = time.process_time()
        for ds, r, gt in items:
            compute_score_sync(ds, r, gt, {}, **kwargs)
        return time.process_time() - start

    times: dict[str, list[float]] = {"sync": [], "async": [], "executor": []}
    try:
        for _ in range(passes):
            times["sync"].append(direct())
            times["async"].append(loop.run_until_complete(awaited()))
            times["executor"].append(loop.run_until_complete(executor()))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    return times


def _calibration_us() -> float:
    """CPU microseconds for sum(range(1000)): a yardstick to compare machines (~10 us on a recent desktop core)."""
    return min(timeit.Timer("sum(range(1000))", timer=time.process_time).repeat(repeat=7, number=2000)) / 2000 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, passes = (4_000, 2) if args.quick else (args.n, args.passes)

    rng = random.Random(0)
    items = [make_trajectory(rng) for _ in range(n)]
    mean_chars = sum(len(r) for _, r, _ in items) / n

    fmt = _rate(lambda ds, r, gt: check_format(r, num_masks=len(gt["target"]) if ds == "ramp" else None), items, passes)
    answers = [(extract_answer(r), gt["target"]) for ds, r, gt in items if ds == "ramp" and extract_answer(r)]
    match = _rate(lambda a, g: score_spans(a, g), answers, passes)
    bare = _entry_times(items, passes, {})
    recipe = _entry_times(items, passes, RECIPE_REWARD_KWARGS)

    def rate(seconds: list[float]) -> str:
        best = n / min(seconds)
        return f"{best:>10,.0f} scores/s ({1e6 / best:5.1f} us CPU per score)"

    def overhead(times: dict[str, list[float]], way: str) -> str:
        paired = sorted((t - s) / n * 1e6 for t, s in zip(times[way], times["sync"], strict=True))
        return f"{paired[len(paired) // 2]:+.2f} us per score (median over passes of the paired difference)"

    ok = sum(compute_score_sync(*item)["format"] for item in items) / n
    print(f"trajectories: {n} (mean {mean_chars:.0f} chars, {ok:.0%} well formed), best of {passes} passes")
    print(
        f"machine yardstick: sum(range(1000)) = {_calibration_us():.1f} us CPU (python {platform.python_version()});"
        " rates are per CPU-second"
    )
    print(f"compute_score_sync : {rate(bare['sync'])}")
    print(f"compute_score async: {rate(bare['async'])}  awaited one by one, rule metric")
    print(f"  async - sync     : {overhead(bare, 'async')}")
    print(f"with the recipes' reward_kwargs {RECIPE_REWARD_KWARGS} (verl passes them on every call):")
    print(f"compute_score_sync : {rate(recipe['sync'])}")
    print(f"compute_score async: {rate(recipe['async'])}  (verl awaits it on the reward loop)")
    print(f"sync in executor   : {rate(recipe['executor'])}  (how verl runs a sync compute_score)")
    print(f"check_format       : {fmt:>10,.0f} /s")
    print(f"score_spans (RAMP) : {match:>10,.0f} /s")


if __name__ == "__main__":
    main()
