"""ModelStreamInfer: a pipelined bidirectional stream over the same batchers.

The client keeps sending without waiting; each request joins its backend's
batcher like a unary call, and its answer (or its error, as that request's
error response) is written as soon as it is ready — or in request order for
routes marked `ordered`. A stream may have `max_stream_outstanding` unanswered
requests: beyond that Coalesce stops reading it, so HTTP/2 flow control pushes
back on the client and memory stays bounded however fast it sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
from coalesce.codecs import protowire, wire
from coalesce.core.router import Router
from coalesce.errors import CoalesceError, Internal

from .calls import Call

log = logging.getLogger("coalesce")
_DONE = object()


def stream_answer(body: bytes) -> bytes:
    """ModelStreamInferResponse {2: infer_response}."""
    return protowire.prefix(2, len(body)) + body


def stream_error(request, message: str) -> bytes:
    """ModelStreamInferResponse {1: error_message, 2: {model_name, id}} for one request."""
    body = protowire.strings((1, request.model_name), (3, request.id))
    return protowire.delimited(1, message.encode()) + protowire.delimited(2, body)


class StreamSession:
    """One ModelStreamInfer call: a reader task feeding batchers, this task writing answers."""

    def __init__(
        self,
        router: Router,
        prepare: Callable[[object, grpc.aio.ServicerContext], Call],
        context: grpc.aio.ServicerContext,
    ) -> None:
        self.router = router
        self.prepare = prepare
        self.context = context
        self.limit = self.router.config.max_stream_outstanding
        self.outstanding = 0
        self.room = asyncio.Event()
        self.room.set()
        self.out: asyncio.Queue = asyncio.Queue()
        self.in_order: dict[str, deque] = {}

    async def run(self, requests: AsyncIterator) -> AsyncIterator[bytes]:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        reading = True
        try:
            while reading or self.outstanding:
                item = await self.out.get()
                if item is _DONE:
                    reading = False
                    continue
                yield item
                self.outstanding -= 1
                if self.outstanding < self.limit:
                    self.room.set()
        finally:
            reader.cancel()

    async def _read(self, requests: AsyncIterator) -> None:
        try:
            async for request in requests:
                if self.outstanding >= self.limit:
                    self.room.clear()
                    await self.room.wait()
                self.outstanding += 1
                self._start(request)
        finally:
            self.out.put_nowait(_DONE)

    def _start(self, request) -> None:
        if isinstance(request, CoalesceError):  # bytes that were no message (wire.parser)
            self.out.put_nowait(stream_error(wire.ModelInferRequest(), request.message))
            return
        try:
            call = self.prepare(request, self.context)
            future = call.backend.submit(call.request)
        except CoalesceError as exc:
            self.out.put_nowait(stream_error(request, exc.message))
            return
        except Exception as exc:  # a bug must not lose the request: it is counted outstanding
            log.exception("bug starting a streamed request")
            self.out.put_nowait(stream_error(request, f"{type(exc).__name__}: {exc}"))
            return
        if self.router.ordered(request.model_name):
            queue = self.in_order.setdefault(request.model_name, deque())
            queue.append((request, call, future))
            future.add_done_callback(lambda _: self._flush(queue))
        else:
            future.add_done_callback(
                lambda _: self.out.put_nowait(self._answer(request, call, future))
            )

    def _flush(self, queue: deque) -> None:
        while queue and queue[0][2].done():
            self.out.put_nowait(self._answer(*queue.popleft()))

    def _answer(self, request, call: Call, future: asyncio.Future) -> bytes:
        try:
            outputs = future.result()
            return stream_answer(call.answer(request, outputs))
        except asyncio.CancelledError:
            return stream_error(request, "cancelled")
        except CoalesceError as exc:
            return stream_error(request, exc.message)
        except Exception as exc:  # a bug must not stall the stream
            return stream_error(request, Internal(f"{type(exc).__name__}: {exc}").message)
