"""How adapters call a remote backend: `open_caller()`, on one of two transports.

Every adapter sends serialized messages through a `Caller` and gets bytes back or a
CallError; which transport carries them is the backend's `transport` (see config):

- native (`NativeCaller`): Coalesce's own HTTP/2 client, one connection to one
  address, cleartext or TLS, no thread hop (~0.3 ms less per call at light load).
  Its retries are gRPC's retryPolicy and retryThrottling, re-done here in a few
  lines: the same keys mean the same thing on both transports.
- grpc (`GrpcCaller`): gRPC core's channel, for what one connection cannot do.

Why gRPC's own machinery for replicas rather than a balancer of ours: the channel already resolves
names (dns:///, or ipv4:/ipv6: lists of replicas), keeps one connection per replica,
reconnects, balances (round_robin), ejects failing replicas (outlier_detection) and
retries with jittered backoff within a token budget (retryPolicy, retryThrottling), all
in C and per call, off the event loop. Coalesce only writes the service config that
switches these on (see coalesce.config: targets, load_balancing, outlier_detection,
retries). Every adapter builds its channel from `target()` and `options()`.

`RetryCounter` reads how many attempts gRPC re-sent from channelz, when the probe loop
asks: retries happen inside gRPC core, where no per-call hook of Python sees them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from coalesce import tls
from coalesce.config import BackendTLS, OutlierDetection, RemoteBackend, Retries
from coalesce.http2.client import CallError, NativeChannel

log = logging.getLogger("coalesce")
ChannelOptions = list[tuple[str, Any]]

try:  # channelz, as the grpcio-channelz package reads it; without it retries go uncounted
    from grpc._cython import cygrpc as _cygrpc
except ImportError:  # pragma: no cover
    _cygrpc = None


def target(config: RemoteBackend) -> str:
    """The channel's target: `target` as written, or an ipv4:/ipv6: list of `targets`."""
    if config.targets is None:
        return config.target  # type: ignore[return-value]  # the config checks one is set
    family = "ipv6" if config.targets[0].startswith("[") else "ipv4"
    return f"{family}:{','.join(config.targets)}"


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.3f}s"


def _ejection(od: OutlierDetection, child: dict) -> dict:
    return {
        "outlier_detection_experimental": {
            "interval": _seconds(od.interval_ms),
            "baseEjectionTime": _seconds(od.base_ejection_ms),
            "maxEjectionTime": _seconds(od.max_ejection_ms),
            "maxEjectionPercent": od.max_ejected_percent,
            "failurePercentageEjection": {
                "threshold": od.failure_percent,
                "enforcementPercentage": 100,
                "minimumHosts": 2,  # never judge a lone replica: ejecting it helps no one
                "requestVolume": od.min_calls,
            },
            "childPolicy": [child],
        }
    }


def _retry_policy(retries: Retries) -> dict:
    return {
        "maxAttempts": retries.max_attempts,
        "initialBackoff": _seconds(retries.initial_backoff_ms),
        "maxBackoff": _seconds(retries.max_backoff_ms),
        "backoffMultiplier": retries.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }


def service_config(config: RemoteBackend) -> dict:
    """gRPC service config: the load balancer (under outlier ejection) and the retries."""
    balancer: dict[str, Any] = {config.load_balancing: {}}
    if config.outlier_detection is not None:
        balancer = _ejection(config.outlier_detection, balancer)
    service: dict[str, Any] = {"loadBalancingConfig": [balancer]}
    retries = config.retries
    if retries.max_attempts > 1:
        # An empty name is the default for every method of the channel (probes included).
        service["methodConfig"] = [{"name": [{}], "retryPolicy": _retry_policy(retries)}]
        service["retryThrottling"] = {
            "maxTokens": retries.budget_tokens,
            "tokenRatio": round(retries.budget_ratio, 3),  # gRPC reads 3 decimals
        }
    return service


BASE_OPTIONS: ChannelOptions = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # A restarted backend should be used again within a probe interval, not after
    # gRPC's default reconnect backoff (which grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""What every backend channel needs whatever its kind."""


def options(
    config: RemoteBackend, base: Sequence[tuple[str, Any]] = BASE_OPTIONS
) -> ChannelOptions:
    """`base` plus what replicas need: the service config, the retry buffer, and a
    subchannel pool of the channel's own (so channelz counts are this backend's only)."""
    extra: ChannelOptions = [
        ("grpc.service_config", json.dumps(service_config(config))),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one from DNS TXT records
        ("grpc.per_rpc_retry_buffer_size", int(config.retries.buffer_mb * 2**20)),
    ]
    if not any(key == "grpc.use_local_subchannel_pool" for key, _ in base):
        extra.append(("grpc.use_local_subchannel_pool", 1))
    return [*base, *extra]


def _top_channels() -> list[dict]:
    channels, start = [], 0
    while True:
        page = json.loads(_cygrpc.channelz_get_top_channels(start))
        found = page.get("channel", [])
        channels += found
        if page.get("end", True) or not found:
            return channels
        start = max(int(c["ref"]["channelId"]) for c in found) + 1


class RetryCounter:
    """Attempts gRPC re-sent on one channel since the last `take()`, from channelz.

    channelz counts calls per channel and attempts per replica (subchannel); attempts
    beyond calls are retries (gRPC's transparent ones included). An attempt that found
    no replica to go to counts in neither, so with every replica down this undercounts.
    Create it right after its channel: it takes the newest channel with that target.
    """

    def __init__(self, channel_target: str) -> None:
        self._id = self._find(channel_target)
        self._calls = 0
        self._attempts: dict[int, int] = {}

    @staticmethod
    def _find(channel_target: str) -> int | None:
        if _cygrpc is None:
            return None
        try:
            ids = [
                int(c["ref"]["channelId"])
                for c in _top_channels()
                if c.get("data", {}).get("target") == channel_target
            ]
        except (ValueError, KeyError, RuntimeError) as exc:
            log.debug("channelz unusable, retries go uncounted: %s", exc)
            return None
        return max(ids, default=None)

    def take(self) -> int:
        """Retries since the last call (0 when channelz cannot tell)."""
        if self._id is None:
            return 0
        try:
            channel = json.loads(_cygrpc.channelz_get_channel(self._id))["channel"]
            calls = int(channel["data"].get("callsStarted", 0))
            attempts = {
                int(ref["subchannelId"]): self._subchannel_attempts(int(ref["subchannelId"]))
                for ref in channel.get("subchannelRef", [])
            }
        except (ValueError, KeyError, RuntimeError):
            return 0  # the channel is gone (closed) or channelz answered oddly
        new_attempts = sum(n - self._attempts.get(sid, 0) for sid, n in attempts.items())
        new_calls, self._calls, self._attempts = calls - self._calls, calls, attempts
        return max(0, new_attempts - new_calls)

    @staticmethod
    def _subchannel_attempts(subchannel_id: int) -> int:
        data = json.loads(_cygrpc.channelz_get_subchannel(subchannel_id))["subchannel"]["data"]
        return int(data.get("callsStarted", 0))


class Caller(Protocol):
    """Unary calls to one backend, whatever carries them."""

    retry_counter: Any
    """Has `take()`: the retries made since it was last asked (read by the probe loop)."""

    async def unary(
        self, path: str, request: bytes, timeout: float | None, metadata: Any = None
    ) -> bytes:
        """The response's bytes; raises CallError with the call's status otherwise."""

    async def close(self) -> None: ...


class GrpcCaller:
    """Calls over a gRPC core channel (replicas, dns:///, balancing, outlier ejection)."""

    def __init__(self, config: RemoteBackend) -> None:
        channel_target = target(config)
        self._channel = tls.open_channel(
            channel_target, tls.client_certificates(config.tls), options(config)
        )
        self.retry_counter = RetryCounter(channel_target)
        self._methods: dict[str, Any] = {}

    async def unary(
        self, path: str, request: bytes, timeout: float | None, metadata: Any = None
    ) -> bytes:
        method = self._methods.get(path)
        if method is None:
            method = self._methods[path] = self._channel.unary_unary(path)
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code(), exc.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


class RetryBudget:
    """gRPC's retryThrottling: failures spend a token, successes earn `ratio` of one,
    and retries go out only while more than half of the tokens are left."""

    def __init__(self, retries: Retries) -> None:
        self._max = float(retries.budget_tokens)
        self._ratio = retries.budget_ratio
        self.tokens = self._max

    def succeeded(self) -> None:
        self.tokens = min(self._max, self.tokens + self._ratio)

    def failed(self) -> bool:
        """Spend a token; whether a retry may go out."""
        self.tokens = max(0.0, self.tokens - 1)
        return self.tokens > self._max / 2


class RetryCount:
    """Retries made since the last `take()` (the probe loop adds them to the metrics)."""

    def __init__(self) -> None:
        self.count = 0

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class NativeCaller:
    """Calls over Coalesce's own HTTP/2 client, retried as gRPC's retryPolicy would:
    UNAVAILABLE only, at most max_attempts, full-jitter backoff, within the deadline,
    within the budget, and never a message larger than buffer_mb."""

    def __init__(self, config: RemoteBackend) -> None:
        context, name = _client_context(config.tls)
        self._channel = NativeChannel(config.target, context, name)  # type: ignore[arg-type]
        self._retries = config.retries
        self._budget = RetryBudget(config.retries)
        self._max_bytes = int(config.retries.buffer_mb * 2**20)
        self.retry_counter = RetryCount()

    async def unary(
        self, path: str, request: bytes, timeout: float | None, metadata: Any = None
    ) -> bytes:
        retries, loop = self._retries, asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        path_bytes = path.encode()
        attempt = 1
        while True:
            left = None if deadline is None else deadline - loop.time()
            try:
                answer = await self._channel.unary(path_bytes, request, left, metadata)
            except CallError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                if (
                    not self._budget.failed()
                    or attempt >= retries.max_attempts
                    or len(request) > self._max_bytes
                ):
                    raise
                cap = retries.initial_backoff_ms * retries.backoff_multiplier ** (attempt - 1)
                pause = random.uniform(0, min(cap, retries.max_backoff_ms)) / 1000
                if deadline is not None and loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                attempt += 1
                self.retry_counter.count += 1
                continue
            self._budget.succeeded()
            return answer

    async def close(self) -> None:
        await self._channel.close()


def _client_context(config: BackendTLS | None) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context towards a backend (system roots unless `ca`), and the name to check."""
    if config is None:
        return None, None
    context = ssl.create_default_context(cafile=config.ca)
    if config.cert is not None:
        context.load_cert_chain(config.cert, config.key)
    return context, config.server_name


def open_caller(config: RemoteBackend) -> Caller:
    """The caller the backend's `transport` asks for."""
    return NativeCaller(config) if config.native else GrpcCaller(config)
