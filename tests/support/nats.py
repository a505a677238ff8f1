"""A real NATS server with JetStream for the pipeline tests: Debian's nats-server on a
free loopback port, its store in a fresh directory (file storage, so a stop and start
keeps the streams and the consumers' state), and nats-py, the official client, on the
test side, as a team's producer and reader would use it."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from tests.support.coalesce import free_port

T = TypeVar("T")


class NatsServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="coalesce-nats-"))
        self.log = self.data / "log"
        self.start()

    def start(self) -> None:
        binary = shutil.which("nats-server")
        assert binary, "nats-server is not installed: make brokers (Debian's nats-server)"
        self.process = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.data)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < end, "nats-server did not listen"
                time.sleep(0.05)
        self.run(self._jetstream_ready)  # JetStream recovers its store after listening

    async def _jetstream_ready(self, js) -> None:
        end = time.monotonic() + 20
        while True:
            try:
                await js.account_info()
                return
            except Exception:
                assert time.monotonic() < end, "JetStream did not answer"
                await asyncio.sleep(0.05)

    def run(self, work: Callable[..., Awaitable[T]]) -> T:
        """`work(js)` on a fresh connection (the tests are synchronous)."""
        import nats

        async def main() -> T:
            nc = await nats.connect(self.url, max_reconnect_attempts=0)
            try:
                return await work(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(main())

    def add_streams(self, **streams: str) -> None:
        """Streams by name -> the one subject each captures (file storage)."""

        async def add(js) -> None:
            for name, subject in streams.items():
                await js.add_stream(name=name, subjects=[subject])

        self.run(add)

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: nats-server syncs its store and exits
        self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data, ignore_errors=True)
