"""Model judge against a fake OpenAI-compatible server on 127.0.0.1 (FastAPI + uvicorn in a thread).

The fake server's behaviour is chosen by the request's ``model`` name, so every test picks its judge by config:
``yes`` / ``no`` / ``alternate`` verdicts, ``fenced`` (verdict inside a code fence and prose), ``garbage`` (no JSON),
``error`` (HTTP 500), ``slow`` (answers after the client's timeout), ``wait`` (0.3 s delay, for the concurrency check),
``picky`` (garbage for answers that mention 1890, a verdict for the rest).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import reward.judge as judge_module
from masksearch_rl.llm import LLMConfig
from reward.judge import JudgeItem, build_judge_messages, get_judge, parse_verdict, resolve_llm_config
from reward.masksearch_reward import compute_score, compute_score_sync, reset_caches

RAMP_GT = {"target": ["Gustave Eiffel", "1889"], "masks": ["Gustave Eiffel", "1889"]}
# EM 0, plain recall 0.75; 0 under the reward's commitment guard ("g" and "year" are not in the golds)
NEAR_MISS = "<think> ok </think><answer> G. Eiffel | the year 1889 </answer>"


class FakeJudgeServer:
    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.in_flight: Counter = Counter()  # per model: the slow model's calls outlive their test
        self.max_in_flight: Counter = Counter()
        self.prompts: list[str] = []
        app = FastAPI()
        app.post("/v1/chat/completions")(self.chat)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "fake judge server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def chat(self, request: Request):
        body = await request.json()
        model = body["model"]
        self.calls[model] += 1
        prompt = body["messages"][-1]["content"]
        self.prompts.append(prompt)
        blanks = int(re.search(r"Blanks to grade \((\d+)\)", prompt).group(1))
        self.in_flight[model] += 1
        self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])
        try:
            if model == "slow":
                await asyncio.sleep(3)
            if model == "wait":
                await asyncio.sleep(0.3)
            if model == "error":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        finally:
            self.in_flight[model] -= 1
        if model == "picky" and "1890" in prompt:
            content = "Hmm, hard to say."
        elif model.startswith("yes") or model in ("slow", "wait", "picky"):
            content = json.dumps({"correct": [True] * blanks})
        elif model == "no":
            content = json.dumps({"correct": [False] * blanks})
        elif model == "alternate":
            content = json.dumps({"correct": [i % 2 == 0 for i in range(blanks)]})
        elif model == "fenced":
            content = 'Let me check.\n```json\n{"correct": [true, true]}\n```'
        else:
            content = "The answer looks right to me!"
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


@pytest.fixture(scope="module")
def server():
    fake = FakeJudgeServer()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _fresh_judges():
    # Judges (and their HTTP clients) are per process; each test runs on its own event loop.
    judge_module._JUDGES.clear()
    reset_caches()
    yield
    judge_module._JUDGES.clear()
    reset_caches()


def judge_kwargs(server, model: str, **llm) -> dict:
    return {"ramp_metric": "judge", "qa_metric": "judge", "judge": {"base_url": server.url, "model": model, **llm}}


# ------------------------------------------------------------------------------------------- prompt and parsing


def test_prompt_lists_each_blank_with_gold_and_prediction():
    item = JudgeItem(
        golds=(("Gustave Eiffel", "Eiffel"), ("1889",)), answer="G. Eiffel | 1889", spans=("G. Eiffel", "1889")
    )
    prompt = build_judge_messages(item)[-1]["content"]
    assert "Blanks to grade (2)" in prompt
    assert '1. gold: "Gustave Eiffel" OR "Eiffel"; model: "G. Eiffel"' in prompt
    assert '2. gold: "1889"; model: "1889"' in prompt
    assert '{"correct": [true, false, ...]}' in prompt


@pytest.mark.parametrize(
    ("reply", "blanks", "expected"),
    [
        ('{"correct": [true, false]}', 2, (True, False)),
        ('```json\n{"correct": [true]}\n```', 1, (True,)),
        ('Reasoning... final: {"correct": [false, true]}', 2, (False, True)),
        ('{"correct": true}', 1, (True,)),
        ('{"correct": [true]}', 2, None),  # wrong length
        ('{"correct": ["yes", "no"]}', 2, None),  # not booleans
        ('{"correct": [1, 0]}', 2, None),
        ("correct!", 1, None),
        ("{'correct': [True]}", 1, None),  # Python literal, not JSON: never evaluated
        ("", 1, None),
    ],
)
def test_parse_verdict(reply, blanks, expected):
    assert parse_verdict(reply, blanks) == expected


def test_router_address_and_tokenizer_name_pick_the_endpoint():
    tokenizer = SimpleNamespace(name_or_path="/models/judge-7b")
    config = resolve_llm_config({}, "10.0.0.5:8123", tokenizer)
    assert config.base_url == "http://10.0.0.5:8123/v1" and config.model == "/models/judge-7b"
    explicit = resolve_llm_config({"base_url": "http://judge:9000/v1", "model": "m"}, "10.0.0.5:8123", tokenizer)
    assert explicit.base_url == "http://judge:9000/v1" and explicit.model == "m"
    with pytest.raises(ValueError, match="judge.base_url"):
        resolve_llm_config({}, None, None)


# ------------------------------------------------------------------------------------------------ against HTTP


async def test_verdict_is_used(server):
    yes = await compute_score("ramp", NEAR_MISS, RAMP_GT, **judge_kwargs(server, "yes"))
    assert yes["judge"] == 1 and yes["score"] == 1 and yes["acc"] == 1 and yes["judge_fallback"] == 0
    assert yes["em"] == 0  # answer matching alone would not have given it
    alternate = await compute_score("ramp", NEAR_MISS, RAMP_GT, **judge_kwargs(server, "alternate"))
    assert alternate["judge"] == 0.5 and alternate["score"] == 0.5
    no = await compute_score("hotpotqa", "<answer> Paris, France </answer>", "Paris", **judge_kwargs(server, "no"))
    assert no["score"] == 0 and no["judge"] == 0 and no["judge_fallback"] == 0
    fenced = await compute_score("ramp", NEAR_MISS, RAMP_GT, **judge_kwargs(server, "fenced"))
    assert fenced["score"] == 1


async def test_no_call_when_not_needed(server):
    kwargs = judge_kwargs(server, "no")
    before = server.calls["no"]
    exact = await compute_score("ramp", "<answer> Gustave Eiffel | 1889 </answer>", RAMP_GT, **kwargs)
    assert exact["judge"] == 1 and exact["score"] == 1  # exact match: no call needed
    broken = await compute_score("ramp", "<answer> G. Eiffel | 1889 </answer> trailing", RAMP_GT, **kwargs)
    assert broken["score"] == 0 and broken["format"] == 0  # gated by format: no call
    empty = await compute_score("ramp", "<think> no answer </think>", RAMP_GT, **kwargs)
    assert empty["score"] == 0
    assert server.calls["no"] == before


async def test_gated_out_exact_answer_reports_no_judge_credit(server):
    """An exact answer in a malformed response: no call, and judge=0 like score and acc (the gate closed)."""
    kwargs = judge_kwargs(server, "no")
    before = server.calls["no"]
    result = await compute_score("ramp", "<answer> Gustave Eiffel | 1889 </answer> trailing", RAMP_GT, **kwargs)
    assert result["format"] == 0 and result["em"] == 1
    assert result["judge"] == 0 and result["score"] == 0 and result["acc"] == 0 and result["judge_fallback"] == 0
    ungated = await compute_score("ramp", "<answer> Gustave Eiffel | 1889 </answer> trailing", RAMP_GT,
                                  format_gate=False, **kwargs)
    assert ungated["judge"] == 1 and ungated["acc"] == 1  # without the gate the exact match counts, still no call
    assert server.calls["no"] == before


async def test_question_from_extra_info_reaches_the_prompt(server):
    await compute_score(
        "nq", "<answer> NYC </answer>", "New York", {"question": "Largest US city?"}, **judge_kwargs(server, "yes")
    )
    assert "Largest US city?" in server.prompts[-1]


async def test_cache_hit_makes_no_second_call(server, tmp_path):
    kwargs = judge_kwargs(server, "yes-cached", cache_dir=str(tmp_path / "judge_cache"))
    first = await compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs)
    second = await compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs)
    assert first == second and first["judge"] == 1
    assert server.calls["yes-cached"] == 1
    # a fresh process (new judge objects) reads the same on-disk cache
    judge_module._JUDGES.clear()
    third = await compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs)
    assert third == first and server.calls["yes-cached"] == 1
    # a different answer is a different item
    await compute_score("ramp", NEAR_MISS.replace("1889", "1890"), RAMP_GT, **kwargs)
    assert server.calls["yes-cached"] == 2


async def test_cache_keeps_only_replies_that_parse(server, tmp_path):
    """A garbage reply is a failed call, not the item's verdict: a second run asks again for that item only."""
    from masksearch_rl.llm import LLMClient

    kwargs = judge_kwargs(server, "picky", cache_dir=str(tmp_path / "judge_cache"))
    good, garbage = NEAR_MISS, NEAR_MISS.replace("1889", "1890")
    for run in (1, 2):
        judge_module._JUDGES.clear()  # a fresh process each time: only the disk cache carries over
        assert (await compute_score("ramp", good, RAMP_GT, **kwargs))["judge_fallback"] == 0
        assert (await compute_score("ramp", garbage, RAMP_GT, **kwargs))["judge_fallback"] == 1
        assert server.calls["picky"] == 1 + run  # the good item once in all, the garbage one on every run

    # A garbage reply cached by a client that does not check replies (as every cache did before) is not replayed.
    item = JudgeItem(golds=(("Paris",),), answer="Paris in 1890")
    plain = LLMClient(resolve_llm_config(kwargs["judge"]))
    await plain.chat(build_judge_messages(item))
    await plain.aclose()
    judge_module._JUDGES.clear()
    verdict = await get_judge(resolve_llm_config(kwargs["judge"])).grade(item)
    assert verdict.score is None and server.calls["picky"] == 5  # asked again, still garbage


async def test_identical_items_in_flight_share_one_call(server):
    kwargs = judge_kwargs(server, "wait")
    before = server.calls["wait"]
    results = await asyncio.gather(*(compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs) for _ in range(5)))
    assert all(r["judge"] == 1 for r in results)
    assert server.calls["wait"] == before + 1


@pytest.mark.parametrize(
    ("model", "llm", "requests_per_item"),
    [
        ("garbage", {}, 1),
        ("error", {"max_retries": 1}, 2),  # 500, one retry with backoff, then give up
        ("slow", {"timeout_s": 0.5, "max_retries": 0}, 1),  # no reply within the timeout
    ],
)
async def test_failures_fall_back_to_answer_matching_and_are_counted(server, model, llm, requests_per_item):
    kwargs = judge_kwargs(server, model, **llm)
    before = server.calls[model]
    result = await compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs)
    assert result["judge_fallback"] == 1 and result["judge"] == 0
    # RAMP falls back to recall under the commitment guard: "g eiffel" and "year 1889" each add a token of their own
    # so neither span earns anything (the judge is what credits such near misses)
    assert result["score"] == 0 == result["recall"]
    qa = await compute_score("hotpotqa", "<answer> Paris, France </answer>", "Paris", **kwargs)
    assert qa["judge_fallback"] == 1 and qa["score"] == 0  # QA falls back to EM
    assert server.calls[model] - before == 2 * requests_per_item  # bounded retries
    stats = get_judge(resolve_llm_config(kwargs["judge"])).stats
    assert stats["failures"] == 2 and stats["verdicts"] == 0


async def test_fallback_metric_is_configurable(server):
    kwargs = {**judge_kwargs(server, "garbage"), "judge_fallback_metric": "em"}
    result = await compute_score("ramp", NEAR_MISS, RAMP_GT, **kwargs)
    assert result["judge_fallback"] == 1 and result["score"] == 0


async def test_concurrency_limit_is_respected(server):
    limit = 3
    judge = get_judge(LLMConfig(base_url=server.url, model="wait", concurrency=limit, max_retries=0))
    items = [JudgeItem(golds=((f"gold {i}",),), answer=f"answer {i}") for i in range(10)]
    server.max_in_flight["wait"] = 0
    start = time.perf_counter()
    verdicts = await judge.grade_many(items)
    elapsed = time.perf_counter() - start
    assert [v.score for v in verdicts] == [1.0] * 10
    assert server.max_in_flight["wait"] == limit  # never more, and the limit was actually used
    assert elapsed >= 0.3 * 10 / limit - 0.05  # 10 calls of 0.3 s through 3 slots take at least 4 rounds' worth


async def test_router_address_from_verl(server):
    # What verl passes when reward.reward_model.enable=True: the router's host:port and the reward tokenizer.
    tokenizer = SimpleNamespace(name_or_path="yes")
    result = await compute_score(
        "ramp",
        NEAR_MISS,
        RAMP_GT,
        ramp_metric="judge",
        reward_router_address=f"127.0.0.1:{server.port}",
        reward_model_tokenizer=tokenizer,
    )
    assert result["judge"] == 1 and result["judge_fallback"] == 0


def test_sync_entry_uses_the_judge_from_threads(server):
    kwargs = judge_kwargs(server, "alternate")
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(compute_score_sync("ramp", NEAR_MISS, RAMP_GT, **kwargs)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and all(r["judge"] == 0.5 and r["judge_fallback"] == 0 for r in results)
