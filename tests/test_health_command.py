"""`coalesce health`: a grpc.health.v1 client whose exit status probes can use."""

from __future__ import annotations

import subprocess
import sys
import time

from coalesce.ops.health_check import check

from tests.conftest import local_backend
from tests.support.coalesce import ROOT, free_port

ROUTES = {
    "backends": {
        "echo": local_backend("echo"),
        # Nothing listens there: the adapter stays not ready, its route NOT_SERVING.
        "down": {"type": "triton", "target": f"127.0.0.1:{free_port()}", "model": "x"},
    },
    "routes": [{"model": "echo", "backend": "echo"}, {"model": "down", "backend": "down"}],
}


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coalesce.cli", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def wait_serving(address: str, service: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not check(address, service)[0]:
        assert time.monotonic() < end, f"{service!r} never became SERVING"
        time.sleep(0.1)


def test_serving_exits_0_and_other_statuses_exit_1(coalesce_process):
    server = coalesce_process(ROUTES)
    wait_serving(server.url, "echo")
    result = health("--address", server.url)
    assert (result.returncode, result.stdout) == (0, f"{server.url} (server): SERVING\n")
    result = health("--address", server.url, "--service", "echo")
    assert (result.returncode, result.stdout) == (0, f"{server.url} echo: SERVING\n")
    result = health("--address", server.url, "--service", "down")
    assert (result.returncode, result.stdout) == (1, f"{server.url} down: NOT_SERVING\n")
    result = health("--address", server.url, "--service", "ghost")
    assert (result.returncode, result.stdout) == (1, f"{server.url} ghost: SERVICE_UNKNOWN\n")


def test_nothing_listening_fails_at_once():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    serving, text = check(address, timeout=30)
    assert not serving and text.startswith("UNAVAILABLE")
    assert time.monotonic() - start < 2  # a refused connection is not waited on
    result = health("--address", address, "--timeout", "30")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stdout


def test_the_default_address_is_the_config_default():
    from coalesce.cli import build_parser
    from coalesce.config import Config

    args = build_parser().parse_args(["health"])
    assert args.address == Config.model_fields["listen"].default
    assert (args.service, args.timeout) == ("", 2.0)
