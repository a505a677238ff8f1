"""A Kafka-protocol broker for the pipeline tests: noida-db's bundled binary.

A STAND-IN FOR APACHE KAFKA, which cannot be installed here (no Debian package, Maven
Central unreachable, no Docker). noida-db speaks Kafka's wire protocol, including
idempotent and transactional producers, read_committed and group rebalances, which is
what the tests need; they talk to it with Kafka's own client library (librdkafka, via
confluent-kafka), exactly as they would to Kafka. It is started directly (not through
its Python wrapper, whose PID would leave the binary running) on a free loopback
port with a fresh data directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.coalesce import free_port


def binary() -> Path:
    import noida_db  # the test extra installs it

    return Path(noida_db.__file__).with_name("noida-db")


class Broker:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="coalesce-kafka-"))
        self.log = self.data.with_suffix(".log")
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(binary()),
                    "start",
                    "--only",
                    "kafka",
                    "--host",
                    "127.0.0.1",
                    "--kafka-port",
                    str(self.port),
                    "--data-dir",
                    str(self.data),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"noida-db exited:\n{self.log.read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError(f"noida-db did not listen:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
        self.log.unlink(missing_ok=True)

    def create_topics(self, *names: str, partitions: int = 4) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.address})
        futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        for future in futures.values():
            future.result(30)
