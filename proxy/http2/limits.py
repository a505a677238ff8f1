"""What a peer may make one of our HTTP/2 servers spend, and the budgets that enforce it.

Every resource a peer controls has a bound here: memory (header lists, buffered
bodies, streams, connections), loop time (frame floods of every kind) and
wall-clock time (handshakes, idle connections, stalled headers and bodies). Going
over a budget costs the peer its connection (GOAWAY ENHANCE_YOUR_CALM), never anyone
else's calls. The defaults follow the stacks that have been attacked the longest:
nghttp2's Rapid Reset bucket (burst 1000, 33/s), Envoy's flood mitigations, gRPC
core's SETTINGS-ACK timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_streams: int = 1024  # SETTINGS_MAX_CONCURRENT_STREAMS, refused beyond
    max_header_list_size: int = 65536  # SETTINGS_MAX_HEADER_LIST_SIZE: decoded, enforced
    max_continuations: int = 16  # CONTINUATION frames in one header block
    stream_window: int = 1 << 20  # SETTINGS_INITIAL_WINDOW_SIZE we advertise
    connection_window: int = 16 << 20  # what one connection may have in flight to us
    max_buffered_bytes: int = 256 << 20  # unfinished request bodies, all connections
    max_connections: int = 4096  # accepted beyond this are closed at once
    backlog: int = 4096  # the listening socket's accept queue
    preface_timeout_s: float = 10.0  # connection preface and first SETTINGS
    settings_ack_timeout_s: float = 10.0  # our SETTINGS must be acknowledged
    idle_timeout_s: float = 300.0  # no stream open: GOAWAY NO_ERROR
    header_timeout_s: float = 10.0  # a header block continued must be completed
    body_timeout_s: float = 30.0  # a request body may pause this long
    # token buckets (burst, refill per second) per connection
    settings_rate: tuple[float, float] = (100, 10)
    ping_rate: tuple[float, float] = (1000, 100)
    reset_rate: tuple[float, float] = (1000, 33)  # streams the peer resets before our answer
    window_update_rate: tuple[float, float] = (10000, 1000)
    priority_rate: tuple[float, float] = (1000, 100)
    empty_frame_rate: tuple[float, float] = (1000, 100)  # frames that carry nothing


class Budget:
    """A token bucket: `spend()` is False once the peer has used up its burst and refill.

    Our answers earn the peer tokens too (`earn`): a client that reads what we send
    acknowledges it with WINDOW_UPDATE and PING frames, as many as we give it reason to.
    """

    __slots__ = ("burst", "rate", "tokens", "when")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate, self.tokens = burst, rate, burst
        self.when = time.monotonic()

    def spend(self) -> bool:
        self.tokens -= 1
        if self.tokens >= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.when) * self.rate)
        self.when = now
        return self.tokens >= 0

    def earn(self, tokens: float) -> None:
        self.tokens = min(self.burst, self.tokens + tokens)


class ReceivePool:
    """Receive-window credit that one server lends its connections for bodies in progress.

    Each connection may always have its `connection_window` in flight; beyond that, a
    body that is still arriving holds bytes, and crediting them back to the peer before
    the body is handed on takes credit from this pool until it is. So unfinished bodies,
    however many connections send them, hold at most the windows plus `size` bytes.
    Connections waiting for credit are woken when some comes back.
    """

    __slots__ = ("free", "size", "waiting")

    def __init__(self, size: int) -> None:
        self.size = self.free = size
        self.waiting: set = set()
