"""A real Redis for the pipeline tests: Debian's redis-server on a free loopback port,
its data in a fresh directory (append-only file, so a stop and start keeps the streams)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.coalesce import free_port


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data = Path(tempfile.mkdtemp(prefix="coalesce-redis-"))
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: make brokers (Debian's redis-server)"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=(self.data / "log").open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        client = self.client()
        end = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except Exception:
                assert self.process.poll() is None, (self.data / "log").read_text()
                assert time.monotonic() < end, "redis-server did not answer"
                time.sleep(0.05)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: redis flushes its append-only file and exits
        self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data, ignore_errors=True)
