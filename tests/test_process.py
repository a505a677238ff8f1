"""`coalesce serve` as a user runs it: the no-config quick start and graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from coalesce.example_model import load as load_example
from coalesce.ops import blas
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.conftest import local_backend
from tests.support.coalesce import ROOT, free_port


def test_quick_start_serves_the_bundled_model_with_no_config():
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coalesce.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{admin}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"127.0.0.1:{port}"
        with tc.InferenceServerClient(url) as client:
            for _ in range(100):
                try:
                    if client.is_server_ready():
                        break
                except InferenceServerException:
                    time.sleep(0.1)
            x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
            result = client.infer("example", inputs(x=x)).as_numpy("probabilities")
        np.testing.assert_allclose(result, load_example()({"x": x})["probabilities"], rtol=1e-6)
        np.testing.assert_allclose(result.sum(axis=1), 1, rtol=1e-6)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as answer:
            assert json.load(answer) == {"ready": True, "backends": {"example": True}}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "serving example on 127.0.0.1" in out


def test_sigterm_lets_queued_and_in_flight_requests_finish(coalesce_process):
    proxy = coalesce_process(
        {
            "backends": {
                "slow": local_backend(
                    "affine", args={"delay_ms": 300}, batching={"max_batch_size": 4}
                )
            },
            "routes": [{"model": "slow", "backend": "slow"}],
        }
    )
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def call(i: int) -> None:
        x = np.full((1, 4), i, dtype=np.float32)
        try:
            with tc.InferenceServerClient(proxy.url) as client:
                results[i] = client.infer("slow", inputs(x=x)).as_numpy("y")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # all 12 sent: one batch in flight, the rest queued (4 rows per batch)
    proxy.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    assert proxy.proc.wait(20) == 0
    assert not errors, errors
    assert sorted(results) == list(range(12))
    for i, y in results.items():
        np.testing.assert_array_equal(y, np.full((1, 4), 2 * i + 1))
    assert "stopping: in-flight requests have 10.0 s to finish" in proxy.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_idle_server_exits_0_on_a_signal(coalesce_process, sig):
    proxy = coalesce_process(
        {"backends": {"a": local_backend("affine")}, "routes": [{"model": "a", "backend": "a"}]}
    )
    proxy.proc.send_signal(sig)
    assert proxy.proc.wait(20) == 0
    assert "stopped" in proxy.output()


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_busy_port_is_one_clean_line_and_exit_1(taken):
    """Another process holds the port: `serve` says so in one line, no traceback."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = f"127.0.0.1:{holder.getsockname()[1]}"
    ports = {"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"}
    ports[taken] = busy
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "coalesce.cli",
                "serve",
                "--listen",
                ports["listen"],
                "--admin",
                ports["admin"],
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and busy.rpartition(":")[2] in errors[0]
    assert "Traceback" not in done.stderr


def _blas_threads_served(tmp_path, env: dict) -> int:
    from tests.support.coalesce import Process

    data = {
        "backends": {"blas": local_backend("blas_threads")},
        "routes": [{"model": "blas", "backend": "blas"}],
    }
    proxy = Process(data, tmp_path, env=env)
    try:
        x = np.ones((1, 4), dtype=np.float32)
        with tc.InferenceServerClient(proxy.url) as client:
            return int(client.infer("blas", inputs(x=x)).as_numpy("y")[0, 0])
    finally:
        proxy.terminate()


def _blas_threads_bare(env: dict) -> int:
    """What OpenBLAS starts with in a plain Python process under `env`."""
    code = "from coalesce.ops import blas; print(blas.threads())"
    environ = {k: v for k, v in os.environ.items() if k not in blas.CHOSEN_BY}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True
    )
    return int(done.stdout.strip())


def test_local_models_run_with_one_blas_thread_unless_the_operator_chose(tmp_path, monkeypatch):
    """OpenBLAS's spinning threads would take the event loop's CPU (coalesce.ops.blas)."""
    for name in blas.CHOSEN_BY:
        monkeypatch.delenv(name, raising=False)
    print(f"\nOpenBLAS alone starts {_blas_threads_bare({})} threads here")
    assert _blas_threads_served(tmp_path, {}) == 1
    chosen = {"OPENBLAS_NUM_THREADS": "2"}
    assert _blas_threads_served(tmp_path, chosen) == _blas_threads_bare(chosen) == 2
