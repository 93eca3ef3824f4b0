"""``serve --workers N``: N retrieval server processes on one port, kept alive by a supervisor.

Why processes: one Python process answers only so many HTTP requests a second whatever the index costs; N processes
behind one SO_REUSEPORT port (the kernel spreads connections over them) scale that with the cores, while the
memory-mapped index is shared through the page cache. The supervisor holds the port (bound, not listening) so a
clash fails fast, starts the workers, lets them listen only once every one is warm, and restarts a worker that dies
(``kill -9``, out of memory): the others keep answering meanwhile, and the new one listens once it is warm. A worker
that keeps dying (``max_restarts`` within ``restart_window_s``) stops the service with exit code 1 instead of
looping. SIGINT/SIGTERM stop every worker gracefully (each answers what it holds, then exits).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
from collections import deque
from typing import Any

from masksearch_rl.retrieval.server import ServerConfig

logger = logging.getLogger(__name__)

_WORKER_STOP_CODES = (0, -signal.SIGTERM, -signal.SIGINT)


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_main(index_dir: str, config: ServerConfig, host: str, port: int, threads: int, number: int,
                 ready: Any, go: Any) -> None:
    """One worker: load and warm up the index, bind the shared port, report ready, wait for the go, serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops workers (SIGTERM), also on Ctrl-C
    os.environ["NUMBA_NUM_THREADS"] = str(threads)  # before numba loads: no pool of all the machine's cores each
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bm25s probes JAX at import: never grab GPU memory per worker
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker{number} %(name)s: %(message)s")
    from masksearch_rl.retrieval.index import load_index, read_manifest
    from masksearch_rl.retrieval.server import create_app, freeze_loaded_objects, serve_app

    try:
        kind = read_manifest(index_dir)["kind"]
        retriever = load_index(index_dir, **({"n_threads": threads} if kind in ("bm25", "hybrid") else {}))
        retriever.search(["warm up"], 1)  # compile kernels, touch the index pages before taking connections
        app = create_app(retriever, config)
        sock = reuseport_socket(host, port)
        freeze_loaded_objects()
    except BaseException as err:
        ready.put((number, os.getpid(), f"{type(err).__name__}: {err}"))
        raise
    ready.put((number, os.getpid(), None))
    if go is not None:
        go.wait()
    serve_app(app, sock=sock, stop_signals=(signal.SIGTERM,))  # Ctrl-C reaches the supervisor, which stops us


def default_workers() -> int:
    """One worker per usable core, at most 16."""
    return max(1, min(16, _usable_cores()))


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def serve_workers(index_dir: str | os.PathLike, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
                  workers: int = 2, threads_per_worker: int | None = None, startup_timeout_s: float = 600.0,
                  max_restarts: int = 5, restart_window_s: float = 60.0) -> int:
    """Serve ``index_dir`` from ``workers`` processes on one port until SIGINT/SIGTERM; returns an exit code."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("serving with several workers needs SO_REUSEPORT (Linux)")
    threads = threads_per_worker or max(1, _usable_cores() // workers)
    holder = reuseport_socket(host, port)  # reserves the port (and picks one when port is 0)
    port = holder.getsockname()[1]
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    ready, go = context.Queue(), context.Event()

    def spawn(number: int, wait_for_go: bool) -> Any:
        proc = context.Process(target=_worker_main, name=f"retrieval-worker-{number}", daemon=False,
                               args=(str(index_dir), config, host, port, threads, number, ready,
                                     go if wait_for_go else None))
        proc.start()
        return proc

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[Any] = []
    code = 0
    try:
        procs = [spawn(i, wait_for_go=True) for i in range(workers)]
        code = _await_ready(procs, ready, stop, startup_timeout_s)
        if code == 0 and not stop.is_set():
            go.set()
            logger.info("%d workers (%d kernel threads each) serving http://%s:%d", workers, threads, host, port)
            code = _supervise(procs, spawn, ready, stop, max_restarts, restart_window_s)
    finally:
        _stop_workers(procs)
        holder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0 and any(proc.exitcode not in _WORKER_STOP_CODES for proc in procs):
        code = 1
    logger.info("all %d workers stopped (exit codes %s)", workers, [proc.exitcode for proc in procs])
    return code


def _supervise(procs: list, spawn, ready: Any, stop: threading.Event, max_restarts: int,
               restart_window_s: float) -> int:
    """Replace workers that die until a stop signal; 1 when one dies too often."""
    restarts: deque[float] = deque()
    while not stop.is_set():
        for number, proc in enumerate(procs):
            if proc.exitcode is None or stop.is_set():
                continue
            now = time.monotonic()
            while restarts and now - restarts[0] > restart_window_s:
                restarts.popleft()
            if len(restarts) >= max_restarts:
                logger.error("worker %s exited with code %s, the %dth exit within %.0fs: stopping", proc.name,
                             proc.exitcode, len(restarts) + 1, restart_window_s)
                return 1
            restarts.append(now)
            logger.warning("worker %s (pid %s) exited with code %s: starting a replacement", proc.name, proc.pid,
                           proc.exitcode)
            procs[number] = spawn(number, wait_for_go=False)
        try:  # a replacement's readiness report (or its failure) arrives here
            number, pid, error = ready.get_nowait()
            if error is None:
                logger.info("worker %d (pid %d) ready", number, pid)
            else:
                logger.error("worker %d (pid %d) failed to start: %s", number, pid, error)
        except queue.Empty:
            pass
        multiprocessing.connection.wait([proc.sentinel for proc in procs], timeout=0.5)
    return 0


def _await_ready(procs: list, ready: Any, stop: threading.Event, timeout_s: float) -> int:
    """0 once every worker reported ready; 1 if one failed, died or the wait timed out (or on a stop signal)."""
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout_s
    while pending and not stop.is_set():
        try:
            number, pid, error = ready.get(timeout=0.5)
        except queue.Empty:
            dead = [procs[i] for i in pending if procs[i].exitcode is not None]
            if dead:
                logger.error("worker %s exited with code %s while starting", dead[0].name, dead[0].exitcode)
                return 1
            if time.monotonic() > deadline:
                logger.error("workers %s not ready after %.0fs", sorted(pending), timeout_s)
                return 1
            continue
        if error is not None:
            logger.error("worker %d (pid %d) failed to start: %s", number, pid, error)
            return 1
        pending.discard(number)
        logger.info("worker %d (pid %d) ready", number, pid)
    return 0


def _stop_workers(procs: list, timeout_s: float = 30.0) -> None:
    """SIGTERM every live worker (graceful: in-flight requests are answered), then wait; kill stragglers."""
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                logger.warning("worker %s did not stop in %.0fs: killing it", proc.name, timeout_s)
                proc.kill()
                proc.join()
