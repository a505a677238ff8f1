"""A feasibility probe, NOT a server: what answering gRPC unary calls costs when the
HTTP/2 framing is done in Python on uvloop instead of by grpc.aio.

It answers every call with the same pre-serialized ModelInferResponse, like
benchmarks/empty_server.py, but it does not decode header blocks (no HPACK: every
stream is taken to be ModelInfer), keeps no per-stream state, ignores flow control
beyond opening its windows wide and never parses the request. A real front end
adds those (a header-block cache makes HPACK cheap: clients repeat their blocks),
the protobuf parse and Coalesce's own handler. What this measures is the floor
that grpc.aio's C core, poller thread and Cython glue sit on top of.

    python -m benchmarks.h2_probe PORT RESPONSE_FILE
"""

from __future__ import annotations

import asyncio
import struct
import sys

import uvloop

PREFACE_SIZE = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 4, 6, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
WIDE = 1 << 30  # our receive windows: never the limit here

# HPACK (RFC 7541): ":status: 200" is static entry 8; content-type is static name 31,
# sent as a literal without indexing; grpc-status a literal with a new name.
STATUS_BLOCK = b"\x88\x0f\x10\x10application/grpc"
TRAILER_BLOCK = b"\x00\x0bgrpc-status\x010"


def head(kind: int, flags: int, size: int) -> bytes:
    """A frame header up to the stream id: 24-bit length, type, flags."""
    return size.to_bytes(3, "big") + bytes((kind, flags))


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return head(kind, flags, len(payload)) + stream.to_bytes(4, "big") + payload


class Probe(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        message = b"\x00" + len(response).to_bytes(4, "big") + response  # gRPC framing
        # an answer is these three frames with the stream id after each header
        self.parts = (
            (head(HEADERS, END_HEADERS, len(STATUS_BLOCK)), STATUS_BLOCK),
            (head(DATA, 0, len(message)), message),
            (head(HEADERS, END_HEADERS | END_STREAM, len(TRAILER_BLOCK)), TRAILER_BLOCK),
        )
        self.pending = b""
        self.started = False
        self.received = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        settings = struct.pack(">HIHI", 0x4, WIDE, 0x3, 1000)  # INITIAL_WINDOW_SIZE, streams
        window = frame(WINDOW_UPDATE, 0, 0, WIDE.to_bytes(4, "big"))
        transport.write(frame(SETTINGS, 0, 0, settings) + window)

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        pos, end, out = 0, len(buf), []
        if not self.started:
            if end < PREFACE_SIZE:
                self.pending = buf
                return
            pos, self.started = PREFACE_SIZE, True
        while end - pos >= 9:
            stop = pos + 9 + int.from_bytes(buf[pos : pos + 3], "big")
            if stop > end:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            if kind == DATA:
                self.received += stop - pos - 9
                if flags & END_STREAM:  # the request is complete: answer it
                    stream = buf[pos + 5 : pos + 9]
                    for header, payload in self.parts:
                        out += (header, stream, payload)
            elif kind == SETTINGS and not flags & ACK:
                out.append(frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, buf[pos + 9 : stop]))
            pos = stop
        self.pending = buf[pos:]
        if self.received > WIDE // 2:
            out.append(frame(WINDOW_UPDATE, 0, 0, self.received.to_bytes(4, "big")))
            self.received = 0
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int, response: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Probe(response), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    from pathlib import Path

    uvloop.run(serve(int(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
