"""`type: python`: models in worker processes, through real `coalesce serve` processes.

Workers are found from outside, as an operator would: the sidecar's child
processes in /proc. The models (tests/python_models.py) answer with their pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.client import affine_expected, inputs
from tests.python_models import POISON

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def python_backend(model: str, **fields) -> dict:
    return {"type": "python", "model": f"tests.python_models:{model}", **fields}


def one_backend(backend: dict, name: str = "m") -> dict:
    return {"backends": {name: backend}, "routes": [{"model": name, "backend": name}]}


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat and stat[1] == str(pid) and stat[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """[state, ppid, ...] from /proc/<pid>/stat, or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def row(value: float) -> np.ndarray:
    return np.array([[value, value + 1, value + 2, value + 3]], dtype=np.float32)


def infer(url: str, x: np.ndarray, model: str = "m") -> dict[str, np.ndarray]:
    with tc.InferenceServerClient(url) as client:
        result = client.infer(model, inputs(x=x), client_timeout=30)
        return {name: result.as_numpy(name) for name in ("y", "s", "pid")}


def health(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_concurrent_distinct_requests_are_answered_right_by_every_worker(coalesce_process):
    proxy = coalesce_process(
        one_backend(
            python_backend(
                "affine", args={"delay_ms": 5}, processes=2, batching={"max_batch_size": 4}
            )
        )
    )
    workers = children(proxy.proc.pid)
    assert len(workers) == 2

    def call(i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = np.arange(4 * (i % 3 + 1), dtype=np.float32).reshape(-1, 4) + 1000 * i
        return x, infer(proxy.url, x)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(400)))
    seen = set()
    for x, answer in results:
        expected = affine_expected(x)
        np.testing.assert_array_equal(answer["y"], expected["y"])
        np.testing.assert_array_equal(answer["s"], expected["s"])
        seen.update(answer["pid"].ravel().tolist())
    assert seen == workers  # both workers served, and nothing else did


def test_a_worker_that_exits_is_replaced_and_its_batch_retried_once(coalesce_process):
    proxy = coalesce_process(
        one_backend(python_backend("exiting", processes=2, batching={"max_batch_size": 1}))
    )
    before = children(proxy.proc.pid)
    stop = threading.Event()
    good: list[int] = []

    def steady_traffic() -> None:  # keeps calling while workers die under it
        i = 0
        while not stop.is_set():
            x = row(i)
            np.testing.assert_array_equal(infer(proxy.url, x)["y"], 2 * x + 1)
            good.append(i)
            i += 1

    with ThreadPoolExecutor(3) as pool:
        traffic = [pool.submit(steady_traffic) for _ in range(3)]
        time.sleep(0.3)
        with pytest.raises(InferenceServerException) as info:
            infer(proxy.url, row(POISON))
        time.sleep(0.3)
        stop.set()
        for future in traffic:
            future.result()  # no good request failed
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "lost two workers" in info.value.message()
    assert "exited with code 3" in info.value.message()
    assert len(good) > 10
    wait_for(lambda: len(children(proxy.proc.pid)) == 2)
    after = children(proxy.proc.pid)
    assert not before & after  # both workers that ran the poison were replaced
    assert set(infer(proxy.url, row(5))["pid"].ravel()) <= after
    log = proxy.output()
    assert "retrying its batch on another worker" in log
    assert "answering its batch UNAVAILABLE" in log


def test_a_hung_worker_is_killed_and_replaced_while_others_serve(coalesce_process):
    proxy = coalesce_process(
        one_backend(
            python_backend(
                "hanging", processes=2, hang_timeout_ms=700, batching={"max_batch_size": 1}
            )
        )
    )
    before = children(proxy.proc.pid)
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        poisoned = pool.submit(infer, proxy.url, row(POISON))
        time.sleep(0.2)  # the poison holds one worker: the other still answers
        for i in range(5):
            assert infer(proxy.url, row(i))["pid"][0, 0] in before
        with pytest.raises(InferenceServerException) as info:
            poisoned.result()
        elapsed = time.monotonic() - start
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert "held a batch for more than 700 ms" in info.value.message()
    assert 1.4 <= elapsed < 10  # two workers, each given 700 ms
    assert not any(alive(pid) for pid in before)
    wait_for(lambda: len(children(proxy.proc.pid)) == 2)
    np.testing.assert_array_equal(infer(proxy.url, row(1))["y"], 2 * row(1) + 1)


def test_kill_9_of_the_sidecar_leaves_no_worker_behind(coalesce_process):
    proxy = coalesce_process(
        one_backend(python_backend("affine", args={"delay_ms": 20_000}, processes=2))
    )
    workers = children(proxy.proc.pid)
    assert len(workers) == 2
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(infer, proxy.url, row(1))  # one worker mid-batch, one idle
        time.sleep(0.5)
        os.kill(proxy.proc.pid, signal.SIGKILL)
        proxy.proc.wait()
        with pytest.raises(InferenceServerException):
            busy.result()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=5)


def test_sigterm_stops_the_workers_with_the_sidecar(coalesce_process):
    proxy = coalesce_process(one_backend(python_backend("affine", processes=2)))
    workers = children(proxy.proc.pid)
    assert proxy.terminate() == 0
    assert not any(alive(pid) for pid in workers)


def test_a_model_that_cannot_import_is_reported_and_not_serving(coalesce_process):
    proxy = coalesce_process(
        {
            "backends": {
                "broken": python_backend("missing_dependency", processes=2),
                "no_python": python_backend("affine", python="/nonexistent/bin/python"),
                "good": python_backend("affine", processes=1),
            },
            "routes": [
                {"model": "broken", "backend": "broken"},
                {"model": "no_python", "backend": "no_python"},
                {"model": "good", "backend": "good"},
            ],
        }
    )
    last_line = "ModuleNotFoundError: No module named 'coalesce_no_such_package'"
    log = proxy.output()
    assert f"backend broken: 2 of 2 workers failed to start: {last_line}" in log
    assert "in missing_dependency" in log  # the whole traceback follows
    assert "cannot run /nonexistent/bin/python: No such file or directory" in log
    assert health(proxy.url, "broken") == NOT_SERVING
    assert health(proxy.url, "no_python") == NOT_SERVING
    wait_for(lambda: health(proxy.url, "good") == SERVING)
    with tc.InferenceServerClient(proxy.url) as client:
        assert not client.is_model_ready("broken")
        assert client.is_model_ready("good")
        with pytest.raises(InferenceServerException) as info:
            client.infer("broken", inputs(x=row(1)))
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert last_line in info.value.message()
    np.testing.assert_array_equal(infer(proxy.url, row(1), "good")["y"], 2 * row(1) + 1)


def test_model_errors_keep_the_worker(coalesce_process):
    proxy = coalesce_process(one_backend(python_backend("affine", processes=1)))
    workers = children(proxy.proc.pid)
    with pytest.raises(InferenceServerException) as info:
        infer(proxy.url, np.full((1, 4), np.nan, dtype=np.float32))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "x contains NaN" in info.value.message()
    assert infer(proxy.url, row(1))["pid"][0, 0] in workers


def test_every_datatype_crosses_the_process_boundary(coalesce_process):
    proxy = coalesce_process(one_backend(python_backend("echo", processes=1)))
    arrays = {
        "b": np.array([[True, False]]),
        "i8": np.array([[-128, 127]], dtype=np.int8),
        "u64": np.array([[2**64 - 1, 0]], dtype=np.uint64),
        "f16": np.array([[1.5, -2.25]], dtype=np.float16),
        "f64": np.array([[np.pi, np.e]]),
        "text": np.array([[b"hello", b"\x00bytes\xff"]], dtype=object),
        "big": np.random.default_rng(0).random((2, 600_000)).astype(np.float32)[:1],
    }
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("m", inputs(**arrays))
    for name, array in arrays.items():
        np.testing.assert_array_equal(result.as_numpy(name), array, err_msg=name)


def test_workers_may_run_another_interpreter_with_numpy_1(coalesce_process):
    from tests.support.venv import numpy1_python

    python = numpy1_python()
    proxy = coalesce_process(one_backend(python_backend("versions", python=str(python))))
    x = row(3)
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("m", inputs(x=x))
    version = result.as_numpy("version")[0, 0].decode()
    assert version == f"1.26.4 {python}"
    assert np.__version__.startswith("2.")
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)


@pytest.mark.parametrize("chosen", [None, "3"])
def test_workers_get_one_math_thread_unless_the_operator_chose(
    coalesce_process, monkeypatch, chosen
):
    from coalesce.adapters.python_process import THREAD_VARIABLES

    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if chosen:
        monkeypatch.setenv("OMP_NUM_THREADS", chosen)
    backends = {
        variable: python_backend("environment", args={"name": variable}, processes=1)
        for variable in THREAD_VARIABLES
    }
    routes = [{"model": variable, "backend": variable} for variable in THREAD_VARIABLES]
    proxy = coalesce_process({"backends": backends, "routes": routes})
    seen = {}
    with tc.InferenceServerClient(proxy.url) as client:
        for variable in THREAD_VARIABLES:
            result = client.infer(variable, inputs(x=row(1)))
            seen[variable] = result.as_numpy("value")[0, 0].decode()
    expected = dict.fromkeys(THREAD_VARIABLES, "1")
    if chosen:
        expected["OMP_NUM_THREADS"] = chosen
    assert seen == expected


def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_batch(coalesce_process):
    proxy = coalesce_process(one_backend(python_backend("affine", processes=2)))
    before = children(proxy.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(proxy.proc.pid) - {victim}) == 2)
    for i in range(20):
        np.testing.assert_array_equal(infer(proxy.url, row(i))["y"], 2 * row(i) + 1)
    log = proxy.output()
    assert f"idle worker {victim} was killed by SIGKILL" in log
    assert "retrying" not in log  # noticed at once, not by a batch sent to a dead worker
