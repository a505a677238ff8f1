"""gRPC over coalesce.http2.server: unary and streaming calls, compression, health.

It serves the very handlers the grpc.aio listener serves (KServe, TF Serving, health),
looked up through the same generic handlers, with a context that offers what they
use: time_remaining, invocation_metadata, abort, auth_context, peer, write. A call's
headers are read when its HEADERS arrive: an unknown method is answered at once, a
streaming one starts its handler at once and reads its messages as they come (each
credited to the sender only once the handler has taken it), a unary one waits for
its whole message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from typing import Any, NamedTuple, Protocol

import grpc

from .endpoint import Stream
from .hpack import literal
from .limits import Limits
from .server import Listener, ServerConnection

log = logging.getLogger("coalesce")

# Our header blocks, from HPACK's static table and literals without indexing (no
# dynamic table: nothing to keep in step with the peer's decoder).
STATUS_200 = b"\x88"  # static entry 8
GRPC_CONTENT_TYPE = b"\x0f\x10\x10application/grpc"  # static name 31, literal value
ENCODINGS = ("identity", "deflate", "gzip")
ACCEPT_ENCODING = literal(b"grpc-accept-encoding", ",".join(ENCODINGS).encode())
RESPONSE_HEADERS = STATUS_200 + GRPC_CONTENT_TYPE + ACCEPT_ENCODING
OK_TRAILERS = b"\x00\x0bgrpc-status\x010"
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
HIDDEN = frozenset(("te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"))
_WBITS = {"gzip": 31, "deflate": 15}
_INLINE_INFLATE = 1 << 16  # compressed messages larger than this inflate off the loop


def _percent(message: str) -> bytes:
    """grpc-message's percent-encoding: printable ASCII but '%' as is, the rest %XX."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode()
    )


def status_trailers(code: grpc.StatusCode, message: str) -> bytes:
    block = literal(b"grpc-status", str(code.value[0]).encode())
    if message:
        block += literal(b"grpc-message", _percent(message))
    return block


class Abort(Exception):
    """context.abort(): the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    """What our handlers use of grpc.aio.ServicerContext."""

    __slots__ = ("_auth", "_deadline", "_metadata", "_peer", "_time", "writer")

    def __init__(self, deadline: float | None, metadata: tuple, peer: str, time, auth) -> None:
        self._deadline, self._metadata, self._peer, self._time = deadline, metadata, peer, time
        self._auth = auth
        self.writer: Any = None  # a streaming call's: sends one response message

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - self._time(), 0.0)

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def auth_context(self) -> dict:
        return self._auth  # the client certificate's names under mutual TLS, else empty

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Abort(code, details)

    async def write(self, message: Any) -> None:
        await self.writer(message)


class Begin(Protocol):
    """A unary method our listener may serve without a task (GrpcApp `fast`). It starts
    the call at once and returns (future, finish): the answer's bytes are finish(future)
    once the future is done. Or a coroutine of the answer's bytes, run in a task; or
    None: the handler serves the call. A failed call raises Abort, from any of them."""

    def __call__(
        self, request: Any, context: Context
    ) -> tuple[asyncio.Future, Callable[[asyncio.Future], bytes]] | Coroutine | None: ...


class _Details(NamedTuple):  # grpc.HandlerCallDetails, for generic handlers' service()
    method: str
    invocation_metadata: tuple


class _Plain(NamedTuple):  # the HTTP answer to a request that is no gRPC call
    status: bytes
    text: bytes


class Call:
    """What a call's HEADERS said, kept on its stream until the body has come."""

    __slots__ = ("begin", "context", "deadline", "encoding", "handler", "messages", "started")

    def __init__(
        self,
        handler: Any,
        context: Context,
        deadline: float | None,
        encoding: str,
        begin: Begin | None = None,
    ):
        self.handler, self.context, self.deadline, self.encoding = (
            handler,
            context,
            deadline,
            encoding,
        )
        self.begin = begin
        self.messages: Messages | None = None
        self.started = False  # response HEADERS sent: the status goes in trailers


class Messages:
    """A streaming call's request messages, as its handler reads them (`async for`).

    Each message is credited to the sender (stream and connection windows) only when
    the handler takes it, so a handler that stops reading stops the sender.
    """

    def __init__(self, connection: ServerConnection, stream: Stream, app: GrpcApp) -> None:
        self.connection, self.stream, self.app = connection, stream, app
        self.queue: deque[tuple[int, int, bytes]] = deque()  # (wire size, flag, message)
        self.ended = False
        self.error: Abort | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, size: int, flag: int, message: bytes) -> None:
        self.queue.append((size, flag, message))
        self._wake()

    def end(self, error: Abort | None = None) -> None:
        self.ended, self.error = True, self.error or error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> Any:
        while not self.queue:
            if self.error is not None:
                raise self.error
            if self.ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        size, flag, message = self.queue.popleft()
        self.connection.consume(self.stream, size)
        call = self.stream.call
        return await self.app.decode(call.handler, message, flag, call.encoding)

    async def single(self) -> Any:
        """A server-streaming call's one request."""
        async for message in self:
            return message
        raise Abort(grpc.StatusCode.INTERNAL, "the call ended without its request message")


class GrpcApp:
    """Turns HTTP/2 requests into calls of our gRPC handlers."""

    def __init__(
        self,
        handlers: Iterable[grpc.GenericRpcHandler],
        max_message: int,
        fast: dict[str, Begin] | None = None,
    ) -> None:
        self._handlers = list(handlers)
        self._fast = dict(fast or {})
        self._methods: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self.max_message = max_message
        self.tasks: set[asyncio.Task] = set()

    def _method(self, path: str) -> Any:
        try:
            return self._methods[path]
        except KeyError:
            pass
        found = None
        for handler in self._handlers:
            found = handler.service(_Details(path, ()))
            if found is not None:
                break
        if len(self._methods) < 1024:  # unknown paths are cached too, within reason
            self._methods[path] = found
        return found

    def opened(self, connection: ServerConnection, stream: Stream) -> None:
        """HEADERS opened a call: answer it at once if it cannot be served, start it at
        once if it streams, else keep what they said until its message has come."""
        path = method = content_type = timeout = encoding = ""
        metadata = []
        for name, value in stream.headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = value
            elif name == "grpc-encoding":
                encoding = value
            elif name not in HIDDEN:
                if name.endswith("-bin"):
                    try:
                        value = base64.b64decode(value + "==")  # type: ignore[assignment]
                    except binascii.Error:
                        self._fail(
                            stream,
                            connection,
                            grpc.StatusCode.INTERNAL,
                            f"metadata {name} is not base64",
                        )
                        return
                metadata.append((name, value))
        if method != "POST":  # no gRPC call: answered once the request is complete
            stream.call = _Plain(b"405", b"a gRPC server: calls are POST requests\n")
            return
        if not content_type.startswith("application/grpc"):
            stream.call = _Plain(b"415", b"a gRPC server: content-type application/grpc\n")
            return
        handler = self._method(path)
        error = None
        if handler is None:
            error = (grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
        elif encoding and encoding not in _WBITS and encoding != "identity":
            error = (
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding} is not supported ({', '.join(ENCODINGS)})",
            )
        deadline = None
        if timeout and error is None:
            try:
                deadline = self._loop.time() + int(timeout[:-1]) * TIMEOUT_UNITS[timeout[-1]]
            except (KeyError, ValueError):
                error = (grpc.StatusCode.INTERNAL, f"malformed grpc-timeout '{timeout}'")
        if error is not None:
            self._fail(stream, connection, *error)
            return
        context = Context(
            deadline, tuple(metadata), connection.peer, self._loop.time, connection.auth
        )
        call = stream.call = Call(handler, context, deadline, encoding, self._fast.get(path))
        stream.framed = True
        if handler.request_streaming or handler.response_streaming:
            stream.streaming = True
            call.messages = Messages(connection, stream, self)
            self._start(connection, stream, self._streaming(connection, stream, call))

    def request(self, connection: ServerConnection, stream: Stream) -> None:
        """A unary call's whole message has come."""
        if type(stream.call) is _Plain:
            _plain(connection, stream, *stream.call)
            return
        if stream.too_big:
            self._fail(
                stream,
                connection,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message larger than max ({self.max_message} bytes)",
            )
            return
        body = stream.whole()
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._fail(
                stream, connection, grpc.StatusCode.INTERNAL, "the request is not one gRPC message"
            )
            return
        connection.ready.append((stream, body[5:], body[0]))  # started by start()

    def start(self, connection: ServerConnection, stream: Stream, message: bytes, flag: int):
        """A unary call whose request the parser has passed (ServerConnection.start_ready)."""
        call = stream.call
        if call.begin is not None and not flag:
            try:
                deserialize = call.handler.request_deserializer
                begun = call.begin(deserialize(message) if deserialize else message, call.context)
            except Abort as abort:
                self._fail(stream, connection, abort.code, abort.details)
                return
            except Exception as exc:
                self._bug(stream, connection, call.handler, exc)
                return
            if type(begun) is tuple:
                future, finish = begun
                stream.task = future
                future.add_done_callback(partial(self._settle, connection, stream, finish))
                self._expire_at(connection, stream, future)
                return
            if begun is not None:
                self._start(connection, stream, self._answer(connection, stream, begun))
                return
        work = self._unary(call, message, flag)
        self._start(connection, stream, self._answer(connection, stream, work))

    def _settle(self, connection, stream, finish, future: asyncio.Future) -> None:
        """A Begin's call is done."""
        if future.cancelled():
            return  # reset by the peer, its deadline passed (_expire answered), or shutdown
        try:
            data = finish(future)
        except Abort as abort:
            self._fail(stream, connection, abort.code, abort.details)
            return
        except Exception as exc:
            self._bug(stream, connection, stream.call.handler, exc)
            return
        _respond(connection, stream, data)

    def data(self, connection: ServerConnection, stream: Stream, end: bool) -> None:
        """More of a streaming call's body: complete messages go to its reader."""
        messages, body = stream.call.messages, stream.body
        while len(body) >= 5:
            size = int.from_bytes(body[1:5], "big")
            if size > self.max_message:
                messages.end(
                    Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request message larger than max ({self.max_message} bytes)",
                    )
                )
                stream.too_big = True
                body.clear()
                connection.release(stream)
                return
            if len(body) < 5 + size:
                break
            messages.put(5 + size, body[0], bytes(body[5 : 5 + size]))
            del body[: 5 + size]
        if end:
            partial = Abort(grpc.StatusCode.INTERNAL, "the request ended inside a message")
            messages.end(partial if body else None)

    def _start(self, connection: ServerConnection, stream: Stream, coroutine) -> None:
        task = self._loop.create_task(coroutine)
        stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self._expire_at(connection, stream, task)

    def _expire_at(self, connection, stream, future: asyncio.Future) -> None:
        deadline = stream.call.deadline
        if deadline is not None:
            timer = self._loop.call_at(deadline, self._expire, connection, stream)
            future.add_done_callback(lambda _: timer.cancel())

    async def decode(self, handler: Any, message: bytes, flag: int, encoding: str) -> Any:
        if flag:
            message = await self._inflate(message, encoding)
        deserialize = handler.request_deserializer
        return deserialize(message) if deserialize else message

    async def _inflate(self, data: bytes, encoding: str) -> bytes:
        """A compressed message, never inflated past max_message (a zip bomb stops there);
        big ones off the loop, as zlib lets go of the GIL."""
        wbits = _WBITS.get(encoding)
        if wbits is None:
            raise Abort(
                grpc.StatusCode.INTERNAL,
                f"a compressed message with grpc-encoding '{encoding or 'identity'}'",
            )
        limit = self.max_message

        def inflate() -> bytes:
            inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(data, limit + 1)
            except zlib.error as exc:
                raise Abort(grpc.StatusCode.INTERNAL, f"{encoding} message: {exc}") from None
            if len(out) > limit:
                raise Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request message larger than max ({limit} bytes) once inflated",
                )
            if not inflater.eof:
                raise Abort(grpc.StatusCode.INTERNAL, f"a truncated {encoding} message")
            return out

        return await asyncio.to_thread(inflate) if len(data) > _INLINE_INFLATE else inflate()

    async def _unary(self, call: Call, message: bytes, flag: int) -> bytes:
        handler = call.handler
        if flag:
            message = await self._inflate(message, call.encoding)
        deserialize = handler.request_deserializer
        request = deserialize(message) if deserialize else message
        response = await handler.unary_unary(request, call.context)
        serialize = handler.response_serializer
        return serialize(response) if serialize else response

    async def _answer(self, connection, stream, work: Coroutine) -> None:
        """A unary call's answer: what `work` returns, or its error's status."""
        try:
            data = await work
        except Abort as abort:
            self._fail(stream, connection, abort.code, abort.details)
            return
        except asyncio.CancelledError:
            return  # reset by the peer, its deadline passed (_expire answered), or shutdown
        except Exception as exc:
            self._bug(stream, connection, stream.call.handler, exc)
            return
        _respond(connection, stream, data)

    async def _streaming(self, connection, stream, call: Call) -> None:
        handler, context = call.handler, call.context
        serialize = handler.response_serializer

        async def write(response: Any) -> None:
            if not connection.is_open(stream):
                return
            data = serialize(response) if serialize else response
            if not call.started:
                call.started = True
                connection.send_headers(stream, RESPONSE_HEADERS)
            connection.send_data(stream, b"\x00" + len(data).to_bytes(4, "big") + data)
            await connection.drained(stream)  # a peer that does not read stops the handler

        context.writer = write
        try:
            request = call.messages if handler.request_streaming else await call.messages.single()
            if not handler.response_streaming:
                await write(await handler.stream_unary(request, context))
            else:
                behavior = (
                    handler.stream_stream if handler.request_streaming else handler.unary_stream
                )
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        await write(response)
                else:
                    await result  # it wrote with context.write()
        except Abort as abort:
            self._fail(stream, connection, abort.code, abort.details)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            self._bug(stream, connection, handler, exc)
            return
        self._fail(stream, connection, grpc.StatusCode.OK, "")

    def _bug(self, stream: Stream, connection: ServerConnection, handler, exc: Exception) -> None:
        log.error("bug answering %s", handler, exc_info=exc)
        self._fail(stream, connection, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")

    def _expire(self, connection: ServerConnection, stream: Stream) -> None:
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
            self._fail(stream, connection, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    @staticmethod
    def _fail(stream: Stream, connection: ServerConnection, code, message: str) -> None:
        """End the call with `code`: in trailers after a started response, else alone."""
        trailers = OK_TRAILERS if code is grpc.StatusCode.OK else status_trailers(code, message)
        call = stream.call
        if type(call) is Call and call.started:
            if connection.is_open(stream):
                connection.finish(stream, trailers)
        else:
            connection.answer_headers_only(stream, RESPONSE_HEADERS + trailers)


def _respond(connection: ServerConnection, stream: Stream, data: bytes) -> None:
    framed = b"\x00" + len(data).to_bytes(4, "big") + data
    connection.answer(stream, RESPONSE_HEADERS, framed, OK_TRAILERS)


def _plain(connection: ServerConnection, stream: Stream, status: bytes, text: bytes) -> None:
    """An HTTP answer with a body for what is no gRPC call (a browser, curl, a prober)."""
    headers = literal(b":status", status) + literal(b"content-type", b"text/plain")
    connection.answer(stream, headers, text, None)


class NativeServer:
    """The gRPC listener: a Listener of our HTTP/2 serving the gRPC handlers."""

    def __init__(
        self,
        handlers: Iterable[grpc.GenericRpcHandler],
        max_message: int,
        limits: Limits | None = None,
        fast: dict[str, Begin] | None = None,
    ) -> None:
        self.app = GrpcApp(handlers, max_message, fast)
        self.listener = Listener(self.app, max_message + 5, limits or Limits())
        self.port = 0

    @property
    def connections(self) -> set[ServerConnection]:
        return self.listener.connections

    async def start(
        self,
        address: str,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        identify: Callable | None = None,
    ) -> int:
        self.port = await self.listener.start(address, reuse_port, tls, identify)
        return self.port

    async def stop(self, grace: float) -> None:
        """GOAWAY to every connection; what is in flight has `grace` seconds to finish."""
        await self.listener.stop(grace)
        for task in list(self.app.tasks):
            task.cancel()
        self.listener.abort()
