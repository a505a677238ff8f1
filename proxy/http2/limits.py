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

from coalesce.config import Http2

# The limits are typed and documented where the config is (`http2:` in a config file).
Limits = Http2


class Budget:
    """A token bucket: `spend()` is False once the peer has used up its burst and refill.

    Our answers earn the peer tokens too (`earn`): a client that reads what we send
    acknowledges it with WINDOW_UPDATE and PING frames, as many as we give it reason to.
    """

    __slots__ = ("burst", "rate", "tokens", "when")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate, self.tokens = burst, rate, burst
        self.when = time.monotonic()

    def spend(self, amount: float = 1) -> bool:
        self.tokens -= amount
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
