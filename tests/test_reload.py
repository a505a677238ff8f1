"""Hot reload: SIGHUP and POST /reload re-read the config without dropping a request."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
import yaml
from coalesce import config as config_module
from coalesce.core.router import ReloadError
from coalesce.server import Server
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.conftest import local_backend, model_of


def post_reload(admin_port: int) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/reload", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def base() -> dict:
    return {
        "backends": {
            "a": local_backend("affine", args={"delay_ms": 2}),
            "b": local_backend("echo"),
        },
        "routes": [{"model": "m", "backend": "a"}, {"model": "e", "backend": "b"}],
    }


async def test_unchanged_backends_keep_their_batcher_and_changed_ones_are_replaced(tmp_path):
    path = tmp_path / "routes.yaml"
    data = {"listen": "127.0.0.1:0", "admin": None, **base()}
    path.write_text(yaml.safe_dump(data))
    server = Server(config_module.load(path), source=lambda: config_module.load(path))
    await server.start()
    try:
        kept = server.router.backends["a"]
        replaced = server.router.backends["b"]
        data["backends"]["b"]["batching"] = {"max_batch_size": 8}
        data["backends"]["c"] = local_backend("affine")
        data["routes"] += [{"model": "m2", "backend": "c"}]
        data["routes"] = [r for r in data["routes"] if r["model"] != "e"]
        data["routes"].append({"model": "e2", "backend": "b"})
        path.write_text(yaml.safe_dump(data))
        changes = await server.reload()
        assert sorted(changes) == ["backend b: changed", "backend c: added"]
        assert server.router.backends["a"] is kept
        assert server.router.backends["b"] is not replaced
        assert sorted(server.router.routes) == ["e2", "m", "m2"]
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = np.ones((1, 4), dtype=np.float32)
        assert (await client.infer("m2", inputs(x=x))).as_numpy("y")[0, 0] == 3
        with pytest.raises(InferenceServerException) as error:
            await client.infer("e", inputs(x=x))
        assert error.value.status() == "StatusCode.NOT_FOUND"
        await client.close()
    finally:
        await server.stop(grace=1)


async def test_a_bad_config_is_refused_and_the_old_one_serves_on(tmp_path):
    path = tmp_path / "routes.yaml"
    data = {"listen": "127.0.0.1:0", "admin": None, **base()}
    path.write_text(yaml.safe_dump(data))
    server = Server(config_module.load(path), source=lambda: config_module.load(path))
    await server.start()
    try:
        before = dict(server.router.backends)
        data["backends"]["a"]["batching"] = {"max_batch_size": 0}
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ReloadError) as error:
            await server.reload()
        assert error.value.problems == ["backends.a.batching.max_batch_size: must be >= 1"]
        data["backends"]["a"]["batching"] = {}
        data["backends"]["z"] = local_backend("no_such_factory")
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ReloadError, match="backend 'z' cannot load"):
            await server.reload()
        data["http"] = "127.0.0.1:1"
        del data["backends"]["z"]
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ReloadError, match="http: cannot change without a restart"):
            await server.reload()
        del data["http"]
        data["listen"] = "127.0.0.1:1"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ReloadError, match="listen: cannot change without a restart"):
            await server.reload()
        assert server.router.backends == before
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        result = await client.infer("m", inputs(x=np.ones((1, 4), dtype=np.float32)))
        assert result.as_numpy("y")[0, 0] == 3
        await client.close()
        assert server.router.metrics.reloads == {"error": 4}
    finally:
        await server.stop(grace=1)


async def test_a_replaced_backend_finishes_what_it_holds(tmp_path):
    path = tmp_path / "routes.yaml"
    data = {
        "listen": "127.0.0.1:0",
        "admin": None,
        "backends": {"g": local_backend("gated")},
        "routes": [{"model": "g", "backend": "g"}],
    }
    path.write_text(yaml.safe_dump(data))
    server = Server(config_module.load(path), source=lambda: config_module.load(path))
    await server.start()
    try:
        old_model = model_of(server, "g")
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        held = [
            asyncio.create_task(client.infer("g", inputs(x=np.full((1, 4), i, np.float32))))
            for i in range(5)
        ]
        await asyncio.wait_for(old_model.entered.wait(), 5)
        data["backends"]["g"]["batching"] = {"max_batch_size": 4}
        path.write_text(yaml.safe_dump(data))
        await server.reload()
        new_model = model_of(server, "g")
        assert new_model is not old_model
        new_model.gate.set()
        fresh = await client.infer("g", inputs(x=np.ones((1, 4), np.float32)))
        assert fresh.as_numpy("y")[0, 0] == 3
        old_model.gate.set()  # the old backend drains what it held
        results = await asyncio.gather(*held)
        assert [r.as_numpy("y")[0, 0] for r in results] == [2 * i + 1 for i in range(5)]
        await client.close()
    finally:
        await server.stop(grace=1)


def test_no_request_is_dropped_by_reloads_under_load(coalesce_process, tmp_path):
    """Steady traffic while SIGHUP and POST /reload flip a backend's settings back and forth."""
    proxy = coalesce_process(base())
    config = yaml.safe_load(proxy.config.read_text())
    counts = {"sent": 0, "ok": 0, "errors": []}
    stop = threading.Event()

    def traffic() -> None:
        async def run() -> None:
            client = aio.InferenceServerClient(proxy.url)

            async def one(i: int) -> None:
                counts["sent"] += 1
                x = np.full((1, 4), i % 100, dtype=np.float32)
                try:
                    y = (await client.infer("m", inputs(x=x))).as_numpy("y")
                    assert y[0, 0] == 2 * (i % 100) + 1
                    counts["ok"] += 1
                except InferenceServerException as exc:
                    counts["errors"].append(str(exc))

            i = 0
            while not stop.is_set():
                await asyncio.gather(*(one(i + k) for k in range(16)))
                i += 16
            await client.close()

        asyncio.run(run())

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(0.5)
    for k in range(6):
        config["backends"]["a"]["batching"] = {"max_batch_size": 4 + k}
        proxy.config.write_text(yaml.safe_dump(config))
        if k % 2:
            status, body = post_reload(proxy.admin_port)
            assert status == 200, body
            assert body["changes"] == ["backend a: changed"]
        else:
            proxy.proc.send_signal(signal.SIGHUP)
        time.sleep(0.4)
    stop.set()
    thread.join(30)
    assert counts["errors"] == []
    assert counts["ok"] == counts["sent"] > 100
    assert proxy.output().count("reloaded config: backend a: changed") == 6
    with tc.InferenceServerClient(proxy.url) as client:
        assert client.is_model_ready("m")


def test_post_reload_reports_a_bad_config(coalesce_process):
    proxy = coalesce_process(base())
    proxy.config.write_text("backends: {a: {type: local}}\nroutes: []\n")
    status, body = post_reload(proxy.admin_port)
    assert status == 400
    assert "backends.a.model: required" in body["problems"]
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("m", inputs(x=np.ones((1, 4), dtype=np.float32)))
    assert result.as_numpy("y")[0, 0] == 3


def test_serve_freezes_its_heap_at_start_and_again_after_a_reload(coalesce_process):
    """gc.freeze keeps full collections off the long-lived heap (p99; see freeze_heap)."""

    def frozen() -> list[int]:
        return [int(n) for n in re.findall(r"heap frozen: (\d+) objects", proxy.output())]

    proxy = coalesce_process(base())
    deadline = time.monotonic() + 10
    while not frozen() and time.monotonic() < deadline:  # just after the ports open
        time.sleep(0.05)
    assert len(frozen()) == 1 and frozen()[0] > 10_000  # modules, config, backends
    config = yaml.safe_load(proxy.config.read_text())
    config["backends"]["a"]["batching"] = {"max_batch_size": 5}
    proxy.config.write_text(yaml.safe_dump(config))
    status, body = post_reload(proxy.admin_port)
    assert status == 200, body
    assert len(frozen()) == 2 and frozen()[1] > 10_000
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("m", inputs(x=np.ones((1, 4), dtype=np.float32)))
    assert result.as_numpy("y")[0, 0] == 3
