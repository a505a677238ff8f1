"""One `type: python` worker process seen from the sidecar: start it, send it batches, stop it.

The worker itself is adapters/python_worker.py, run as a script by the backend's
interpreter; the two share the shared-region and framing helpers defined there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from coalesce.config import PythonBackend
from coalesce.core.request import Tensors
from coalesce.errors import Internal, InvalidArgument

from .python_worker import MIN_REGION, Region, end_of, frame

log = logging.getLogger("coalesce")
WORKER_SCRIPT = Path(__file__).with_name("python_worker.py")
STOP_GRACE_S = 2.0


class WorkerLost(Exception):
    """The worker died or hung holding a batch; the batch may run again elsewhere."""


class StartFailed(Exception):
    """A worker could not load the model; the message is the traceback's last line."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


def _shared_file(name: str) -> int:
    """Memory both processes map, with no name to leak: a memfd, or an unlinked file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"coalesce-{name}")
    else:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="coalesce-", dir=folder)
        os.unlink(path)
    os.ftruncate(fd, MIN_REGION)
    return fd


def exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Worker:
    """One worker process: its control socket and its shared region."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        shared: int,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.hello: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._shared = shared
        self._region = Region(shared)

    async def receive(self) -> dict[str, Any]:
        """The worker's next message; WorkerLost (with its exit status) if it died."""
        try:
            head = await self._reader.readexactly(4)
            body = await self._reader.readexactly(int.from_bytes(head, "little"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            try:
                code = await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                code = None
            raise WorkerLost(f"worker {self.pid} {exit_text(code)}") from exc
        message: dict[str, Any] = pickle.loads(body)
        return message

    async def call(self, name: str, inputs: Tensors, hang_s: float) -> Tensors:
        """One batch through the shared region; the model's own errors are raised as ours."""
        layout = self._region.write(inputs, 0)
        self._writer.write(frame({"tensors": layout, "end": end_of(layout)}))
        with contextlib.suppress(ConnectionError):  # receive() reports how the worker died
            await self._writer.drain()
        try:
            async with asyncio.timeout(hang_s):
                reply = await self.receive()
        except TimeoutError:
            self.kill()
            raise WorkerLost(
                f"worker {self.pid} held a batch for more than {hang_s * 1000:.0f} ms "
                "and was killed"
            ) from None
        if not reply["ok"]:
            if reply["invalid"]:
                raise InvalidArgument(f"model '{name}' rejected the batch: {reply['message']}")
            raise Internal(f"model '{name}' failed: {reply['kind']}: {reply['message']}")
        return self._region.read(reply["tensors"], copy=True)

    def kill(self) -> None:
        """SIGKILL (the event loop reaps it) and release this end's resources; idempotent."""
        if self._shared < 0:
            return
        if self.process.returncode is None:
            self.process.kill()
        self._release()

    async def stop(self, grace: float) -> None:
        """Close the control socket (the worker exits on end-of-file); kill after `grace`."""
        self._writer.close()
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            log.warning("worker %d did not stop within %.1f s; killing it", self.pid, grace)
        self.kill()

    def _release(self) -> None:
        self._writer.close()
        if self._shared >= 0:
            os.close(self._shared)
            self._shared = -1


# Variables that size math libraries' thread pools (OpenMP, OpenBLAS, MKL).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_environ(code: str | None = None) -> dict[str, str]:
    """Our environment with one math-library thread per worker, unless the operator chose.

    There is a worker per core already: each sizing its BLAS pool to the core count
    oversubscribes the machine, and OpenBLAS's idle threads spin (measured beside a
    small MLP in Triton's python backend: 1.75 ms of CPU per call with its default
    pool, 0.37 ms with one thread). Ray sets the same default for its workers.
    """
    env = dict(os.environ)
    for variable in THREAD_VARIABLES:
        env.setdefault(variable, "1")
    if code is not None:  # the backend's `code:` directory goes first on sys.path
        path = os.path.abspath(code)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    return env


async def start_worker(
    name: str, config: PythonBackend, lifeline: int, python: str | None = None
) -> Worker:
    """A worker with the model loaded, or StartFailed saying why not; `python` is the
    interpreter of the backend's managed environment, when it has one."""
    python = python or config.python or sys.executable
    ours, theirs = socket.socketpair()
    shared = _shared_file(name)
    fds = (theirs.fileno(), shared, lifeline)
    try:
        process = await asyncio.create_subprocess_exec(
            python,
            str(WORKER_SCRIPT),
            *map(str, fds),
            str(os.getpid()),
            f"backend={name}",  # for ps; the worker ignores it
            pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL,
            env=worker_environ(config.code),
        )
    except OSError as exc:
        ours.close()
        os.close(shared)
        raise StartFailed(f"cannot run {python}: {exc.strerror or exc}") from exc
    finally:
        theirs.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker = Worker(process, reader, writer, shared)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        os.close(shared)
        raise
    try:
        worker.hello = await _handshake(worker, writer, config)
    except BaseException:
        worker.kill()
        raise
    return worker


async def _handshake(
    worker: Worker, writer: asyncio.StreamWriter, config: PythonBackend
) -> dict[str, Any]:
    writer.write(frame({"model": config.model, "args": config.args}))
    try:
        hello = await asyncio.wait_for(worker.receive(), config.start_timeout_s)
    except TimeoutError:
        raise StartFailed(f"did not load the model within {config.start_timeout_s:g} s") from None
    except WorkerLost as exc:
        raise StartFailed(f"{exc} before loading the model") from exc
    if not hello["ok"]:
        raise StartFailed(hello["error"], hello["traceback"])
    return hello
