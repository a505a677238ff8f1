"""Every limit, budget and timeout of our HTTP/2 server, each against the attack it is for:
the hostile peer loses its connection (or its stream), memory stays bounded, and a
well-behaved caller on another connection is answered throughout.

Bounded on purpose (a few thousand frames, a few seconds): the attacks at full length,
beside a measured client, are `python -m benchmarks.attacks`.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.support import h2peer as h2
from tests.support.coalesce import Process, free_port

CALL = "/inference.GRPCInferenceService/ServerLive"
HEAD = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.request_block(CALL))
MALFORMED = h2.request_block(CALL) + h2.literal(b"X-Upper", b"1")
MB = 1 << 20


def serve(tmp_path_factory, name: str, http2: dict, **top) -> Process:
    port = free_port()
    process = Process(
        {
            "listen": f"127.0.0.1:{port}",
            "admin": None,
            "http2": http2,
            "backends": {"example": {"type": "local", "model": "coalesce.example_model:load"}},
            "routes": [{"model": "example", "backend": "example"}],
            **top,
        },
        tmp_path_factory.mktemp(name),
    )
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Short timeouts, so that each is seen to fire within a test."""
    process = serve(
        tmp_path_factory,
        "limits",
        {
            "preface_timeout_s": 1,
            "settings_ack_timeout_s": 1,
            "idle_timeout_s": 2,
            "header_timeout_s": 1,
            "body_timeout_s": 1,
            "max_connections": 64,
        },
    )
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A small receive pool and the smallest connection window: memory a peer can hold."""
    process = serve(
        tmp_path_factory,
        "tight",
        {"connection_window": 65535, "max_buffered_bytes": 2 * MB},
        max_message_mb=2,
    )
    yield process
    process.terminate()


def rss_mib(process: Process) -> float:
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def answers_promptly(server: Process) -> None:
    """A well-behaved caller on a fresh connection: its PING and its call are answered."""
    with h2.Peer(server.port).handshake() as p:
        assert p.ping() < 1.0
        assert h2.grpc_status(p.call(1)) == "0"


_addresses = itertools.count(2)


def attacker_address() -> str:
    """A loopback address of its own for one test's attacker: a connection we close for
    misbehaving penalises its address (see the penalty tests), so each attack starts as
    a stranger and the well-behaved callers (127.0.0.1) are never the one penalised."""
    n = next(_addresses)
    return f"127.0.{n // 250 + 1}.{n % 250 + 2}"


def calm(server: Process, data: bytes, repeat: int = 1, source: str = "") -> None:
    """`data` sent `repeat` times costs the sender its connection: ENHANCE_YOUR_CALM."""
    with h2.Peer(server.port, source=source or attacker_address()).handshake() as p:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            p.send(data * repeat)  # closed on us mid-flood: the GOAWAY is in our buffer
        assert p.goaway() == h2.ENHANCE_YOUR_CALM
    answers_promptly(server)


# Header blocks


def test_an_hpack_bomb_stops_at_the_header_list_limit(server):
    entry = h2.literal(b"x-bomb-bin", base64.b64encode(bytes(3000)), indexed=True)
    block = entry + h2.request_block(CALL) + h2.indexed(62) * 11000  # 44 MB decoded
    before = rss_mib(server)
    start = time.monotonic()
    for _ in range(20):  # from 20 addresses: one reconnecting is held (the penalty tests)
        calm(server, h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block))
    assert time.monotonic() - start < 10  # 20 bombs and 20 checks: no stall
    assert rss_mib(server) - before < 32  # ~1 GB decoded before the limit was enforced


def test_a_header_list_over_the_advertised_size_closes_the_connection(server):
    block = h2.request_block(CALL) + h2.literal(b"x-big", b"v" * 15000)
    frames = h2.frame(h2.HEADERS, 0, 1, block)
    for i in range(4):  # four more literals of 15000: 75 KB decoded, over 16384
        last = h2.END_HEADERS if i == 3 else 0
        frames += h2.frame(h2.CONTINUATION, last, 1, h2.literal(b"x-more", b"v" * 15000))
    calm(server, frames)


def test_endless_continuation_frames_close_the_connection(server):
    empty = h2.frame(h2.CONTINUATION, 0, 1, b"")
    calm(server, h2.frame(h2.HEADERS, 0, 1, h2.request_block(CALL)) + empty * 17)


def test_large_header_blocks_have_a_byte_budget(server):
    block = h2.request_block(CALL) + h2.literal(b"x-pad", b"p" * 12000)
    frames = b"".join(
        h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, block) for i in range(120)
    )  # 1.4 MB of blocks too big to cache, never answered (no END_STREAM)
    calm(server, frames)


# Floods of frames that cost us and carry nothing


FLOODS = {
    "SETTINGS": (h2.settings((4, 65535)), 120),
    "PING": (h2.frame(h2.PING, 0, 0, bytes(8)), 1100),
    "WINDOW_UPDATE": (h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)), 1100),
    "a SETTINGS frame of 2730 entries": (
        h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 4, 65535) * 2730),
        1,
    ),
    "PRIORITY": (h2.frame(h2.PRIORITY, 0, 3, b"\0\0\0\0\x10"), 1100),
    "unknown frame types": (h2.frame(0x42, 0, 0, b""), 1100),
    "RST_STREAM on closed streams": (
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block(CALL))
        + b"".join(h2.frame(h2.RST_STREAM, 0, 1, b"\0\0\0\x08") for _ in range(1100)),
        1,
    ),
    "empty DATA frames": (HEAD + h2.frame(h2.DATA, 0, 1, b"") * 1100, 1),
    "malformed requests we must reset (MadeYouReset)": (
        b"".join(
            h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 2 * i + 1, MALFORMED)
            for i in range(1100)
        ),
        1,
    ),
}


@pytest.mark.parametrize("data, repeat", FLOODS.values(), ids=FLOODS.keys())
def test_a_flood_of_control_frames_costs_its_connection(server, data, repeat):
    calm(server, data, repeat)


def rapid_reset(streams: int) -> bytes:
    """ModelInfer calls, each cancelled as soon as it is sent (HEADERS, DATA, RST_STREAM)."""
    block = h2.request_block("/inference.GRPCInferenceService/ModelInfer")
    return b"".join(
        h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, block)
        + h2.frame(h2.DATA, h2.END_STREAM, 2 * i + 1, h2.grpc_message(b"\n\x07example"))
        + h2.frame(h2.RST_STREAM, 0, 2 * i + 1, struct.pack(">I", h2.CANCEL))
        for i in range(streams)
    )


def test_rapid_reset_costs_its_connection(server):
    calm(server, rapid_reset(1100))


def test_settings_cost_does_not_grow_with_entries_times_streams(server):
    with h2.Peer(server.port, source=attacker_address()).handshake() as p:
        block = h2.request_block(CALL)
        opened = (h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, block) for i in range(1000))
        p.send(b"".join(opened))
        entries = b"".join(struct.pack(">HI", 4, 65535 + i % 2) for i in range(32))
        p.send(h2.frame(h2.SETTINGS, 0, 0, entries) * 90)  # 2,880 entries, 1000 streams
        with h2.Peer(server.port).handshake() as other:
            assert other.ping() < 1.0  # was a window update per entry and stream: 2.9 M
        p.expect(lambda f: f.kind == h2.SETTINGS and f.flags & h2.ACK)


# Reconnecting does not refill a budget


def server_settings(p: h2.Peer) -> dict[int, int]:
    got = p.expect(lambda f: f.kind == h2.SETTINGS and not f.flags & h2.ACK)
    return dict(struct.iter_unpack(">HI", got.payload))


def pings_taken(port: int, source: str, count: int) -> bool:
    """Whether a connection from `source` is let send `count` PINGs at once."""
    with h2.Peer(port, source=source).handshake() as p:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            p.send(h2.frame(h2.PING, 0, 0, bytes(8)) * count + h2.frame(h2.PING, 0, 0, b"last-one"))
        got = p.expect(lambda f: f.kind == h2.GOAWAY or f.payload == b"last-one")
        return got.kind == h2.PING


def test_a_peer_that_reconnects_after_a_flood_gets_smaller_budgets(server):
    source = attacker_address()
    assert pings_taken(server.port, source, 500)  # a stranger's budget: 1000
    for _ in range(3):
        calm(server, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)
    assert not pings_taken(server.port, source, 500)  # an eighth of it now
    with h2.Peer(server.port, source=source).connect() as p:
        assert server_settings(p)[h2.MAX_CONCURRENT_STREAMS] < 1024  # streams too
    assert pings_taken(server.port, attacker_address(), 500)  # other addresses: whole
    with h2.Peer(server.port).connect() as p:
        assert server_settings(p)[h2.MAX_CONCURRENT_STREAMS] == 1024
    answers_promptly(server)


def test_a_penalised_address_waits_before_it_is_answered(server):
    """Each reconnect after a close for misbehaving is held longer (2^score ms, at most
    a second) before we read or answer it: flooding from fresh connections is slow."""
    source = attacker_address()
    for _ in range(10):
        calm(server, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)

    def answered(address: str) -> float:
        start = time.monotonic()
        with h2.Peer(server.port, source=address).connect() as p:
            server_settings(p)
        return time.monotonic() - start

    assert answered(source) > 0.4
    assert answered(attacker_address()) < 0.2
    answers_promptly(server)


def test_a_penalised_address_still_gets_a_well_behaved_exchange_through(server):
    """However low its share, a connection from a penalised address is let make a few
    SETTINGS changes and send one large header block in CONTINUATION frames: what
    h2spec's own tests do, from the address its error tests penalised."""
    source = attacker_address()
    for _ in range(10):  # a share of 1/128 from now on
        calm(server, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)
    with h2.Peer(server.port, source=source).handshake() as p:
        for size in range(65536, 65541):  # five SETTINGS changes, each acknowledged
            p.send(h2.settings((h2.INITIAL_WINDOW_SIZE, size)))
            p.expect(lambda f: f.kind == h2.SETTINGS and f.flags & h2.ACK)
        block = h2.request_block(CALL) + h2.literal(b"x-pad", b"p" * 6000)
        cut = [block[i : i + 2000] for i in range(0, len(block), 2000)]
        frames = h2.frame(h2.HEADERS, 0, 1, cut[0])
        for i, part in enumerate(cut[1:], 2):
            frames += h2.frame(h2.CONTINUATION, h2.END_HEADERS if i == len(cut) else 0, 1, part)
        p.send(frames + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message()))
        answer = p.expect(lambda f: f.kind == h2.GOAWAY or (f.stream == 1 and f.kind == h2.HEADERS))
        assert answer.kind == h2.HEADERS, f"GOAWAY {answer.payload[8:]!r}"


def test_what_a_held_connection_sends_is_read_once_it_is_let_in(server):
    """A held connection's first bytes (uvloop reads them even with reading paused) wait
    for it to be let in, and are answered then: not parsed meanwhile, not dropped."""
    source = attacker_address()
    for _ in range(10):
        calm(server, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)
    start = time.monotonic()
    with h2.Peer(server.port, source=source).connect() as p:
        p.send(h2.frame(h2.PING, 0, 0, b"was-held"))
        p.expect(lambda f: f.kind == h2.PING and f.flags & h2.ACK and f.payload == b"was-held")
    assert time.monotonic() - start > 0.4
    answers_promptly(server)


def test_a_flood_on_one_connection_is_parsed_in_turns_with_the_others(tmp_path_factory):
    """Input is parsed a millisecond at a time, the other connections served in between.
    The flood: Rapid Reset streams (their budget raised so that it is not cut short)
    sent while the connection is held, so that it is all there at once when it is let
    in; meanwhile a neighbour's PINGs are answered in a small part of what it takes."""
    budgets = {"reset_rate": [10**6, 10**6], "empty_frame_rate": [10**6, 10**6]}
    process = serve(tmp_path_factory, "flood", budgets)
    try:
        source = attacker_address()
        for _ in range(10):  # held a second from now on
            calm(process, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)
        flood = rapid_reset(6000)
        with h2.Peer(process.port).handshake() as p, h2.Peer(process.port, source=source) as f:
            f.connect()
            f.send(flood + h2.frame(h2.PING, 0, 0, b"floodend"))
            f.expect(lambda got: got.kind == h2.SETTINGS, 5)  # let in: its flood is parsed
            let_in, rtts = time.monotonic(), []
            done = threading.Event()

            def wait_through() -> None:
                f.expect(lambda got: got.kind == h2.PING and got.payload == b"floodend", 20)
                done.set()

            waiter = threading.Thread(target=wait_through)
            waiter.start()
            while not done.is_set() and len(rtts) < 500:
                rtts.append(p.ping())
                time.sleep(0.003)
            waiter.join()
            through = time.monotonic() - let_in
        assert max(rtts) < through / 3, (max(rtts), through, "the flood was parsed in one go")
    finally:
        process.terminate()


def test_a_penalty_fades(tmp_path_factory):
    process = serve(tmp_path_factory, "fades", {"penalty_half_life_s": 0.3})
    try:
        source = attacker_address()
        for _ in range(4):
            calm(process, h2.frame(h2.PING, 0, 0, bytes(8)), 1100, source=source)
        assert not pings_taken(process.port, source, 500)
        time.sleep(3)  # ten half-lives
        assert pings_taken(process.port, source, 500)
    finally:
        process.terminate()


# Timeouts


def test_a_connection_that_sends_no_preface_is_closed(server):
    with h2.Peer(server.port) as p:
        assert p.closed(timeout=4)


def test_our_settings_must_be_acknowledged(server):
    with h2.Peer(server.port).connect() as p:
        assert p.goaway(timeout=4) == h2.SETTINGS_TIMEOUT


def test_a_header_block_must_be_completed(server):
    with h2.Peer(server.port).handshake() as p:
        p.send(h2.frame(h2.HEADERS, 0, 1, h2.request_block(CALL)))
        assert p.goaway(timeout=4) == h2.ENHANCE_YOUR_CALM


def test_a_body_that_stops_arriving_is_reset(server):
    with h2.Peer(server.port).handshake() as p:
        p.send(HEAD + h2.frame(h2.DATA, 0, 1, b"\0\0\0\0\x10"))  # 16 bytes promised, none sent
        got = p.expect(lambda f: f.kind == h2.RST_STREAM, timeout=4)
        assert got.stream == 1 and struct.unpack(">I", got.payload)[0] == h2.CANCEL
        assert h2.grpc_status(p.call(3)) == "0"


def test_an_idle_connection_is_sent_away(server):
    with h2.Peer(server.port).handshake() as p:
        assert h2.grpc_status(p.call(1)) == "0"
        assert p.goaway(timeout=6) == h2.NO_ERROR
        assert p.closed()


# Connections and memory


def test_connections_beyond_max_connections_are_closed_at_once(server):
    time.sleep(0.5)  # the other tests' connections are gone
    peers = [h2.Peer(server.port).handshake() for _ in range(64)]
    try:
        with h2.Peer(server.port) as extra:
            assert extra.closed(timeout=2)
        assert h2.grpc_status(peers[0].call(1)) == "0"  # those in are served
    finally:
        for p in peers:
            p.close()
    time.sleep(0.2)
    answers_promptly(server)


def _credit(frames: list[h2.Frame]) -> int:
    return sum(
        struct.unpack(">I", f.payload)[0]
        for f in frames
        if f.kind == h2.WINDOW_UPDATE and f.stream == 0
    )


def _fill(p: h2.Peer, stream: int, limit: int, prefix: bytes = b"") -> int:
    """Send body bytes on `stream` as far as the server credits them, never END_STREAM;
    stop early if the server resets the stream."""
    p.send(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.request_block(CALL)))
    p.send(h2.frame(h2.DATA, 0, stream, prefix))
    sent, chunk = len(prefix), bytes(16384)
    while sent < limit:
        if any(f.kind == h2.RST_STREAM and f.stream == stream for f in p.frames):
            return sent
        window = 65535 + _credit(p.frames) - sent
        if window < len(chunk):
            try:
                p.read(timeout=0.5)
                continue
            except TimeoutError:
                return sent  # no more credit: the server holds what it will hold
        p.send(h2.frame(h2.DATA, 0, stream, chunk))
        sent += len(chunk)
    return sent


def test_unfinished_bodies_hold_at_most_the_windows_and_the_pool(tight):
    peers = [h2.Peer(tight.port).handshake() for _ in range(3)]
    try:
        sent = [_fill(p, 1, int(1.9 * MB)) for p in peers]  # 5.7 MB wanted, none finished
        assert sum(sent) <= 2 * MB + 3 * 65535 + 3 * 16384
        assert min(sent) < 1.9 * MB  # someone was held back
        answers_promptly(tight)  # a finished call is credited whatever the pool holds
        stalled = peers[sent.index(min(sent))]
        stalled.send(h2.frame(h2.DATA, 0, 1, bytes(16384)) * 5)  # past its window
        assert stalled.goaway() == h2.FLOW_CONTROL_ERROR
    finally:
        for p in peers:
            p.close()
    time.sleep(0.3)  # the closed connections' bytes go back to the pool
    with h2.Peer(tight.port).handshake() as p:
        assert _fill(p, 1, int(1.9 * MB)) >= 1.9 * MB


def test_a_body_over_max_message_is_answered_at_once_and_not_kept(tight):
    with h2.Peer(tight.port).handshake() as p:
        assert _fill(p, 1, 3 * MB, prefix=b"\0\0\x40\0\0") < 3 * MB  # a 4 MB message
        answer = [f for f in p.frames if f.stream == 1]
        assert h2.grpc_status(answer) == "8"  # RESOURCE_EXHAUSTED, before the body ended
        assert answer[-1].kind == h2.RST_STREAM and answer[-1].payload == bytes(4)  # NO_ERROR


# Bad input that once escaped as an exception


def test_invalid_base64_metadata_is_an_error_for_that_call(server):
    with h2.Peer(server.port).handshake() as p:
        block = h2.request_block(CALL) + h2.literal(b"x-id-bin", b"a")
        assert h2.grpc_status(p.call(1, block)) == "13"  # INTERNAL, naming the header
        assert h2.grpc_status(p.call(3)) == "0"


def test_a_flood_of_bad_connections_is_a_few_log_lines(server):
    start = len(server.output())
    for _ in range(30):
        with h2.Peer(server.port).handshake() as p:
            p.send(h2.frame(h2.DATA, 0, 0, b"x"))
            p.goaway()
    lines = server.output()[start:].count("closing an HTTP/2 connection")
    assert 1 <= lines <= 2


@pytest.fixture(scope="module")
def stingy(tmp_path_factory):
    """A PING budget of 20, refilled at 1 a second: what a peer earns is what counts."""
    process = serve(tmp_path_factory, "stingy", {"ping_rate": [20, 1]})
    yield process
    process.terminate()


def test_each_answer_earns_its_peer_a_ping(stingy):
    """60 calls, each followed by a PING, go through a budget of 20: the answers earned
    the rest. The same 60 PINGs with no calls cost the connection."""
    with h2.Peer(stingy.port).handshake() as p:
        for i in range(60):
            assert h2.grpc_status(p.call(2 * i + 1)) == "0"
            assert p.ping(struct.pack(">Q", i)) < 1.0
    calm(stingy, h2.frame(h2.PING, 0, 0, b"pingpong"), 60)
