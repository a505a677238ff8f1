"""What the pipeline tests of every broker share: requests as messages, the check that a
result answers its own request, and the sidecar's /readyz and /metrics."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np

from tests.client import affine_expected
from tests.support.coalesce import Process


def rows(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 4) / 7


def request_body(x: np.ndarray, request_id: str) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"id": request_id, "inputs": [tensor]}).encode()


def messages(count: int) -> tuple[list[tuple[str, bytes]], dict[str, np.ndarray]]:
    """`count` one-row requests as (key, KServe JSON body), and each key's input."""
    xs = rows(count)
    keyed = {f"r{i}": xs[i : i + 1] for i in range(count)}
    return [(k, request_body(x, k)) for k, x in keyed.items()], keyed


def check_answer(
    key: str, headers: dict[str, bytes], value: bytes, x_of: dict[str, np.ndarray], inbox: str
) -> str:
    """A result answers its own request: its headers, where it came from, value by value."""
    assert headers["trace"] == key.encode()
    assert headers["coalesce-request-id"] == key.encode()
    assert headers["coalesce-source"].startswith(f"{inbox}/".encode())
    answer = json.loads(value)
    assert answer["id"] == key and answer["model_name"] == "affine"
    outputs = {
        o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"])
        for o in answer["outputs"]
    }
    expected = affine_expected(x_of[key])
    np.testing.assert_allclose(outputs["y"], expected["y"], rtol=1e-6)
    np.testing.assert_allclose(outputs["s"], expected["s"], rtol=1e-5)
    return key


def bursts(arrivals: list[float], gap: float = 0.04) -> list[int]:
    """How many results arrived together: the sizes of the groups of `arrivals` (times,
    in order) that no pause longer than `gap` seconds separates."""
    sizes = [1] if arrivals else []
    for before, after in itertools.pairwise(arrivals):
        if after - before > gap:
            sizes.append(0)
        sizes[-1] += 1
    return sizes


ORDERING_BATCH = 4  # rows per batch in the ordering tests (their backend's max_batch_size)
ORDERING_DELAY_MS = 150  # a batch's time in them: batches of one fetch end that far apart


def check_ordering(ordering: str, keys: list, expected: list, arrivals: list[float]) -> None:
    """The ordering tests' verdict on a backlog of one-row requests (`keys` answered, in
    the order they arrived, at `arrivals`): as_ready publishes each batch as it is
    answered, input a whole fetch at once and in input order."""
    assert sorted(keys) == sorted(expected), "each request answered once"
    groups = bursts(arrivals)
    if ordering == "as_ready":
        assert max(groups) <= 2 * ORDERING_BATCH, groups
    else:
        assert max(groups) >= 16, groups
        assert keys == expected, "in input order"


def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def readyz(proxy: Process) -> dict:
    try:
        with urllib.request.urlopen(f"http://{proxy.admin}/readyz", timeout=5) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        return json.load(error)


def metrics(proxy: Process) -> str:
    with urllib.request.urlopen(f"http://{proxy.admin}/metrics", timeout=5) as answer:
        return answer.read().decode()


def prometheus(proxy: Process, sample: str) -> float:
    """One sample's value from /metrics."""
    for line in metrics(proxy).splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {sample} in /metrics")


def batch_totals(proxy: Process, backend: str) -> tuple[float, float]:
    """(backend calls, rows in them) from the Prometheus histogram coalesce_batch_size."""
    found = {}
    for line in metrics(proxy).splitlines():
        for suffix in ("count", "sum"):
            if line.startswith(f'coalesce_batch_size_{suffix}{{backend="{backend}"}}'):
                found[suffix] = float(line.rsplit(" ", 1)[1])
    return found["count"], found["sum"]


def reload(proxy: Process, data: dict) -> None:
    """Rewrite the sidecar's config with `data` merged in and POST /reload."""
    import yaml

    current = yaml.safe_load(proxy.config.read_text())
    proxy.config.write_text(yaml.safe_dump({**current, **data}))
    request = urllib.request.Request(f"http://{proxy.admin}/reload", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


def health(proxy: Process, service: str) -> str:
    """grpc.health.v1 Check of `service` on the sidecar's gRPC port: the status's name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(proxy.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@contextlib.contextmanager
def grpc_caller(proxy: Process, model: str = "affine") -> Iterator[list[int]]:
    """A request/reply client calling `model` over gRPC on a thread while the block runs
    (the pipeline's route, to show both share its batcher); yields its answers' count as
    a list that grows."""
    import tritonclient.grpc as tc

    from tests.client import inputs

    stop = threading.Event()
    answers: list[int] = []

    def call() -> None:
        with tc.InferenceServerClient(proxy.url) as client:
            while not stop.is_set():
                x = rows(1) + len(answers)
                y = client.infer(model, inputs(x=x)).as_numpy("y")
                np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
                answers.append(1)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join()


def affine_pipeline(source: dict, delay_ms: float = 0.0, **fields) -> dict:
    """A config routing `affine` (tests.models, `delay_ms` per batch) and one pipeline,
    `scores`, from `source` to the outbox `results`, rejected messages to `rejected`."""
    model = {"type": "local", "model": "tests.models:affine", "args": {"delay_ms": delay_ms}}
    return {
        "backends": {"affine": model},
        "routes": [{"model": "affine", "backend": "affine"}],
        "pipelines": {
            "scores": {
                "source": source,
                "route": "affine",
                "sink": {"topic": "results"},
                "dead_letter": {"topic": "rejected"},
                **fields,
            }
        },
    }


def bad_messages() -> list[tuple[str, bytes]]:
    """Messages that cannot succeed: not JSON, a tensor the model lacks, a string
    among the numbers of a body shaped as the good ones (so read with theirs, by
    rest.Known.join, and refused alone), and a NaN the model rejects (its
    INVALID_ARGUMENT)."""
    text = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5, "a", 1, 2]}
    return [
        ("not-json", b"{nope"),
        ("text-value", json.dumps({"id": "text-value", "inputs": [text]}).encode()),
        ("wrong-tensor", request_body(rows(1), "wrong-tensor").replace(b'"x"', b'"z"')),
        ("nan", request_body(np.full((1, 4), np.nan, dtype=np.float32), "nan")),
    ]
