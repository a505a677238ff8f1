"""System shared memory, Triton's extension, with tritonclient's own shared-memory
helpers (tritonclient.utils.shared_memory) over gRPC and HTTP: inputs read from and
outputs written into /dev/shm regions, bounds checked, hostile regions contained,
and shared-memory requests batched with the others. perf_analyzer's
`--shared-memory system` mode runs unchanged."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.conftest import local_backend, model_of, running

X = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from tests.support.coalesce import Process, free_port

    process = Process(
        {
            "http": f"127.0.0.1:{free_port()}",
            "backends": {"affine": local_backend("affine")},
            "routes": [{"model": "affine", "backend": "affine"}],
        },
        tmp_path_factory.mktemp("shm"),
    )
    yield process
    assert process.terminate() == 0


@pytest.fixture(params=["grpc", "http"])
def client(proxy, request):
    module = tc if request.param == "grpc" else th
    address = proxy.url if request.param == "grpc" else proxy.http
    client = module.InferenceServerClient(address)
    client.module = module
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions():
    """Factory: a fresh /dev/shm region of `size` bytes; all destroyed at the end."""
    made = []

    def make(size: int):
        key = f"/coalesce-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, size)
        made.append(handle)
        return handle, key

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def shm_input(module, name: str, region: str, array: np.ndarray, offset: int = 0):
    tensor = module.InferInput(name, list(array.shape), "FP32")
    tensor.set_shared_memory(region, array.nbytes, offset)
    return tensor


def test_inputs_and_outputs_travel_through_registered_regions(client, regions):
    module = client.module
    inbox, in_key = regions(64 + X.nbytes)
    outbox, out_key = regions(X.nbytes)
    shm.set_shared_memory_region(inbox, [X], offset=64)
    client.register_system_shared_memory("in", in_key, 64 + X.nbytes)
    client.register_system_shared_memory("out", out_key, X.nbytes)
    y = module.InferRequestedOutput("y")
    y.set_shared_memory("out", X.nbytes)
    s = module.InferRequestedOutput("s")  # this one comes back in the answer as usual
    result = client.infer("affine", [shm_input(module, "x", "in", X, 64)], outputs=[y, s])
    written = shm.get_contents_as_numpy(outbox, np.float32, [3, 4])
    np.testing.assert_array_equal(written, 2 * X + 1)
    np.testing.assert_array_equal(result.as_numpy("s"), X.sum(axis=1, keepdims=True))
    output = result.get_output("y")
    params = output.parameters if module is tc else output["parameters"]
    region = params["shared_memory_region"]
    assert (region.string_param if module is tc else region) == "out"


def test_status_lists_the_registered_regions(client, regions):
    _, key = regions(128)
    client.register_system_shared_memory("r1", key, 100, offset=28)
    status = client.get_system_shared_memory_status()
    entries = status.regions if client.module is tc else {e["name"]: e for e in status}
    entry = entries["r1"]
    values = (
        (entry.key, entry.offset, entry.byte_size)
        if client.module is tc
        else (entry["key"], int(entry["offset"]), int(entry["byte_size"]))
    )
    assert values == (key, 28, 100)
    client.unregister_system_shared_memory("r1")
    status = client.get_system_shared_memory_status()
    assert len(status.regions if client.module is tc else status) == 0


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (("big", "KEY", 4096), "is beyond the 128 bytes"),
        (("bad", "/../../etc/passwd", 16), "is not a shared memory key"),
        (("none", "/coalesce-no-such-region", 16), "cannot open shared memory key"),
    ],
    ids=["beyond-the-file", "path-traversal", "missing"],
)
def test_a_bad_registration_names_the_problem(client, regions, register, message):
    _, key = regions(128)
    name, given, size = register
    with pytest.raises(InferenceServerException, match=message):
        client.register_system_shared_memory(name, key if given == "KEY" else given, size)


def test_a_name_registered_twice_is_refused(client, regions):
    _, key = regions(64)
    client.register_system_shared_memory("twice", key, 64)
    with pytest.raises(InferenceServerException, match="already registered"):
        client.register_system_shared_memory("twice", key, 64)


def test_tensors_beyond_their_region_are_invalid_naming_region_and_bound(client, regions):
    module = client.module
    inbox, key = regions(X.nbytes)
    shm.set_shared_memory_region(inbox, [X])
    client.register_system_shared_memory("small", key, X.nbytes)
    with pytest.raises(InferenceServerException, match=r"beyond the 48 bytes of shared memory"):
        client.infer("affine", [shm_input(module, "x", "small", X, offset=8)])
    with pytest.raises(InferenceServerException, match="no shared memory region 'nope'"):
        client.infer("affine", [shm_input(module, "x", "nope", X)])
    out = module.InferRequestedOutput("y")
    out.set_shared_memory("small", 16)  # 48 bytes of y do not fit in 16
    with pytest.raises(InferenceServerException, match="do not fit the 16 bytes"):
        client.infer("affine", [shm_input(module, "x", "small", X)], outputs=[out])
    result = client.infer("affine", [shm_input(module, "x", "small", X)])  # still serving
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * X + 1)


def test_a_truncated_region_fails_only_that_request(client, regions):
    module = client.module
    inbox, key = regions(X.nbytes)
    shm.set_shared_memory_region(inbox, [X])
    client.register_system_shared_memory("shrinks", key, X.nbytes)
    os.truncate(f"/dev/shm/{key.strip('/')}", 8)  # a hostile caller; a mapped read would fault
    with pytest.raises(InferenceServerException, match="was truncated"):
        client.infer("affine", [shm_input(module, "x", "shrinks", X)])
    plain = module.InferInput("x", [3, 4], "FP32")
    plain.set_data_from_numpy(X)
    np.testing.assert_array_equal(client.infer("affine", [plain]).as_numpy("y"), 2 * X + 1)


async def test_shared_memory_requests_batch_with_the_others(regions):
    data = {
        "backends": {"slow": local_backend("affine", args={"delay_ms": 30})},
        "routes": [{"model": "slow", "backend": "slow"}],
    }
    inbox, key = regions(X.nbytes)
    shm.set_shared_memory_region(inbox, [X])
    async with running(data) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            await client.register_system_shared_memory("in", key, X.nbytes)
            plain = tc.InferInput("x", [3, 4], "FP32")
            plain.set_data_from_numpy(X + 1)
            calls = [client.infer("slow", [plain]) for _ in range(3)]
            calls.insert(1, client.infer("slow", [shm_input(tc, "x", "in", X)]))
            results = await asyncio.gather(*calls)
        finally:
            await client.close()
        batches = model_of(server, "slow").batches
    np.testing.assert_array_equal(results[1].as_numpy("y"), 2 * X + 1)
    for result in results[:1] + results[2:]:
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * (X + 1) + 1)
    assert max(batches) > 3  # the shared-memory request's rows rode with the others


def test_perf_analyzer_shared_memory_system(proxy):
    from tests.support import perf_analyzer

    report = perf_analyzer.run(
        "-m",
        "affine",
        "-u",
        proxy.url,
        "-i",
        "grpc",
        "--shared-memory",
        "system",
        "--output-shared-memory-size",
        "64",
    )
    assert report.requests > 50, report.output
    assert report.server_inferences == pytest.approx(report.requests, rel=0.02)
