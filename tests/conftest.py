"""Fixtures: real Coalesce servers (in-process or as a `coalesce serve` process) and a
real Triton server, all on free loopback ports."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from coalesce import config as config_module
from coalesce.server import Server

from tests.support.coalesce import Process

ROOT = Path(__file__).resolve().parents[1]


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
