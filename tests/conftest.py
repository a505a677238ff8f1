"""Fixtures: real Coalesce servers (in-process or as a `coalesce serve` process) and a
real Triton server, all on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from coalesce import config as config_module
from coalesce.server import Server

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_backend(model: str, **fields: Any) -> dict:
    return {"type": "local", "model": f"tests.models:{model}", **fields}


@contextlib.asynccontextmanager
async def running(data: dict) -> AsyncIterator[Server]:
    """An in-process server for `data` (a config mapping) on a free port, admin off."""
    data = {"listen": "127.0.0.1:0", "admin": None, **data}
    server = Server(config_module.parse(data))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)


def model_of(server: Server, backend: str) -> Any:
    """The live model object behind a local backend, to read what it saw."""
    return server.router.backends[backend].adapter.model


class Process:
    """`coalesce serve --config` as a real process, as a user would run it."""

    def __init__(self, data: dict, tmp: Path) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        data = {"listen": f"127.0.0.1:{self.port}", "admin": f"127.0.0.1:{self.admin_port}", **data}
        self.config = tmp / f"coalesce-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.log = tmp / f"coalesce-{self.port}.log"
        self.url = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coalesce.cli", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        self._wait_serving()

    def _wait_serving(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.url) as channel:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"coalesce exited {self.proc.returncode}:\n{self.output()}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    continue
        raise RuntimeError(f"coalesce did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def coalesce_process(tmp_path: Path) -> Iterator:
    """Factory: start `coalesce serve` processes; all are stopped at the end."""
    started: list[Process] = []

    def start(data: dict) -> Process:
        started.append(Process(data, tmp_path))
        return started[-1]

    yield start
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.terminate()


@pytest.fixture(scope="session")
def triton() -> Iterator:
    """A real Triton server with the models in tests/triton_models (batching OFF)."""
    from tests.support.triton import TritonServer, ensure_triton

    ensure_triton()
    with TritonServer(ROOT / "tests" / "triton_models") as server:
        yield server
