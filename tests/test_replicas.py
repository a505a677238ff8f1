"""Backends with several replicas: gRPC's own round_robin, outlier ejection and retries
(coalesce.adapters.channels), and the circuit breaker that fails fast while a backend is down.

Replicas are real servers on loopback: batch-protocol services (config/examples/
batch_server.py) that can be told to fail or to hold calls, and real Triton servers
killed with SIGKILL under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
from coalesce import ConfigError
from coalesce import config as config_module
from coalesce.adapters import channels
from tritonclient.utils import InferenceServerException

from config.examples import batch_server
from tests.client import inputs
from tests.conftest import running
from tests.support.coalesce import ROOT

X = np.ones((1, 4), dtype=np.float32)


class Replica(batch_server.BatchService):
    """A batch-protocol replica that can fail every batch with `fail` (or only the next
    `fail_next` ones), or hold batches until `gate` is set; `calls` counts the Infer calls
    that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: grpc.StatusCode | None = None
        self.fail_next: int | None = None
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def Infer(self, request, context: grpc.aio.ServicerContext):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            self.fail_next -= 1
            if self.fail_next < 0:
                self.fail, self.fail_next = None, None
        if self.fail is not None:
            await context.abort(self.fail, "this replica was told to fail")
        return await super().Infer(request, context)


@contextlib.asynccontextmanager
async def replicas(count: int) -> AsyncIterator[tuple[list[Replica], list[str]]]:
    services = [Replica() for _ in range(count)]
    servers = [await batch_server.serve("127.0.0.1:0", service) for service in services]
    try:
        yield services, [f"127.0.0.1:{port}" for _, port in servers]
    finally:
        for server, _ in servers:
            await server.stop(0)


def backend(address: str | list[str], **fields) -> dict:
    where = {"targets": address} if isinstance(address, list) else {"target": address}
    return {
        "backends": {"b": {"type": "grpc", "model": "affine", **where, **fields}},
        "routes": [{"model": "m", "backend": "b"}],
    }


async def call(client: aio.InferenceServerClient, timeout: float = 5.0) -> str:
    """One request; its status code name (OK, UNAVAILABLE, ...)."""
    try:
        result = await client.infer("m", inputs(x=X), client_timeout=timeout)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * X + 1)
    return "OK"


@contextlib.asynccontextmanager
async def client_of(data: dict) -> AsyncIterator[tuple[aio.InferenceServerClient, object]]:
    async with running(data) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            yield client, server
        finally:
            await client.close()


@pytest.fixture
def manual_probes(monkeypatch):
    """Readiness probes only when a test calls router.probe(), so it can count them."""
    monkeypatch.setattr("coalesce.core.router.PROBE_INTERVAL_S", 3600.0)


# --- config and service config ------------------------------------------------------------


def parse_backend(**fields) -> config_module.RemoteBackend:
    data = {"backends": {"b": {"type": "triton", "model": "m", **fields}}, "routes": []}
    return config_module.parse(data).backends["b"]


def test_targets_become_one_channel_over_every_replica():
    four = parse_backend(targets=["127.0.0.1:1", "10.0.0.2:2"])
    assert channels.target(four) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    six = parse_backend(targets=["[::1]:1", "[fe80::2]:2"])
    assert channels.target(six) == "ipv6:[::1]:1,[fe80::2]:2"
    named = parse_backend(target="dns:///triton.ml.svc.cluster.local:8001")
    assert channels.target(named) == "dns:///triton.ml.svc.cluster.local:8001"
    assert named.address == "dns:///triton.ml.svc.cluster.local:8001"
    assert four.address == "127.0.0.1:1,10.0.0.2:2"


def test_service_config_is_round_robin_under_outlier_ejection_with_budgeted_retries():
    spec = parse_backend(
        targets=["127.0.0.1:1", "127.0.0.1:2"],
        outlier_detection={"interval_ms": 500, "min_calls": 4, "base_ejection_ms": 2000},
        retries={"max_attempts": 3, "budget_ratio": 0.2, "budget_tokens": 20},
    )
    options = dict(channels.options(spec, [("grpc.max_send_message_length", 7)]))
    assert options["grpc.max_send_message_length"] == 7
    assert options["grpc.use_local_subchannel_pool"] == 1
    service = json.loads(options["grpc.service_config"])
    (balancer,) = service["loadBalancingConfig"]
    ejection = balancer["outlier_detection_experimental"]
    assert ejection["childPolicy"] == [{"round_robin": {}}]
    assert (ejection["interval"], ejection["baseEjectionTime"]) == ("0.500s", "2.000s")
    assert ejection["failurePercentageEjection"]["requestVolume"] == 4
    (method,) = service["methodConfig"]
    assert method["name"] == [{}]
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert service["retryThrottling"] == {"maxTokens": 20, "tokenRatio": 0.2}


def test_retries_and_ejection_can_be_turned_off():
    spec = parse_backend(
        target="127.0.0.1:1",
        load_balancing="pick_first",
        outlier_detection=None,
        retries={"max_attempts": 1},
    )
    assert channels.service_config(spec) == {"loadBalancingConfig": [{"pick_first": {}}]}


def test_replica_config_problems_name_their_keys():
    data = {
        "backends": {
            "both": {"type": "triton", "model": "m", "target": "a:1", "targets": ["127.0.0.1:1"]},
            "names": {"type": "grpc", "targets": ["127.0.0.1:1", "localhost:2", "::1:3"]},
            "mixed": {"type": "tfserving", "model": "m", "targets": ["127.0.0.1:1", "[::1]:2"]},
            "bad": {
                "type": "triton",
                "model": "m",
                "target": "127.0.0.1:1",
                "load_balancing": "random",
                "retries": {"max_attempts": 9, "budget_ratio": 0},
                "outlier_detection": {"failure_percent": 0, "colour": "red"},
                "circuit_breaker": {"failed_probes": 0},
            },
        },
        "routes": [],
    }
    with pytest.raises(ConfigError) as error:
        config_module.parse(data)
    problems = sorted(error.value.problems)
    assert problems[:2] == [
        "backends.bad.circuit_breaker.failed_probes: must be >= 1",
        "backends.bad.load_balancing: Input should be 'round_robin' or 'pick_first'",
    ]
    assert problems[2:] == [
        "backends.bad.outlier_detection.colour: unknown key",
        "backends.bad.outlier_detection.failure_percent: must be >= 1",
        "backends.bad.retries.budget_ratio: must be >= 0.001",
        "backends.bad.retries.max_attempts: must be <= 5",
        "backends.both: give either target or targets",
        "backends.mixed.targets: mixes IPv4 and IPv6 addresses; list one family",
        "backends.names.targets.1: must be ip:port or [ipv6]:port, got 'localhost:2' "
        "(for a name, use target: dns:///name:port, which spreads over every address "
        "it resolves to)",
        "backends.names.targets.2: an IPv6 address goes in brackets, [addr]:port, got '::1:3'",
    ]


# --- batch-protocol replicas ----------------------------------------------------------------


async def test_calls_spread_over_every_replica():
    async with replicas(3) as (services, targets), client_of(backend(targets)) as (client, _):
        codes = [await call(client) for _ in range(30)]
    assert codes == ["OK"] * 30
    assert [s.calls for s in services] == [10, 10, 10]


async def test_a_dns_target_reaches_the_addresses_the_name_resolves_to():
    async with replicas(1) as (services, targets):
        port = targets[0].rpartition(":")[2]
        async with client_of(backend(f"dns:///localhost:{port}")) as (client, _):
            assert [await call(client) for _ in range(4)] == ["OK"] * 4
    assert services[0].calls == 4


async def test_a_failing_replica_is_ejected_and_probed_back_later():
    ejection = {"interval_ms": 100, "min_calls": 3, "base_ejection_ms": 1500}
    data = backend([], outlier_detection=ejection, retries={"max_attempts": 1})
    async with replicas(2) as (services, targets):
        data["backends"]["b"]["targets"] = targets
        bad = services[1]
        bad.fail = grpc.StatusCode.INTERNAL
        async with client_of(data) as (client, _):
            codes = [await call(client) for _ in range(10)]
            assert "INTERNAL" in codes
            await until(lambda: _ejected(client, bad))
            reached = bad.calls
            assert [await call(client) for _ in range(20)] == ["OK"] * 20
            assert bad.calls == reached  # ejected: no traffic at all
            bad.fail = None  # it recovers; after its ejection it is tried again
            await until(lambda: _reached(client, bad, reached), timeout=10)


async def _ejected(client: aio.InferenceServerClient, bad: Replica) -> bool:
    """Ten calls in a row that all succeed and never reach `bad`."""
    before = bad.calls
    codes = [await call(client) for _ in range(10)]
    return codes == ["OK"] * 10 and bad.calls == before


async def _reached(client: aio.InferenceServerClient, bad: Replica, reached: int) -> bool:
    assert await call(client) == "OK"
    return bad.calls > reached


async def until(check, timeout: float = 5.0) -> None:
    """Await `check()` until it is true (it makes calls itself, so nothing polls idle)."""
    end = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def test_unavailable_is_retried_on_another_replica_and_counted():
    data = backend([], outlier_detection=None, retries={"max_attempts": 3, "budget_tokens": 1000})
    async with replicas(2) as (services, targets):
        data["backends"]["b"]["targets"] = targets
        services[1].fail = grpc.StatusCode.UNAVAILABLE
        async with client_of(data) as (client, server):
            codes = [await call(client) for _ in range(20)]
            await server.router.probe()  # the probe loop reads the retry count
            retries = server.router.metrics.backend("b").retries
    assert codes == ["OK"] * 20
    assert services[1].calls >= 5
    assert retries == services[1].calls  # each attempt there failed and was retried


async def test_retries_stay_within_the_budget_when_every_replica_fails():
    data = backend([], outlier_detection=None, retries={"max_attempts": 5, "budget_tokens": 10})
    async with replicas(2) as (services, targets):
        data["backends"]["b"]["targets"] = targets
        for service in services:
            service.fail = grpc.StatusCode.UNAVAILABLE
        async with client_of(data) as (client, _):
            codes = [await call(client) for _ in range(40)]
    assert codes == ["UNAVAILABLE"] * 40
    attempts = sum(s.calls for s in services)
    # Unthrottled that would be 200; the budget allows retries only while more than
    # half of its 10 tokens are left, and each failure spends one.
    assert 40 < attempts <= 45


async def test_one_address_is_retried_on_coalesces_own_client_and_counted():
    """One `target` goes over Coalesce's own HTTP/2 client (transport auto), whose
    retries follow gRPC's retryPolicy: UNAVAILABLE is re-sent, up to max_attempts, and
    counted; another status is the caller's at once."""
    data = backend("", outlier_detection=None, retries={"max_attempts": 3, "budget_tokens": 1000})
    async with replicas(1) as (services, targets):
        data["backends"]["b"]["target"] = targets[0]
        replica = services[0]
        async with client_of(data) as (client, server):
            assert server.config.backends["b"].native
            replica.fail, replica.fail_next = grpc.StatusCode.UNAVAILABLE, 2
            assert await call(client) == "OK"  # the third attempt went through
            assert replica.calls == 3
            replica.fail, replica.fail_next = grpc.StatusCode.UNAVAILABLE, 3
            assert await call(client) == "UNAVAILABLE"  # three attempts, all failed
            assert replica.calls == 6
            replica.fail, replica.fail_next = grpc.StatusCode.INTERNAL, 1
            assert await call(client) == "INTERNAL"
            assert replica.calls == 7
            await server.router.probe()  # the probe loop reads the retry count
            assert server.router.metrics.backend("b").retries == 4


async def test_one_address_retries_stay_within_the_budget():
    data = backend("", outlier_detection=None, retries={"max_attempts": 5, "budget_tokens": 10})
    async with replicas(1) as (services, targets):
        data["backends"]["b"]["target"] = targets[0]
        services[0].fail = grpc.StatusCode.UNAVAILABLE
        async with client_of(data) as (client, server):
            assert server.config.backends["b"].native
            codes = [await call(client) for _ in range(40)]
    assert codes == ["UNAVAILABLE"] * 40
    assert 40 < services[0].calls <= 45  # as gRPC's retryThrottling allows, see above


async def test_a_backend_that_fails_its_probes_fails_fast(manual_probes):
    data = backend([], batching={"max_in_flight": 1}, circuit_breaker={"failed_probes": 2})
    async with replicas(1) as (services, targets):
        data["backends"]["b"]["target"] = targets[0]
        del data["backends"]["b"]["targets"]
        replica = services[0]
        replica.gate = asyncio.Event()
        async with client_of(data) as (client, server):
            router, loop = server.router, asyncio.get_running_loop()
            held = asyncio.ensure_future(call(client, timeout=20))
            while replica.calls < 1:
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(call(client, timeout=20))
            while router.backends["b"].batcher.queued_rows < 1:
                await asyncio.sleep(0.01)
            replica.ready = False  # Metadata, the probe, now says not ready
            await router.probe()
            replica.ready = True  # one failed probe is a hiccup, not an outage
            await router.probe()
            replica.ready = False
            await router.probe()
            assert not queued.done() and not router.backends["b"].down
            start = loop.time()
            await router.probe()  # the second failure in a row opens the breaker
            assert await queued == "UNAVAILABLE"  # answered at once, not at its deadline
            assert await call(client) == "UNAVAILABLE"
            assert loop.time() - start < 1.0
            assert replica.calls == 1  # only the held call ever reached the replica
            replica.ready = True
            await router.probe()
            replica.gate.set()
            assert await held == "OK"
            assert await call(client) == "OK"


# --- real Triton replicas -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tritons(tmp_path_factory) -> Iterator[tuple]:
    """Two Triton servers serving the `affine` model (the only model, so they start fast)."""
    from tests.support.triton import TritonServer, ensure_triton

    ensure_triton()
    repo = tmp_path_factory.mktemp("replica-models")
    (repo / "affine").symlink_to(ROOT / "tests" / "triton_models" / "affine")
    with TritonServer(repo) as first, TritonServer(repo) as second:
        yield first, second


def executions(triton) -> int:
    """How many times Triton ran `affine`, from its own statistics API (0 if it is down)."""
    try:
        with tc.InferenceServerClient(triton.grpc_url) as client:
            return client.get_inference_statistics("affine").model_stats[0].execution_count
    except InferenceServerException:
        return 0


def triton_backend(servers, **fields) -> dict:
    spec = {
        "type": "triton",
        "model": "affine",
        "targets": [s.grpc_url for s in servers],
        "batching": {"max_in_flight": 4},
        **fields,
    }
    return {"backends": {"b": spec}, "routes": [{"model": "m", "backend": "b"}]}


async def test_batches_spread_across_triton_replicas(tritons):
    before = [executions(t) for t in tritons]
    async with client_of(triton_backend(tritons)) as (client, _):
        codes = await asyncio.gather(*(call(client) for _ in range(8)))
        codes += [await call(client) for _ in range(8)]
    assert codes == ["OK"] * 16
    gained = [executions(t) - b for t, b in zip(tritons, before, strict=True)]
    assert all(n > 0 for n in gained), gained


class Load:
    """Callers sending requests back to back; every answer is logged with its time."""

    def __init__(self, client: aio.InferenceServerClient, callers: int) -> None:
        self.client = client
        self.sent = 0
        self.answers: list[tuple[float, float, str]] = []  # (sent, answered, status code)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(callers)]

    async def _caller(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.sent += 1
            sent = loop.time()
            code = await call(self.client, timeout=2.0)
            self.answers.append((sent, loop.time(), code))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def codes(self, since: float, until: float = float("inf"), sent: bool = True) -> dict[str, int]:
        """Status counts of the requests sent (or, sent=False, answered) in [since, until)."""
        counts: dict[str, int] = {}
        for when_sent, answered, code in self.answers:
            if since <= (when_sent if sent else answered) < until:
                counts[code] = counts.get(code, 0) + 1
        return counts


@pytest.mark.parametrize("attempts", [2, 1], ids=["retried", "no-retries"])
async def test_kill_9_one_triton_replica_under_load(tritons, attempts):
    """The killed replica's batches are retried (or, without retries, answered UNAVAILABLE);
    once it is gone the other carries every request without an error; restarted, it gets
    traffic again."""
    victim = tritons[1]
    loop = asyncio.get_running_loop()
    try:
        data = triton_backend(tritons, retries={"max_attempts": attempts})
        async with client_of(data) as (client, server):
            load = Load(client, callers=8)
            await asyncio.sleep(1.0)
            killed = loop.time()
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(2.0)
            restarted = loop.time()
            await asyncio.to_thread(victim.start)
            await until_async(lambda: executions(victim) > 0, timeout=10)
            back = loop.time()
            await asyncio.sleep(0.5)
            await load.stop()
            retries = server.router.metrics.backend("b").retries
    finally:
        if victim.process.poll() is not None:
            victim.start()
    assert load.sent == len(load.answers)  # every request got exactly one answer
    after = load.codes(killed)
    print(f"attempts {attempts}: all {load.codes(0)}; after the kill {after}; retries {retries}")
    assert set(load.codes(0)) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert set(load.codes(0, killed, sent=False)) == {"OK"}
    assert set(load.codes(killed + 0.5, restarted)) == {"OK"}  # the survivor carries it all
    assert set(load.codes(restarted)) == {"OK"}
    assert load.codes(back)["OK"] > 0


async def until_async(check, timeout: float) -> None:
    """Wait for a blocking `check()` (run in a thread), polling every 0.1 s."""
    end = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.1)
