"""The Ray Data engine (``--engine ray``) on a local Ray: the same records as the asyncio engine, every id exactly
once after a worker raises at item N, after a failed job and after a killed driver; the endpoint budget holds over
all workers; exports drop duplicate ids, sort by id and read committed files only.

One local Ray (4 logical CPUs: two workers plus Ray Data's checkpoint filter and read/write tasks, no dashboard, a
small object store) serves the module; the killed-driver test starts its own in a child process and removes what
that leaves behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi import FastAPI, Request

from masksearch_rl.distributed.engine import RayEngineConfig, WorkDir, committed_files, export_outputs
from masksearch_rl.jsonl import read_jsonl
from masksearch_rl.llm import LLMConfig
from masksearch_rl.ramp import ray_job
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp

REPO = Path(__file__).resolve().parents[1]
RAY = {"workers": 2, "batch_size": 20, "rows_per_file": 20, "progress_interval_s": 5}

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test processors travel to the workers by value


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, object_store_memory=120 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _corpus(path: Path, n: int) -> Path:
    rng = random.Random(0)
    names = ["Kelovar", "Tamsin", "Orlena", "Varnhold", "Brisco", "Delmar", "Quenton", "Ysolde"]
    with open(path, "w") as handle:
        for i in range(n):
            a, b, c = rng.sample(names, 3)
            text = (f"The city of {a}{i} was founded in {rng.randint(1000, 2020)} by {b} {c}, who later moved to "
                    f"Port {c}{i}. Its population was {rng.randint(100, 99999):,} in {rng.randint(1900, 2020)}.")
            if i % 17 == 0:
                text = "Too short."
            handle.write(json.dumps({"id": f"s{i:05d}", "title": f"{a}{i}", "contents": f'"{a}{i}"\n{text}'}) + "\n")
    return path


def _config(corpus: Path, out: Path, **ray_options) -> RampConfig:
    return RampConfig(corpus=corpus, out=out, seed=3, progress=False, engine="ray", ray={**RAY, **ray_options})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """A 300-passage corpus and what the asyncio engine makes of it (items and drops, sorted by id)."""
    root = tmp_path_factory.mktemp("ray-reference")
    corpus = _corpus(root / "corpus.jsonl", 300)
    out = root / "asyncio.jsonl"
    generate_ramp(RampConfig(corpus=corpus, out=out, seed=3, progress=False))
    return corpus, {suffix: sorted(read_jsonl(f"{out}{suffix}"), key=lambda r: r["id"])
                    for suffix in ("", ".dropped.jsonl")}


def _assert_same_as_reference(out: Path, expected: dict[str, list[dict]]) -> None:
    for suffix, records in expected.items():
        got = read_jsonl(f"{out}{suffix}")
        assert [r["id"] for r in got] == sorted({r["id"] for r in got}), "each id once, sorted by id"
        assert got == records
    assert len(expected[""]) + len(expected[".dropped.jsonl"]) == 300


def test_offline_ramp_on_ray_makes_the_asyncio_records_and_a_rerun_has_nothing_left(tmp_path, reference):
    corpus, expected = reference
    out = tmp_path / "items.jsonl"
    summary = generate_ramp(_config(corpus, out))
    run = summary["run"]
    assert (run["items"], run["dropped"], run["skipped_done"], run["stopped"]) == (
        len(expected[""]), len(expected[".dropped.jsonl"]), 0, None)
    assert run["drop_reasons"] == {"too_short": 18} and sum(run["mask_histogram"].values()) == run["items"]
    _assert_same_as_reference(out, expected)
    assert summary["totals"]["items"] == run["items"] and summary["ray"]["input_rows"] == 300
    assert json.loads(Path(f"{out}.summary.json").read_text())["run"] == run

    again = generate_ramp(_config(corpus, out))
    assert (again["run"]["items"], again["run"]["dropped"], again["run"]["skipped_done"]) == (0, 0, 300)
    assert again["ray"]["input_reused"] is True
    _assert_same_as_reference(out, expected)

    with pytest.raises(ValueError, match="asyncio engine"):  # one output, one engine
        generate_ramp(_config(corpus, corpus.parent / "asyncio.jsonl"))


def _flaky(raise_at: str | None, crash_at: str | None, marker: Path) -> type:
    """A RAMP processor that, on its first run only (``marker`` absent), raises while preparing item ``raise_at``
    (one item's bug) or raises out of the batch holding ``crash_at`` (the job fails)."""

    class Flaky(ray_job.RampProcessor):
        async def process(self, items):
            if crash_at in {i for i, _ in items} and not marker.exists():
                marker.touch()
                raise RuntimeError(f"worker crashed at item {crash_at}")
            return await super().process(items)

        async def _prepare(self, record):
            if record["id"] == raise_at and not marker.exists():
                marker.touch()
                raise ValueError(f"a bug at item {raise_at}")
            return await super()._prepare(record)

    return Flaky


def test_an_item_that_raises_is_left_for_the_next_run_and_every_id_comes_once(tmp_path, reference, monkeypatch):
    corpus, expected = reference
    out = tmp_path / "items.jsonl"
    monkeypatch.setattr(ray_job, "RampProcessor", _flaky("s00123", None, tmp_path / "raised"))
    first = generate_ramp(_config(corpus, out))
    assert first["run"]["stopped"] is None and first["run"]["errors_pending"] == 1
    assert first["run"]["items"] + first["run"]["dropped"] == 299
    produced = {r["id"] for r in read_jsonl(out)} | {r["id"] for r in read_jsonl(f"{out}.dropped.jsonl")}
    assert "s00123" not in produced and len(produced) == 299
    [entry] = read_jsonl(f"{out}.errors.jsonl")
    assert (entry["id"], entry["kind"], entry["error"]) == ("s00123", "task_error", "ValueError: a bug at item s00123")
    assert "Traceback" in entry["traceback"]

    second = generate_ramp(_config(corpus, out))
    assert (second["run"]["items"] + second["run"]["dropped"], second["run"]["skipped_done"]) == (1, 299)
    assert second["run"]["errors_pending"] == 0 and read_jsonl(f"{out}.errors.jsonl") == []
    _assert_same_as_reference(out, expected)


def test_a_failed_job_keeps_what_it_committed_and_the_rerun_finishes_it(tmp_path, reference, monkeypatch):
    corpus, expected = reference
    out = tmp_path / "items.jsonl"
    monkeypatch.setattr(ray_job, "RampProcessor", _flaky(None, "s00250", tmp_path / "crashed"))
    first = generate_ramp(_config(corpus, out))
    assert "worker crashed at item s00250" in first["run"]["stopped"]
    done = [r["id"] for r in read_jsonl(out)] + [r["id"] for r in read_jsonl(f"{out}.dropped.jsonl")]
    assert len(done) == len(set(done)) < 300 and "s00250" not in done

    second = generate_ramp(_config(corpus, out))
    assert second["run"]["stopped"] is None and second["run"]["skipped_done"] == len(done)
    assert second["run"]["items"] + second["run"]["dropped"] == 300 - len(done)
    _assert_same_as_reference(out, expected)


_KILLED_DRIVER = """
import asyncio, json, sys
import masksearch_rl.ramp.ray_job as ray_job
from masksearch_rl.ramp.pipeline import RampConfig, generate_ramp

class Slow(ray_job.RampProcessor):  # defined in __main__: sent to the workers by value
    async def process(self, items):
        await asyncio.sleep(0.4)
        return await super().process(items)

ray_job.RampProcessor = Slow
generate_ramp(RampConfig(corpus=sys.argv[1], out=sys.argv[2], seed=3, progress=False, engine="ray",
                         ray=json.loads(sys.argv[3])))
"""


def test_a_killed_driver_loses_and_duplicates_nothing(tmp_path, reference):
    import psutil

    corpus, expected = reference
    out = tmp_path / "items.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    options = {**RAY, "batch_size": 10, "rows_per_file": 10}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, str(corpus), str(out), json.dumps(options)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = WorkDir(Path(f"{out}.ray"))
    family: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        while len(committed_files(work)) < 3:
            assert child.poll() is None, ("the run ended before it could be killed", child.stderr.read()[-3000:])
            assert time.monotonic() < deadline, "no output was committed in time"
            family.update((p.pid, p) for p in psutil.Process(child.pid).children(recursive=True))
            time.sleep(0.2)
        family.update((p.pid, p) for p in psutil.Process(child.pid).children(recursive=True))
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        _reap(child, family)
    committed = sum(pq.read_metadata(p).num_rows for p in committed_files(work))
    assert 30 <= committed < 300, "killed mid-run"

    summary = generate_ramp(_config(corpus, out, batch_size=10, rows_per_file=10))
    assert summary["run"]["skipped_done"] >= committed and summary["ray"]["duplicate_output_ids"] == 0
    assert summary["run"]["items"] + summary["run"]["dropped"] + summary["run"]["skipped_done"] == 300
    _assert_same_as_reference(out, expected)


def _reap(child: subprocess.Popen, family: dict) -> None:
    """Kill what the killed driver's local Ray left (Ray ends its workers with their driver, but its dashboard and
    runtime-env agents may outlive it); by pid, only processes that run started."""
    import psutil

    if child.poll() is None:
        child.kill()
        child.wait()
    _, alive = psutil.wait_procs(list(family.values()), timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


# ------------------------------------------------------------------------------------------- endpoint budget
class SlowEntityServer:
    """OpenAI-compatible chat endpoint that answers after ``latency_s`` with the passage's capitalised words, and
    records the most requests it ever had in flight and when each arrived."""

    def __init__(self, latency_s: float):
        import re

        self.latency_s = latency_s
        self.in_flight = self.max_in_flight = 0
        self.arrivals: list[float] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.latency_s)
            finally:
                self.in_flight -= 1
            passage = body["messages"][-1]["content"].rsplit("Passage:\n", 1)[-1]
            names = sorted(set(re.findall(r"\b[A-Z][a-z]+[0-9]*\b", passage)) - {"The", "Its", "Port"})
            message = {"role": "assistant", "content": json.dumps(names)}
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> SlowEntityServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_the_endpoint_budget_bounds_requests_in_flight_and_per_second_over_all_workers(tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl", 64)
    with SlowEntityServer(latency_s=0.3) as server:
        llm = LLMConfig(base_url=f"http://127.0.0.1:{server.port}/v1", model="fake", concurrency=3, max_retries=0)
        config = RampConfig(corpus=corpus, out=tmp_path / "a.jsonl", extractor="llm", llm=llm, progress=False,
                            engine="ray", ray={**RAY, "batch_size": 16})
        summary = generate_ramp(config)
        # two workers, each with up to 4 batches of 16 in flight and a client limit of 3: without the shared
        # budget the endpoint would see up to 6
        assert server.max_in_flight == 3
        budget = summary["ray"]["endpoint_budget"][llm.base_url]
        assert budget["max_in_flight"] == 3 and budget["requests"] == 60  # (4 passages are too short to ask about)
        assert summary["run"]["items"] + summary["run"]["dropped"] == 64
        assert summary["ray"]["tokens_per_s"] > 0 and summary["run"]["llm_errors"] == 0

        server.arrivals.clear()
        rated = LLMConfig(base_url=llm.base_url, model="fake", concurrency=16, rate_per_s=20.0, max_retries=0)
        generate_ramp(RampConfig(corpus=corpus, out=tmp_path / "b.jsonl", extractor="llm", llm=rated,
                                 progress=False, engine="ray", ray={**RAY, "batch_size": 16}))
        gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:])]
        assert len(server.arrivals) == 60 and server.arrivals[-1] - server.arrivals[0] >= 59 / 20 * 0.9
        assert sorted(gaps)[len(gaps) // 2] >= 0.9 / 20  # evenly spaced, not in bursts


# ------------------------------------------------------------------------------------------------- export
def _write(path: Path, rows: list[tuple[str, str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [r[0] for r in rows], "kind": [r[1] for r in rows],
                             "record": [json.dumps(r[2]) for r in rows]}), path)


@pytest.mark.parametrize("memory_bytes", [1 << 30, 40])
def test_export_reads_committed_files_only_drops_duplicate_ids_and_sorts(tmp_path, memory_bytes):
    work = WorkDir(tmp_path / "work")
    _write(work.output / "u1_000000_000000.parquet", [("b", "item", {"id": "b"}), ("a", "dropped", {"id": "a"})])
    _write(work.output / "u1_000001_000000.parquet", [("a", "item", {"id": "a", "dup": 1}), ("c", "item", {"id": "c"})])
    _write(work.output / "u2_000000_000000.parquet", [("d", "item", {"id": "d"})])  # a write that never committed
    _write(work.checkpoint / "u1_000000.parquet", [])
    _write(work.checkpoint / "u1_000001.parquet", [])
    _write(work.checkpoint / "u2_000000.pending.parquet", [])
    assert [p.name for p in committed_files(work)] == ["u1_000000_000000.parquet", "u1_000001_000000.parquet"]
    items, dropped = tmp_path / "items.jsonl", tmp_path / "dropped.jsonl"
    export = export_outputs(work, {"item": items, "dropped": dropped}, memory_bytes=memory_bytes)
    assert read_jsonl(items) == [{"id": "b"}, {"id": "c"}] and read_jsonl(dropped) == [{"id": "a"}]
    assert export.duplicates == 1 and export.ids == {"a", "b", "c"} and export.counts == {"item": 2, "dropped": 1}


def test_engine_settings_fail_at_start_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="unknown ray option"):
        RayEngineConfig.from_mapping({"wrokers": 2})
    with pytest.raises(ValueError, match="ray.num_cpus=3 is too few"):
        RayEngineConfig(workers=2, num_cpus=3)
    assert RayEngineConfig(workers=1).local_cpus_needed() == 4 and RayEngineConfig(workers=4).local_cpus_needed() == 7
    corpus = _corpus(tmp_path / "c.jsonl", 3)
    with pytest.raises(ValueError, match="engine must be one of"):
        RampConfig(corpus=corpus, out=tmp_path / "o.jsonl", engine="spark")


# ---------------------------------------------------------------------------------------- cot and selfevolve
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic corpus, its QA questions and RAMP items, a BM25 index behind our retrieval server."""
    from masksearch_rl.retrieval.index import build_index, load_index
    from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
    from masksearch_rl.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("ray-world")
    write_synthetic_corpus(root, num_passages=120, num_questions=8, seed=3, hops=(1, 2), progress=False)
    generate_ramp(RampConfig(corpus=root / "corpus.jsonl", out=root / "ramp.jsonl", limit=10, progress=False))
    retriever = load_index(build_index(root / "corpus.jsonl", root / "index", kind="bm25", show_progress=False))
    with running_server(create_app(retriever, ServerConfig(max_topk=10))) as url:
        yield {"root": root, "questions": read_jsonl(root / "questions.jsonl"),
               "ramp": read_jsonl(root / "ramp.jsonl"), "url": url}


def test_cot_build_on_ray_retries_unparseable_and_failed_tasks_on_the_next_run(tmp_path, world):
    from masksearch_rl.cot.pipeline import CotConfig, run_cot
    from masksearch_rl.cot.scripted import ScriptedServer
    from masksearch_rl.jsonl import write_jsonl

    tasks = world["questions"] + world["ramp"]
    path = tmp_path / "tasks.jsonl"
    write_jsonl(path, tasks)
    with ScriptedServer(tasks) as server:
        garbage, refused = str(world["questions"][0]["id"]), str(world["ramp"][0]["id"])
        server.behaviour.update({garbage: "garbage", refused: "429"})
        llm = {"default": {"base_url": server.base_url, "model": "scripted", "api_key_env": "RAY_TEST_KEY",
                           "timeout_s": 5.0, "max_retries": 1, "concurrency": 4}}
        config = CotConfig(input=str(path), out=str(tmp_path / "traj.jsonl"), llm=llm, progress=False,
                           search={"backend": {"type": "server", "url": world["url"]}, "topk": 3},
                           engine="ray", ray={**RAY, "batch_size": 4, "rows_per_file": 4})
        first = run_cot(config)
        assert (first["run"]["parse_errors"], first["run"]["backend_errors"]) == (1, 1)
        assert first["run"]["correct"] == first["file"]["records"] == len(tasks) - 2
        errors = {e["id"]: e["kind"] for e in read_jsonl(tmp_path / "traj.jsonl.errors.jsonl")}
        assert errors == {garbage: "parse_error", refused: "backend"} and first["errors_pending"] == 2
        assert first["llm"]["llm_calls"] > 0 and first["ray"]["endpoint_budget"][server.base_url]["max_in_flight"] <= 4

        server.behaviour.clear()
        second = run_cot(config)
    records = read_jsonl(tmp_path / "traj.jsonl")
    assert [r["id"] for r in records] == sorted(str(t["id"]) for t in tasks)
    assert all(r["status"] == "correct" for r in records) and second["run"]["skipped_done"] == len(tasks) - 2
    assert second["errors_pending"] == 0 and read_jsonl(tmp_path / "traj.jsonl.errors.jsonl") == []


def test_a_selfevolve_iteration_on_ray_writes_what_the_asyncio_engine_writes(tmp_path, world):
    from masksearch_rl.cot.scripted import ScriptedServer
    from masksearch_rl.selfevolve.iteration import IterationConfig, run_iteration

    items = world["ramp"]
    with ScriptedServer(items) as server:
        server.behaviour[str(items[1]["id"])] = "wrong"
        endpoint = {"base_url": server.base_url, "model": "teacher", "api_key_env": "RAY_TEST_KEY", "timeout_s": 5,
                    "max_retries": 1}

        def iterate(work: str, engine: str) -> dict:
            return run_iteration(IterationConfig(
                iteration=1, items=str(world["root"] / "ramp.jsonl"), work_dir=str(tmp_path / work), teacher=endpoint,
                judge=endpoint, num_items=6, progress=False, val_fraction=0.0, engine=engine,
                ray={**RAY, "batch_size": 3, "rows_per_file": 3},
                search={"backend": {"type": "server", "url": world["url"]}, "topk": 3}))

        on_ray, on_asyncio = iterate("ray", "ray"), iterate("asyncio", "asyncio")
    assert on_ray["teacher"] == on_asyncio["teacher"] and on_ray["teacher"]["judged_wrong"] == 1
    assert on_ray["merge"] == on_asyncio["merge"] and on_ray["sft"] == on_asyncio["sft"]
    assert on_ray["engine"]["engine"] == "ray" and on_ray["run"]["records"] == 6

    def statuses(work: str) -> dict:
        return {r["id"]: (r["status"], r["keep"]) for r in read_jsonl(tmp_path / work / "iter_1" / "teacher.jsonl")}

    assert statuses("ray") == statuses("asyncio")
    teacher = read_jsonl(tmp_path / "ray" / "iter_1" / "teacher.jsonl")
    assert [r["id"] for r in teacher] == sorted(r["id"] for r in teacher)


# ------------------------------------------------------------------------------------------- command line
def test_cli_generates_on_ray_and_logs_progress_to_wandb(tmp_path, reference, wandb_history):
    import typer
    from typer.testing import CliRunner

    from masksearch_rl.ramp.cli import register

    corpus, expected = reference
    app = typer.Typer()
    register(app)
    out = tmp_path / "items.jsonl"
    result = CliRunner().invoke(app, ["ramp", "generate", "--corpus", str(corpus), "--out", str(out), "--seed", "3",
                                      "--engine", "ray", "--ray-workers", "2", "--ray-batch-size", "25",
                                      "--no-progress", "--wandb-project", "t", "--wandb-mode", "offline",
                                      "--wandb-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items_this_run"] + report["dropped_this_run"] == 300
    assert "[ramp/ray done] 300 done" in result.stderr
    _assert_same_as_reference(out, expected)
    logged = {key for row in wandb_history(tmp_path).values() for key in row}
    assert {"ray/done", "ray/items_per_s", "ray/tokens_per_s", "ray/failed"} <= logged


def test_the_cluster_launcher_submits_the_command_with_the_ray_engine():
    def dry_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "recipes" / "launch" / "ray_data_submit.sh"), *args],
                              capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
                                   "RAY_ADDRESS": "http://10.0.0.5:8265", "WANDB_MODE": "offline"})

    import shlex

    result = dry_run("cot", "build", "--input", "/shared/in.jsonl", "--out", "/shared/out.jsonl", "ray.workers=8")
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout)
    assert cmd[:3] == ["ray", "job", "submit"] and "--address=http://10.0.0.5:8265" in cmd
    assert cmd[cmd.index("--") + 1:] == [sys.executable, "-m", "masksearch_rl.cli", "cot", "build", "--engine", "ray",
                                         "--input", "/shared/in.jsonl", "--out", "/shared/out.jsonl", "ray.workers=8"]
    env = json.loads(next(a for a in cmd if a.startswith("--runtime-env-json="))[len("--runtime-env-json="):])
    assert env["env_vars"]["WANDB_MODE"] == "offline"
    assert dry_run("eval", "run").returncode == 2 and dry_run("ramp", "generate", "--engine", "asyncio").returncode == 2
