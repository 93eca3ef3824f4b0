"""A retrieval server as a child process on a free 127.0.0.1 port: started, awaited until healthy, stopped.

Why: the quickstart and the benchmarks run exactly what a user runs on a cluster (``masksearch-rl serve``, or a
baseline server script) rather than an in-process app, and both need the same start / health-wait / stop dance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(cmd) as server: server.url`` — ``--port`` is appended to ``cmd``."""

    def __init__(self, cmd: list[str], name: str = "retrieval server", log: IO | None = None,
                 cwd: str | Path | None = None, startup_timeout_s: float = 300.0, cpus: set[int] | None = None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*cmd, "--port", str(self.port)]
        self.log = log
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.cpus = cpus  # pin the server (and its workers, which inherit it) to these cores
        self.env = env
        self.proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        """Healthy: ``GET /health`` answers 200, or (a server without one, e.g. Search-R1's) a one-query
        ``POST /retrieve`` does."""
        health = httpx.get(f"{self.url}/health", timeout=2.0)
        if health.status_code == 200:
            return True
        if health.status_code != 404:
            return False
        # return_scores as Search-R1's own client sends it: its server fails (500) on a request without it.
        probe = httpx.post(f"{self.url}/retrieve", json={"queries": ["ready"], "topk": 1, "return_scores": True},
                           timeout=60.0)
        return probe.status_code == 200

    def __enter__(self) -> ServerProcess:
        output = self.log if self.log is not None else subprocess.DEVNULL
        cpus = self.cpus
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=output, stderr=subprocess.STDOUT, preexec_fn=pin,
                                     env=self.env)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                where = f"; see {self.log.name}" if self.log is not None and hasattr(self.log, "name") else ""
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}{where}")
            try:
                if self.ready():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"{self.name} at {self.url} not healthy after {self.startup_timeout_s:.0f}s")

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
