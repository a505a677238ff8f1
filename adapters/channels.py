"""The gRPC channel towards a remote backend: its target and its service config.

Why gRPC's own machinery rather than a balancer of ours: the channel already resolves
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

import json
import logging
from collections.abc import Sequence
from typing import Any

from coalesce.config import OutlierDetection, RemoteBackend, Retries

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
