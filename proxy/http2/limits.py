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

import math
import time

from coalesce.config import Http2

# The limits are typed and documented where the config is (`http2:` in a config file).
Limits = Http2


class Earnings:
    """What a connection's peer has earned by taking what we sent: answers, writes of
    DATA or trailers, streams opened. Counted here; a Budget adds them up only when it
    runs dry (five calls an answer to top up each bucket were 2% of the CPU at c=64)."""

    __slots__ = ("answers", "chunks", "streams")

    def __init__(self) -> None:
        self.answers = self.chunks = self.streams = 0


class Budget:
    """A token bucket: `spend()` is False once the peer has used up its burst, its refill
    and what it earned.

    Our answers earn the peer tokens too (`earnings`, times `weights` per answer, chunk
    and stream): a client that reads what we send acknowledges it with WINDOW_UPDATE and
    PING frames, as many as we give it reason to.
    """

    __slots__ = ("burst", "earnings", "rate", "seen", "tokens", "weights", "when")

    def __init__(
        self,
        burst: float,
        rate: float,
        earnings: Earnings | None = None,
        weights: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.burst, self.rate, self.tokens = burst, rate, burst
        self.when = time.monotonic()
        self.earnings, self.weights, self.seen = earnings, weights, 0.0

    def spend(self, amount: float = 1) -> bool:
        self.tokens -= amount
        if self.tokens >= 0:
            return True
        now = time.monotonic()
        tokens = self.tokens + (now - self.when) * self.rate
        earnings = self.earnings
        if earnings is not None:
            per_answer, per_chunk, per_stream = self.weights
            earned = (
                per_answer * earnings.answers
                + per_chunk * earnings.chunks
                + per_stream * earnings.streams
            )
            tokens += earned - self.seen
            self.seen = earned
        self.tokens = min(self.burst, tokens)
        self.when = now
        return self.tokens >= 0

    def scale(self, factor: float, least: float) -> None:
        """Shrink burst and refill (a penalised peer's), keeping `least` tokens so that a
        well-behaved exchange still fits."""
        self.burst = self.tokens = max(self.burst * factor, min(self.burst, least))
        self.rate *= factor


# What a penalised address's new connection keeps of each budget however low its
# share: one well-behaved exchange (a few SETTINGS changes, one large header block
# split over CONTINUATION frames, as h2spec's own tests send) still fits.
LEAST = {"settings": 8.0, "header_bytes": float(16 << 10)}
LEAST_DEFAULT = 2.0


class Penalties:
    """Per peer address, how often lately its connections were closed for misbehaving.

    Budgets are per connection, so a peer that reconnects gets a fresh one each time:
    a Rapid Reset or a flood from 100 short connections costs us 100 bursts. Each such
    close adds a strike to the peer's address; the score halves every `half_life`
    seconds, and a new connection from that address gets every budget scaled by
    2^-score (down to 1/128). The attacker's next connections get a few tokens; other
    addresses, and connections already open, are untouched.

    Smaller budgets alone make an attacker reconnect sooner, and every reconnect costs
    us an accept and a handshake: so a penalised address's new connection is also
    held, unread, for 2^score ms (at most a second) before we answer it. A held
    socket costs us nothing; its peer waits.
    """

    FLOOR = 1 / 128
    MAX_HOLD_S = 1.0
    MAX_ADDRESSES = 65536

    __slots__ = ("half_life", "scores")

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.scores: dict[str, tuple[float, float]] = {}  # address -> (score, as of when)

    def _score(self, address: str, now: float) -> float:
        score, when = self.scores.get(address, (0.0, now))
        return score * 0.5 ** ((now - when) / self.half_life)

    def strike(self, address: str) -> None:
        if not self.half_life or not address:
            return
        now = time.monotonic()
        scores = self.scores
        if len(scores) >= self.MAX_ADDRESSES and address not in scores:  # forget the faded
            for old in [a for a in scores if self._score(a, now) < 0.5] or list(scores):
                del scores[old]
        scores[address] = (min(self._score(address, now) + 1.0, 64.0), now)

    def check(self, address: str) -> tuple[float, float]:
        """For a new connection from `address`: (its share of each budget, how many
        seconds it is held before we read it)."""
        if address not in self.scores:
            return 1.0, 0.0
        score = self._score(address, time.monotonic())
        if score < 0.5:
            del self.scores[address]
            return 1.0, 0.0
        hold = min(0.001 * math.pow(2.0, score), self.MAX_HOLD_S)
        return max(math.pow(2.0, -score), self.FLOOR), hold


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
