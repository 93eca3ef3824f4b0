"""A scripted OpenAI-compatible server that plays every role deterministically over the synthetic world.

Why it exists: CoT construction, self-evolve and the standalone rollout talk to LLM endpoints; tests (and an offline
demo) need one that behaves like a competent model without weights. It knows the answers (``oracle``: the synthetic
questions' ``oracle_queries``/``answer``, RAMP items' ``title``/``masks``), but it only answers once the search
results it was shown contain the answer, so a trajectory it produces is correct only if search really worked.

Roles are told apart by their system prompt: Planner, Rewriter, Observer (masksearch_rl.cot.agents), the judge
(reward.judge) and the tag-protocol policy (envs.prompts.SYSTEM_PROMPT) on ``/v1/chat/completions`` (both the
``turns`` and the vLLM ``continue_final_message`` layouts) and ``/v1/completions``.

Misbehaviour on request, per task id (``server.behaviour[id] = ...``): ``garbage`` (Observer and policy reply
nonsense), ``planner_garbage`` / ``rewriter_garbage`` / ``judge_garbage`` (that role replies nonsense), ``429``
(Planner and policy always answer HTTP 429), ``slow`` (Planner and policy answer after ``slow_s``), ``wrong`` (a
wrong final answer), ``loop`` (never answers), ``replan`` (the Observer asks for a new plan after its first search),
``own_knowledge`` (the Observer finds nothing in any result and answers only once told it may use its own
knowledge), ``chatty`` (the policy answers right but with untagged text before its answer). ``delay_s`` slows every
reply; ``capacity`` serves at most that many requests at once (the rest queue, as at a real server's limit), and
``max_in_flight`` records the most requests it ever held. ``server.requests`` keeps ``{"role", "task", "user",
"temperature", "t"}`` of every request (``user``: the last message; ``t``: its arrival, monotonic seconds), for tests
to inspect.

QA records without ``oracle_queries`` (e.g. real HotpotQA files) are searched by their question.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here

from envs.prompts import INFO_CLOSE, INFO_OPEN, SYSTEM_PROMPT
from masksearch_rl.cot import agents


class ScriptedServer:
    """``with ScriptedServer(tasks) as server: server.base_url`` -> ``http://127.0.0.1:<port>/v1``.

    ``tasks``: synthetic question records (``question, answer, oracle_queries``) and/or RAMP items
    (``id, query, masks, title``).
    """

    def __init__(self, tasks: list[dict[str, Any]], delay_s: float = 0.0, slow_s: float = 3.0,
                 capacity: int | None = None):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.tasks = tasks
        self.behaviour: dict[str, str] = {}
        self.delay_s, self.slow_s = delay_s, slow_s
        self.capacity = capacity  # requests served at once (like a server at its batch limit); the rest queue
        self.in_flight = self.max_in_flight = 0  # requests inside the server, queued ones included
        self.hits: Counter = Counter()
        self.requests: list[dict[str, Any]] = []
        self._slots: asyncio.Semaphore | None = None
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            return await self._admitted(body, body["messages"], None, JSONResponse)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            return await self._admitted(body, None, body["prompt"], JSONResponse)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def _admitted(self, body: dict, messages: list[dict] | None, prompt: str | None, JSONResponse):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.capacity is None:
                return await self._respond(body, messages, prompt, JSONResponse)
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.capacity)
            async with self._slots:
                return await self._respond(body, messages, prompt, JSONResponse)
        finally:
            self.in_flight -= 1

    # ----------------------------------------------------------------------------------------------- dispatch
    def _task(self, text: str) -> dict[str, Any] | None:
        for task in self.tasks:
            key = task["query"] if "masks" in task else task["question"].strip()
            if key in text:
                return task
        return None

    async def _respond(self, body: dict, messages: list[dict] | None, prompt: str | None, JSONResponse):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = prompt if prompt is not None else "\n".join(str(m.get("content")) for m in messages)
        system = messages[0]["content"] if messages else (SYSTEM_PROMPT if SYSTEM_PROMPT in text else "")
        if system.startswith("You are a strict, impartial grader"):
            role = "judge"
        elif system == agents.PLANNER_SYSTEM:
            role = "planner"
        elif system.startswith(agents.REWRITER_SYSTEM[:40]):
            role = "rewriter"
        elif system.startswith(agents.OBSERVER_SYSTEM[:40]):
            role = "observer"
        else:
            role = "policy"
        self.hits[role] += 1
        task = self._task(messages[1]["content"] if messages and len(messages) > 1 else text)
        task_id = _task_id(task) if task else None
        behaviour = self.behaviour.get(task_id) if task else None
        self.requests.append({"role": role, "task": task_id, "temperature": body.get("temperature"),
                              "user": str(messages[-1]["content"]) if messages else text, "t": time.monotonic()})
        if behaviour == "429" and role in ("planner", "policy"):
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429,
                                headers={"retry-after-ms": "10"})
        if behaviour == "slow" and role in ("planner", "policy"):
            await asyncio.sleep(self.slow_s)
        if role == "judge":
            garbage = behaviour == "judge_garbage"
            reply, finish = ("I think it is fine." if garbage else _judge(messages[-1]["content"])), None
        elif task is None:
            reply, finish = "I do not know this task.", None
        elif role == "policy":
            reply, finish = _policy(task, text, behaviour, body)
        else:
            reply, finish = _ROLE[role](task, messages[-1]["content"], behaviour), None
        return _completion(body.get("model", "scripted"), reply, prompt is not None, finish, len(text.split()))


def _completion(model: str, text: str, legacy: bool, finish: tuple[str, str | None] | None,
                prompt_words: int = 1) -> dict:
    """The reply; ``usage`` counts words as tokens (enough for throughput figures)."""
    finish_reason, stop_reason = finish or ("stop", None)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "stop_reason": stop_reason}
    if legacy:
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return {
        "id": "scripted-1", "object": "text_completion" if legacy else "chat.completion", "created": 0,
        "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                  "total_tokens": prompt_words + len(text.split())},
    }


# ---------------------------------------------------------------------------------------------------- roles
def _task_id(task: dict) -> str:
    return str(task.get("id", task.get("idx")))


def _hops(task: dict) -> list[str]:
    """What to search, in order: the oracle chain, a RAMP item's title, else the question itself."""
    return list(task.get("oracle_queries") or [task.get("title") or task.get("question")])


def _golds(task: dict) -> list[list[str]]:
    """Aliases per blank: one blank per mask (RAMP), one blank holding the answer's aliases (QA)."""
    if "masks" in task:
        return [[m] for m in task["masks"]]
    answer = task["answer"]
    return [[answer] if isinstance(answer, str) else list(answer)]


def _planner(task: dict, user: str, behaviour: str | None) -> str:
    if behaviour == "planner_garbage":
        return "Let me think about a plan. First, I would search."
    first = _hops(task)[0]
    return json.dumps({"plan": f"Look up {first} first, then follow what it says.", "sub_queries": [first]})


def _rewriter(task: dict, user: str, behaviour: str | None) -> str:
    if behaviour == "rewriter_garbage":
        return '{"queries": "just one query"}'
    request = user.rsplit("Search request:", 1)[-1].strip()
    return "```json\n" + json.dumps({"queries": [request, f"{request} facts", f"about {request}"]}) + "\n```"


def _found(task: dict, results: str) -> list[str] | None:
    """The answer (one alias per blank) when ``results`` contain all of it, else None."""
    low = results.lower()
    found = [next((a for a in aliases if a.lower() in low), None) for aliases in _golds(task)]
    return None if None in found else found


def _observer(task: dict, user: str, behaviour: str | None) -> str:
    if behaviour == "garbage":
        return "Sure! The answer is probably in the second document {not json"
    done = int(re.search(r"Searches so far: (\d+)", user).group(1))
    if behaviour == "replan" and done == 1:
        return json.dumps({"summary": "Nothing useful yet.", "think": "This plan is not working.", "found": False,
                           "action": "replan"})
    if behaviour == "own_knowledge":
        if agents.OWN_KNOWLEDGE_HINT not in user:
            return json.dumps({"summary": "The results do not help.", "think": "I should look elsewhere.",
                               "found": False, "action": "search", "sub_query": f"{_hops(task)[0]} history"})
        spans = [aliases[0] for aliases in _golds(task)]
        return json.dumps({"summary": "Searching did not help.", "think": "I know this from memory.", "found": True,
                           "action": "answer", "answer": spans if "masks" in task else spans[0]})
    results = user.split("Latest results:", 1)[-1]
    found = _found(task, results)
    if found and behaviour != "loop":
        answer: Any = found if "masks" in task else found[0]
        if behaviour == "wrong":
            answer = ["Nobody"] * len(found) if "masks" in task else "Nobody"
        return json.dumps({"summary": "The results state what is needed.", "think": "I can answer now.",
                           "found": True, "action": "answer", "answer": answer})
    hops = _hops(task)
    next_query = hops[done] if done < len(hops) and behaviour != "loop" else hops[-1]
    return json.dumps({"summary": f"The results name {next_query}.", "think": f"Next I need {next_query}.",
                       "found": True, "action": "search", "sub_query": next_query})


_ROLE = {"planner": _planner, "rewriter": _rewriter, "observer": _observer}


def _judge(user: str) -> str:
    from reward.answer_match import normalize_answer

    answer = user.split("The model's final answer:\n", 1)[1].split("\n\nBlanks to grade", 1)[0].strip()
    verdicts = []
    for line in re.findall(r"^\d+\. gold: (.*)$", user, flags=re.MULTILINE):
        gold_part, model_part = line.rsplit("; model: ", 1)
        golds = [json.loads(g) for g in re.findall(r'"(?:[^"\\]|\\.)*"', gold_part)]
        model = json.loads(model_part) if model_part.startswith('"') else answer
        verdicts.append(any(normalize_answer(model) == normalize_answer(g) for g in golds))
    return json.dumps({"correct": verdicts})


def _policy(task: dict, text: str, behaviour: str | None, body: dict) -> tuple[str, tuple[str, str | None]]:
    """The tag-protocol policy: search the oracle chain until the answer appears in the information blocks."""
    if behaviour == "garbage":
        return "I will just chat without any tags.", ("stop", None)
    text = text.replace(SYSTEM_PROMPT, "")  # the system prompt names the tags itself
    infos = re.findall(re.escape(INFO_OPEN) + r"(.*?)" + re.escape(INFO_CLOSE), text, flags=re.DOTALL)
    found = _found(task, infos[-1]) if infos and behaviour != "loop" else None
    if found:
        answer = " | ".join(found) if "masks" in task else found[0]
        if behaviour == "wrong":
            answer = "Nobody"
        reply, tag = f"<think> The information gives the answer. </think>\n<answer> {answer} </answer>", "</answer>"
        if behaviour == "chatty":
            reply = f"Great, that settles it! {reply}"
    else:
        hops = _hops(task)
        query = hops[min(len(infos), len(hops) - 1)]
        reply, tag = f"<think> I need to look up {query}. </think>\n<search> {query} </search>", "</search>"
    if not (body.get("include_stop_str_in_output") or (body.get("extra_body") or {}).get("include_stop_str_in_output")):
        return reply[: -len(tag)], ("stop", tag)  # OpenAI-style: the stop string is not in the text
    return reply, ("stop", tag)
