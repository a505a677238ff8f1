"""What tests/test_http2_fuzz.py drives our HTTP/2 stack with, and checks it against.

- `Deflater` and `Inflater`: libnghttp2's HPACK encoder and decoder through ctypes, a
  second implementation to compare coalesce.http2.hpack with (None when the library
  is missing: `make test` installs Debian's libnghttp2-dev).
- `run(scenario)`: one `ServerConnection` in process, no sockets: a fake transport that
  records what is written, a loop whose clock only moves when the scenario says, and an
  app that answers each request at once, later or never. It feeds the scenario's bytes
  in its chunks between other events (loop passes, time, sweeps, GOAWAY), checks the
  connection's books after each, and returns a `Trace` of what came out.
- `fuzz("hpack" | "frames", libfuzzer_args)`: the same oracles under atheris,
  coverage-guided, for the test that runs it in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import struct
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from coalesce.http2 import endpoint as ep
from coalesce.http2.hpack import Decoder, HpackError, huffman_decode
from coalesce.http2.limits import Limits, ReceivePool
from coalesce.http2.server import ServerConnection

# libnghttp2's HPACK, through ctypes.

LIB_PATH = ctypes.util.find_library("nghttp2")


class _NV(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("value", ctypes.c_void_p),
        ("namelen", ctypes.c_size_t),
        ("valuelen", ctypes.c_size_t),
        ("flags", ctypes.c_uint8),
    ]


def _library() -> ctypes.CDLL | None:
    if LIB_PATH is None:
        return None
    lib = ctypes.CDLL(LIB_PATH)
    handle, nvs = ctypes.c_void_p, ctypes.POINTER(_NV)
    for name, restype, argtypes in (
        ("nghttp2_hd_deflate_new", ctypes.c_int, [ctypes.POINTER(handle), ctypes.c_size_t]),
        ("nghttp2_hd_deflate_del", None, [handle]),
        ("nghttp2_hd_deflate_bound", ctypes.c_size_t, [handle, nvs, ctypes.c_size_t]),
        (
            "nghttp2_hd_deflate_hd",
            ctypes.c_ssize_t,
            [handle, ctypes.c_void_p, ctypes.c_size_t, nvs, ctypes.c_size_t],
        ),
        ("nghttp2_hd_deflate_change_table_size", ctypes.c_int, [handle, ctypes.c_size_t]),
        ("nghttp2_hd_deflate_get_num_table_entries", ctypes.c_size_t, [handle]),
        ("nghttp2_hd_deflate_get_table_entry", nvs, [handle, ctypes.c_size_t]),
        ("nghttp2_hd_deflate_get_dynamic_table_size", ctypes.c_size_t, [handle]),
        ("nghttp2_hd_inflate_new", ctypes.c_int, [ctypes.POINTER(handle)]),
        ("nghttp2_hd_inflate_del", None, [handle]),
        (
            "nghttp2_hd_inflate_hd2",
            ctypes.c_ssize_t,
            [
                handle,
                nvs,
                ctypes.POINTER(ctypes.c_int),
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
            ],
        ),
        ("nghttp2_hd_inflate_end_headers", ctypes.c_int, [handle]),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


LIB = _library()
NO_INDEX = 0x1  # NGHTTP2_NV_FLAG_NO_INDEX: a "never indexed" literal
_INFLATE_FINAL, _INFLATE_EMIT = 0x1, 0x2


class Deflater:
    """libnghttp2's HPACK encoder: it indexes, evicts and Huffman-codes as it sees fit."""

    def __init__(self, table_size: int = 4096) -> None:
        assert LIB is not None
        self._handle = ctypes.c_void_p()
        assert LIB.nghttp2_hd_deflate_new(ctypes.byref(self._handle), table_size) == 0

    def encode(self, headers: list[tuple[bytes, bytes]], never: list[bool] | None = None) -> bytes:
        keep, fields = [], (_NV * max(len(headers), 1))()
        for i, (name, value) in enumerate(headers):
            n = ctypes.create_string_buffer(name, len(name))
            v = ctypes.create_string_buffer(value, len(value))
            keep += (n, v)
            flags = NO_INDEX if never and never[i] else 0
            fields[i] = _NV(ctypes.addressof(n), ctypes.addressof(v), len(name), len(value), flags)
        bound = LIB.nghttp2_hd_deflate_bound(self._handle, fields, len(headers))
        out = ctypes.create_string_buffer(bound)
        size = LIB.nghttp2_hd_deflate_hd(self._handle, out, bound, fields, len(headers))
        assert size >= 0, f"nghttp2_hd_deflate_hd: {size}"
        return out.raw[:size]

    def change_table_size(self, size: int) -> None:
        """What a SETTINGS_HEADER_TABLE_SIZE from the decoder's side does: the next block
        opens with size updates (the smallest size since the last block, then this one)."""
        assert LIB.nghttp2_hd_deflate_change_table_size(self._handle, size) == 0

    def table(self) -> list[tuple[bytes, bytes]]:
        """Its dynamic table, newest first (what the peer's decoder must hold)."""
        entries = []
        for index in range(62, LIB.nghttp2_hd_deflate_get_num_table_entries(self._handle) + 1):
            nv = LIB.nghttp2_hd_deflate_get_table_entry(self._handle, index).contents
            entries.append(
                (ctypes.string_at(nv.name, nv.namelen), ctypes.string_at(nv.value, nv.valuelen))
            )
        return entries

    def table_size(self) -> int:
        return LIB.nghttp2_hd_deflate_get_dynamic_table_size(self._handle)

    def __del__(self) -> None:
        if LIB is not None and self._handle:
            LIB.nghttp2_hd_deflate_del(self._handle)
            self._handle = ctypes.c_void_p()


class Inflater:
    """libnghttp2's HPACK decoder (SETTINGS_HEADER_TABLE_SIZE 4096, like Decoder's)."""

    def __init__(self) -> None:
        assert LIB is not None
        self._handle = ctypes.c_void_p()
        assert LIB.nghttp2_hd_inflate_new(ctypes.byref(self._handle)) == 0
        self.failed = False

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]] | None:
        """The block's fields, or None where libnghttp2 finds it malformed (after which
        this decoder is spent, as a connection would be)."""
        if self.failed:
            return None
        buffer = ctypes.create_string_buffer(block, max(len(block), 1))
        base, pos, fields = ctypes.addressof(buffer), 0, []
        nv, flags = _NV(), ctypes.c_int()
        while True:
            used = LIB.nghttp2_hd_inflate_hd2(
                self._handle, ctypes.byref(nv), ctypes.byref(flags), base + pos, len(block) - pos, 1
            )
            if used < 0:
                self.failed = True
                return None
            pos += used
            if flags.value & _INFLATE_EMIT:
                fields.append(
                    (ctypes.string_at(nv.name, nv.namelen), ctypes.string_at(nv.value, nv.valuelen))
                )
            if flags.value & _INFLATE_FINAL:
                LIB.nghttp2_hd_inflate_end_headers(self._handle)
                return fields
            if not used and not flags.value & _INFLATE_EMIT:
                self.failed = True  # no progress and no end: never seen, but never loop
                return None

    def __del__(self) -> None:
        if LIB is not None and self._handle:
            LIB.nghttp2_hd_inflate_del(self._handle)
            self._handle = ctypes.c_void_p()


def check_decoder(decoder: Decoder) -> None:
    """The dynamic table's books: its size is its entries', within what was allowed."""
    assert decoder.size == sum(len(n) + len(v) + 32 for n, v in decoder.table)
    assert 0 <= decoder.size <= decoder.capacity <= decoder.limit


def hpack_one_input(data: bytes) -> None:
    """The HPACK oracle (atheris): `data` cut into blocks at 0xff bytes, decoded on one
    connection. Each decodes or raises HpackError, nothing else; the table's books stay
    right; and where libnghttp2 is here, it decodes each block to the same fields or
    refuses the same ones."""
    decoder = Decoder(max_list_size=1 << 30)
    inflater = Inflater() if LIB is not None else None
    for block in data.split(b"\xff"):
        try:
            fields = decoder.decode(block)[0]
        except HpackError:
            fields = None
        check_decoder(decoder)
        if inflater is not None:
            theirs = inflater.decode(block)
            ours = (
                None
                if fields is None
                else [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields]
            )
            assert ours == theirs, f"block {block!r}: we decode {ours}, libnghttp2 {theirs}"
        if fields is None:
            break  # a COMPRESSION_ERROR ends the connection
    with contextlib.suppress(HpackError):
        huffman_decode(data)


# One ServerConnection, in process.


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock (`now`) moves only when the scenario moves it: timers
    (the linger after an error's GOAWAY, late answers) fire without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__()

    def time(self) -> float:
        return self.now


class FakeTransport:
    """What the connection writes, whole, in order; and what it wrote too late."""

    def __init__(self, loop: asyncio.AbstractEventLoop, can_eof: bool) -> None:
        self.loop = loop
        self.can_eof = can_eof
        self.protocol: ServerConnection | None = None
        self.writes: list[bytes] = []
        self.closing = self.eof = False
        self.after_close: list[bytes] = []  # asyncio drops these: a bug all the same
        self.after_eof: list[bytes] = []  # asyncio and uvloop raise RuntimeError on these
        self.lost = 0
        self.paused = False

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        data = bytes(data)
        if self.closing:
            self.after_close.append(data)
        elif self.eof:
            self.after_eof.append(data)
        self.writes.append(data)

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        assert not self.closing
        self.eof = True

    def close(self) -> None:
        if not self.closing:  # as asyncio's transports: connection_lost on the next pass
            self.closing = True
            self.loop.call_soon(self._lose)

    def _lose(self) -> None:
        self.lost += 1
        assert self.protocol is not None
        self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Answer(NamedTuple):
    """How the app answers a request: after `delay` seconds of loop time (None: at once;
    < 0: never), with `size` bytes of body (0: one HEADERS frame that ends the stream),
    and when: "request" (once the whole request has come), "opened" (from its headers
    alone) or "stream" (a streaming request, its body consumed as it comes)."""

    delay: float | None = None
    size: int = 0
    trailers: bool = True
    when: str = "request"


STREAMING = "streaming" in ep.Stream.__slots__ and hasattr(ep.Endpoint, "consume")


class App:
    """Answers the n-th request as the n-th Answer says (cycling). `opened` and `data`
    are the streaming hooks of coalesce.http2.server's App, where it has them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answers: list[Answer]) -> None:
        self.loop, self.answers, self.requests = loop, answers or [Answer()], 0
        self.plans: dict[ep.Stream, Answer] = {}

    def _plan(self, stream: ep.Stream) -> Answer:
        plan = self.plans.pop(stream, None)
        if plan is None:
            plan = self.answers[self.requests % len(self.answers)]
            self.requests += 1
        return plan

    def opened(self, connection: ServerConnection, stream: ep.Stream) -> None:
        plan = self._plan(stream)
        if plan.when == "opened":
            self.respond(connection, stream, plan)
            return
        if plan.when == "stream" and STREAMING:
            stream.streaming = True
        self.plans[stream] = plan

    def request(self, connection: ServerConnection, stream: ep.Stream) -> None:
        self.respond(connection, stream, self._plan(stream))

    def data(self, connection: ServerConnection, stream: ep.Stream, end: bool) -> None:
        size = len(stream.body)
        del stream.body[:]
        connection.consume(stream, size)
        if end:
            self.respond(connection, stream, self._plan(stream))

    def respond(self, connection: ServerConnection, stream: ep.Stream, plan: Answer) -> None:
        if plan.delay is None:
            self.answer(connection, stream, plan)
        elif plan.delay >= 0:
            self.loop.call_later(plan.delay, self.answer, connection, stream, plan)

    @staticmethod
    def answer(connection: ServerConnection, stream: ep.Stream, plan: Answer) -> None:
        if not plan.size:
            connection.answer_headers_only(stream, b"\x88")
        else:
            body = bytes(range(256)) * (plan.size // 256 + 1)
            trailers = b"\x40\x01a\x01b" if plan.trailers else None
            connection.answer(stream, b"\x88", body[: plan.size], trailers)


TIGHT = Limits(
    max_concurrent_streams=2,
    max_header_list_size=1024,
    max_continuations=2,
    stream_window=65535,
    connection_window=65535,
    settings_rate=(6, 1),
    ping_rate=(6, 1),
    reset_rate=(4, 1),
    window_update_rate=(12, 1),
    priority_rate=(6, 1),
    empty_frame_rate=(6, 1),
    header_bytes_rate=(2048, 1),
)
LIMITS = {"default": Limits(), "tight": TIGHT}


@dataclass
class Scenario:
    """What a peer does: `steps` are bytes it sends (one data_received each) and events
    between them: "tick" (the loop runs what is ready), a float (the clock moves that
    many seconds, timers fire), "sweep" (the Listener's timeout sweep), "goaway"
    (the server drains: Listener.stop)."""

    steps: list[bytes | str | float]
    limits: str = "default"
    max_body: int = 1 << 20
    answers: list[Answer] = field(default_factory=list)
    can_eof: bool = True
    pool: int = 1 << 20


class Frame(NamedTuple):
    kind: int
    flags: int
    stream: int
    payload: bytes


class Trace(NamedTuple):
    frames: list[Frame]  # what the server wrote, in order
    sent: bytes  # what the peer sent
    transport: FakeTransport
    connection: ServerConnection
    closed_calls: int  # on_close callbacks
    loop_errors: list[dict]  # what reached the loop's exception handler
    internal_errors: list[logging.LogRecord]  # "HTTP/2 connection failed" (a caught bug)


def parse(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames in `data` and what follows them."""
    frames, pos = [], 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos - 9 < length:
            break
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big")
        frames.append(Frame(data[pos + 3], data[pos + 4], stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames, data[pos:]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def check_books(connection: ServerConnection, transport: FakeTransport, pool: ReceivePool) -> None:
    """What must hold between any two events; none of these is known broken."""
    limits = connection.limits
    assert len(connection.streams) <= limits.max_concurrent_streams
    assert all(stream.held >= 0 for stream in connection.streams.values())
    assert connection.held >= sum(stream.held for stream in connection.streams.values()) >= 0
    assert connection.send_window >= 0
    if transport.lost:  # gone: what it was lent is back
        assert pool.free == pool.size and not pool.waiting
        return
    assert pool.free + connection._lent == pool.size and connection._lent >= 0
    assert connection.held == connection._uncredited_held + connection._lent
    if connection.lingering or transport.closing:
        return  # a connection error may have left the window overdrawn: nothing more is read
    assert connection.send_window <= ep.MAX_WINDOW
    # what the peer may still send, plus what it sent that is not credited back, is the window
    assert connection._recv_window >= 0
    assert (
        connection._recv_window + connection._uncredited_held + connection._uncredited_done
        == limits.connection_window
    )


def check_held(connection: ServerConnection, transport: FakeTransport) -> None:
    """Body bytes held are held by open streams: none leaks when a stream goes."""
    if not transport.lost:
        assert connection.held == sum(stream.held for stream in connection.streams.values()), (
            f"connection.held {connection.held}, its open streams hold "
            f"{ {sid: stream.held for sid, stream in connection.streams.items()} }"
        )


async def _drive(scenario: Scenario, loop: VirtualLoop, held: bool) -> Trace:
    transport = FakeTransport(loop, scenario.can_eof)
    pool = ReceivePool(scenario.pool)
    closed: list[ServerConnection] = []
    connection = ServerConnection(
        App(loop, scenario.answers),
        scenario.max_body,
        closed.append,
        LIMITS[scenario.limits],
        pool,
    )
    transport.protocol = connection
    connection.connection_made(transport)
    sent = bytearray()

    async def settle() -> None:
        for _ in range(4):
            await asyncio.sleep(0)

    for step in scenario.steps:
        if isinstance(step, bytes):
            if transport.closing:
                continue  # a closed socket reads nothing more
            sent += step
            connection.data_received(step)
        elif step == "tick":
            await settle()
        elif step == "sweep":
            connection.sweep(loop.time())
        elif step == "goaway":
            connection.goaway()
        else:
            loop.now += float(step)
            await settle()
        check_books(connection, transport, pool)
        if held:
            check_held(connection, transport)
    await settle()
    loop.now += 2 * ep.LINGER_S + 1  # every linger ends, every late answer comes
    await settle()
    check_books(connection, transport, pool)
    frames, rest = parse(b"".join(transport.writes))
    assert not rest, f"the server wrote a partial frame: {rest!r}"
    return Trace(frames, bytes(sent), transport, connection, len(closed), [], [])


def run(scenario: Scenario, held: bool = False) -> Trace:
    """Plays `scenario` against a fresh connection on a fresh loop. Raises what
    data_received or a check raised; the caller checks the Trace."""
    loop = VirtualLoop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    records = _Records()
    logger = logging.getLogger("coalesce")
    logger.addHandler(records)
    try:
        trace = loop.run_until_complete(_drive(scenario, loop, held))
    finally:
        logger.removeHandler(records)
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    failed = [r for r in records.records if "HTTP/2 connection failed" in r.getMessage()]
    return trace._replace(loop_errors=errors, internal_errors=failed)


def no_crash(trace: Trace) -> None:
    """The atheris oracle: no bug caught by data_received (GOAWAY INTERNAL_ERROR), none
    raised in a loop callback."""
    assert not trace.internal_errors, trace.internal_errors[0].exc_info
    assert not trace.loop_errors, trace.loop_errors
    for got in trace.frames:
        if got.kind == ep.GOAWAY:
            assert struct.unpack(">I", got.payload[4:8])[0] != ep.INTERNAL_ERROR, got


class _Peer(NamedTuple):
    """What the peer's frames allowed the server, at most (whether or not it read them
    all): bounds that hold for every prefix of them."""

    opened: set[int]  # stream ids it sent HEADERS on
    max_frame: int  # the largest SETTINGS_MAX_FRAME_SIZE it allowed
    max_window: int  # the largest SETTINGS_INITIAL_WINDOW_SIZE it set
    connection_credit: int  # WINDOW_UPDATE increments on stream 0
    stream_credit: dict[int, int]  # ... on each stream


def _peer(sent: bytes) -> _Peer:
    frames = parse(sent[len(ep.PREFACE) :])[0] if sent.startswith(ep.PREFACE) else []
    opened, max_frame, max_window, credit = set(), ep.MAX_FRAME, ep.DEFAULT_WINDOW, {}
    for got in frames:
        stream = got.stream & 0x7FFFFFFF
        if got.kind == ep.HEADERS:
            opened.add(stream)
        elif got.kind == ep.SETTINGS and not got.flags & ep.ACK:
            for pos in range(0, len(got.payload) - 5, 6):
                key, value = struct.unpack_from(">HI", got.payload, pos)
                if key == 5 and value < 1 << 24:
                    max_frame = max(max_frame, value)
                elif key == 4 and value <= ep.MAX_WINDOW:
                    max_window = max(max_window, value)
        elif got.kind == ep.WINDOW_UPDATE and len(got.payload) == 4:
            increment = int.from_bytes(got.payload, "big") & 0x7FFFFFFF
            credit[stream] = credit.get(stream, 0) + increment
    return _Peer(opened, max_frame, max_window, credit.pop(0, 0), credit)


def check_wire(trace: Trace) -> None:
    """What the server wrote is well-formed HTTP/2 (RFC 9113), within what the peer
    allowed; none of these is known broken."""
    no_crash(trace)
    transport, peer = trace.transport, _peer(trace.sent)
    for data in transport.writes:
        assert not parse(data)[1], f"a write that is not whole frames: {data!r}"
    assert not transport.after_close, f"written after close(): {transport.after_close}"
    assert transport.lost <= 1 and trace.closed_calls == transport.lost
    if transport.lost:
        assert trace.connection.closed.done()
    frames = trace.frames
    assert frames and frames[0].kind == ep.SETTINGS and not frames[0].flags & ep.ACK
    assert len(frames[0].payload) % 6 == 0
    sent_data: dict[int, int] = {}
    ended: set[int] = set()
    last_goaway = None
    for got in frames:
        kind, stream, size = got.kind, got.stream, len(got.payload)
        where = f"{got} (the peer sent {trace.sent!r})"
        assert size <= peer.max_frame, where
        assert not stream >> 31, where
        if kind in (ep.SETTINGS, ep.PING, ep.GOAWAY):
            assert not stream, where
        if kind in (ep.DATA, ep.HEADERS, ep.RST_STREAM):
            assert stream, where
        if kind == ep.SETTINGS:
            assert got is frames[0] or (got.flags == ep.ACK and not size), where
        elif kind == ep.PING:
            assert got.flags == ep.ACK and size == 8, where  # we only answer PINGs
        elif kind == ep.WINDOW_UPDATE:
            assert size == 4 and 0 < int.from_bytes(got.payload, "big") <= ep.MAX_WINDOW, where
        elif kind == ep.RST_STREAM:
            assert size == 4, where
        elif kind == ep.GOAWAY:
            assert size >= 8, where
            last = int.from_bytes(got.payload[:4], "big")
            assert not last >> 31, where
            last_goaway = last if last_goaway is None else min(last, last_goaway)
        elif kind in (ep.HEADERS, ep.DATA):
            assert stream % 2 and stream in peer.opened, (
                f"an answer on a stream never opened: {where}"
            )
            assert stream not in ended, f"a frame after our END_STREAM: {where}"
            if last_goaway is not None:
                assert stream <= last_goaway, where
            if got.flags & ep.END_STREAM:
                ended.add(stream)
            if kind == ep.HEADERS:
                assert got.flags & ep.END_HEADERS and not got.flags & ~0x5, where
            else:
                assert not got.flags & ~0x1, where
                sent_data[stream] = sent_data.get(stream, 0) + size
        else:
            raise AssertionError(f"a frame of a type we never send: {where}")
    # flow control: never more DATA than the windows the peer opened
    assert sum(sent_data.values()) <= ep.DEFAULT_WINDOW + peer.connection_credit
    for stream, size in sent_data.items():
        assert size <= peer.max_window + peer.stream_credit.get(stream, 0), (stream, size)


def check_closed_streams(trace: Trace) -> None:
    """RFC 9113 5.1, 5.4.2: once we reset a stream we send nothing more on it."""
    reset: set[int] = set()
    for got in trace.frames:
        if got.kind == ep.RST_STREAM:
            reset.add(got.stream)
        elif got.kind in (ep.HEADERS, ep.DATA):
            assert got.stream not in reset, (
                f"{got} after our RST_STREAM (the peer sent {trace.sent!r})"
            )


def check_resets_are_final(trace: Trace) -> None:
    """RFC 9113 5.1: after we send RST_STREAM, what the peer still sends on that stream
    (it was in flight) is ignored: no second RST_STREAM for it, no budget spent on it."""
    reset: set[int] = set()
    for got in trace.frames:
        if got.kind == ep.RST_STREAM:
            assert got.stream not in reset, (
                f"a second RST_STREAM on stream {got.stream} (the peer sent {trace.sent!r})"
            )
            reset.add(got.stream)


def check_goaway_last_stream(trace: Trace) -> None:
    """RFC 9113 6.8: the last stream id our GOAWAYs name never grows (the peer may have
    retried the streams above it elsewhere)."""
    last = None
    for got in trace.frames:
        if got.kind == ep.GOAWAY:
            named = int.from_bytes(got.payload[:4], "big")
            assert last is None or named <= last, (
                f"GOAWAY naming stream {named} after one naming {last} "
                f"(the peer sent {trace.sent!r})"
            )
            last = named


def check_quiet_after_goaway(trace: Trace) -> None:
    """After a connection error's GOAWAY (and FIN) we write nothing: asyncio's and
    uvloop's transports raise RuntimeError on a write after write_eof()."""
    error = None
    for got in trace.frames:
        assert error is None, f"{got} written after {error} (the peer sent {trace.sent!r})"
        if got.kind == ep.GOAWAY and int.from_bytes(got.payload[4:8], "big") != ep.NO_ERROR:
            error = got
    assert not trace.transport.after_eof, trace.transport.after_eof


def frames_one_input(data: bytes) -> None:
    """The frame-layer oracle (atheris): byte 0 picks the limits, the body limit and the
    app's answers; the rest, after the preface and an empty SETTINGS, is what the peer
    sends, cut into data_received calls at 0xfe 0xfe pairs. No bug escapes (no_crash),
    the books balance after every call (check_books), the wire is right (check_wire)."""
    if not data:
        return
    mode, rest = data[0], data[1:]
    answers = [Answer(), Answer(None, 40000), Answer(-1.0), Answer(0.5, 3, False)]
    chunks: list[bytes | str | float] = list(rest.split(b"\xfe\xfe"))
    chunks[0] = ep.PREFACE + b"\0\0\0\x04\0\0\0\0\0" + chunks[0]
    scenario = Scenario(
        steps=chunks,
        limits="tight" if mode & 1 else "default",
        max_body=100 if mode & 2 else 1 << 20,
        answers=answers[: 1 + (mode >> 2 & 3)],
    )
    check_wire(run(scenario))


def fuzz(target: str, argv: list[str]) -> None:
    """Runs one target under atheris (libFuzzer's `argv`). The caller imports
    coalesce.http2 inside atheris.instrument_imports first, for coverage."""
    import atheris

    test = hpack_one_input if target == "hpack" else frames_one_input
    atheris.Setup([sys.argv[0], *argv], test)
    atheris.Fuzz()
