"""`coalesce serve --config` as a real process, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (live or reaped), from /proc."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile: its time is in its parent's reaped-children count
    return total / os.sysconf("SC_CLK_TCK")


class Process:
    """`coalesce serve --config` as a real process, as a user would run it."""

    def __init__(
        self, data: dict, tmp: Path, args: tuple[str, ...] = (), env: dict | None = None
    ) -> None:
        self.port = int(data["listen"].rpartition(":")[2]) if "listen" in data else free_port()
        self.admin_port = free_port()
        data = {"listen": f"127.0.0.1:{self.port}", "admin": f"127.0.0.1:{self.admin_port}", **data}
        self.admin = data["admin"]
        self.http = data.get("http")
        self.config = tmp / f"coalesce-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.log = tmp / f"coalesce-{self.port}.log"
        self.url = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coalesce.cli",
                    "serve",
                    "--config",
                    str(self.config),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        self._wait_serving()

    def _wait_serving(self, timeout: float = 30) -> None:
        """Until the gRPC port (bound once every backend is loaded) and the admin port
        accept connections. Plain sockets: grpc's channel_ready_future leaves a polling
        thread behind that raises once its channel is closed."""
        end = time.monotonic() + timeout
        ports = [self.port, *([self.admin_port] if self.admin else [])]
        ports += [int(self.http.rpartition(":")[2])] if self.http else []
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coalesce exited {self.proc.returncode}:\n{self.output()}")
            try:
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
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
