"""Smart batching: one scheduler per backend, shared by every route that reaches it.

Whenever the backend has a free dispatch slot and rows are queued, whatever is
queued goes out at once (up to the batch limit). Nothing waits on a timer unless
`max_delay_ms` asks for it, so a lone request leaves immediately and, under load,
each batch holds what arrived during the previous call. The scheduler sleeps on an
event, never polls, and every caller's future gets a result or an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from coalesce.config import Batching
from coalesce.errors import (
    CoalesceError,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from coalesce.telemetry.logs import RateLimited
from coalesce.telemetry.metrics import BackendStats

from . import batching, forwarding

if TYPE_CHECKING:
    from coalesce.telemetry.tracing import BatchSpans, Tracer
from .request import InferRequest, Tensors

log = logging.getLogger("coalesce")

Call = Callable[[Tensors, float | None], Awaitable[Tensors]]

ISOLATE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Failures that one bad request can cause for its whole batch (not UNAVAILABLE etc.)."""
"""An adapter's batch method: (inputs, timeout in seconds or None) -> outputs."""


class _Pending:
    """A caller's request in the queue; a large one is taken in several slices."""

    __slots__ = ("arrived", "done_rows", "future", "parts", "request", "taken")

    def __init__(self, request: InferRequest, future: asyncio.Future, arrived: float) -> None:
        self.request = request
        self.future = future
        self.arrived = arrived
        self.taken = 0
        self.done_rows = 0
        self.parts: dict[int, Tensors] = {}


_Slice = tuple[_Pending, int, int]


class Batcher:
    """Queues requests for one backend and sends them to it in batches."""

    def __init__(
        self,
        name: str,
        call: Call,
        policy: Batching,
        *,
        timeout_s: float | None = None,
        call_keeps_timeout: bool = False,
        backend_limit: Callable[[], int | None] = lambda: None,
        stats: BackendStats | None = None,
    ) -> None:
        """`call_keeps_timeout`: the call enforces its `timeout` argument itself (a gRPC
        deadline), so it is not also wrapped in asyncio.wait_for, a task per call."""
        self.name = name
        self._call = call
        self._policy = policy
        self._timeout_s = timeout_s
        self._call_keeps_timeout = call_keeps_timeout
        self._backend_limit = backend_limit
        self.stats = stats or BackendStats()
        self.tracer: Tracer | None = None  # set by the router when tracing is on
        self._log = RateLimited(log)
        self._queues: dict[tuple, deque[_Pending]] = {}
        self._queued = 0
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._settled = asyncio.Event()  # set whenever a call finishes (for drain)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task | None = None
        self._closed = False

    @property
    def max_queue(self) -> int:
        """Most rows that may wait; a submit beyond is RESOURCE_EXHAUSTED."""
        return self._policy.max_queue

    @property
    def queued_rows(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._runner = self._loop.create_task(self._run(), name=f"batcher:{self.name}")

    def submit(self, request: InferRequest, key: tuple | None = None) -> asyncio.Future[Tensors]:
        """Queue a request; the future resolves to its own rows of every output.

        `key` is the request's `batching.signature`, if the caller has it already.
        """
        if self._closed:
            raise Unavailable(f"backend '{self.name}' is shutting down")
        limit = self._policy.max_queue
        if request.rows > limit:
            raise ResourceExhausted(
                f"request has {request.rows} rows, more than backend '{self.name}' queues "
                f"(max_queue {limit})"
            )
        if self._queued + request.rows > limit:
            raise ResourceExhausted(
                f"backend '{self.name}' queue is full ({self._queued} of {limit} rows); retry later"
            )
        loop = self._loop
        future = loop.create_future()
        key = key or batching.signature(request.inputs)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(_Pending(request, future, loop.time()))
        self._queued += request.rows
        self._wakeup.set()
        return future

    async def infer(self, request: InferRequest, key: tuple | None = None) -> Tensors:
        """Like `await submit(...)`, but an idle backend gets the request directly.

        With nothing queued and a free slot, the caller's own task makes the call:
        no hop through the scheduler task and no future, which is what a lone
        request at light load should cost. Anything that arrives meanwhile queues
        and the scheduler sends it when the slot frees.
        """
        if not self.takes_directly(request):
            return await self.submit(request, key)
        self._in_flight += 1
        try:
            pending = _Pending(request, None, self._loop.time())  # type: ignore[arg-type]
            slices = [(pending, 0, request.rows)]
            outputs = await self._call_backend(slices)
            return batching.split(outputs, [request.rows], self.name)[0]
        except CoalesceError as exc:
            raise self._failed(request.rows, exc) from None
        except Exception as exc:
            raise self._failed(request.rows, exc) from exc
        finally:
            self._in_flight -= 1
            if self._queued:  # else the scheduler has nothing to do: let it sleep
                self._wakeup.set()
            self._settled.set()

    def takes_directly(self, request: InferRequest) -> bool:
        """Whether infer() would call the backend at once, in the caller's task."""
        policy = self._policy
        if self._queued or self._in_flight >= policy.max_in_flight or self._closed:
            return False
        return not policy.max_delay_ms and request.rows <= self.capacity()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to `timeout` s for the queued and in-flight ones."""
        self._closed = True
        until = self._loop.time() + timeout
        while self._queued or self._in_flight:
            left = until - self._loop.time()
            if left <= 0:
                return
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), left)
            except TimeoutError:
                return

    def shed(self, error: CoalesceError) -> None:
        """Answer every queued request with `error` now (the scheduler drops them when it
        next takes from the queue); for a backend known to be down."""
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(error)

    async def close(self) -> None:
        """Stop at once: anything still queued or in flight is answered UNAVAILABLE."""
        self._closed = True
        tasks = [*self._tasks, *([self._runner] if self._runner else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        """With one dispatch slot the batch is awaited right here: no task per batch."""
        concurrent = self._policy.max_in_flight > 1
        try:
            while True:
                try:
                    slices = await self._collect()
                except Exception as exc:  # user code it runs (a limit) or a bug: answer,
                    self._fail_queued(self._failed(self._queued, exc))  # go on serving
                    continue
                self._in_flight += 1
                if not concurrent:
                    await self._dispatch(slices)
                    continue
                task = self._loop.create_task(self._dispatch(slices))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self._fail_queued(Unavailable(f"backend '{self.name}' is shutting down"))

    async def _collect(self) -> list[_Slice]:
        """The next batch, once rows are queued and a dispatch slot is free."""
        limit = self._policy.max_in_flight
        while True:
            while not self._queued or self._in_flight >= limit:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._policy.max_delay_ms > 0:
                await self._linger()
            slices = self._take()
            if slices:
                return slices

    def capacity(self) -> int:
        """The most rows one backend call may carry now (policy and backend limits)."""
        limit = self._backend_limit()
        cap = self._policy.max_batch_size
        return min(cap, limit) if limit else cap

    async def _linger(self) -> None:
        """Wait up to max_delay_ms after the oldest queued request for a fuller batch."""
        loop = self._loop
        oldest = min(q[0].arrived for q in self._queues.values() if q)
        until = oldest + self._policy.max_delay_ms / 1000
        while self._queued < self.capacity() and loop.time() < until:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), until - loop.time())
            except TimeoutError:
                return

    def _take(self) -> list[_Slice]:
        """Up to a batch of rows from the queue whose head waited longest."""
        key = min(self._queues, key=lambda k: self._queues[k][0].arrived)
        queue = self._queues[key]
        room, now, slices = self.capacity(), self._loop.time(), []
        while queue and room:
            pending = queue[0]
            request = pending.request
            if pending.future.done() or (request.deadline is not None and request.deadline <= now):
                queue.popleft()
                self._queued -= request.rows - pending.taken
                if not pending.future.done():
                    pending.future.set_exception(
                        DeadlineExceeded(f"deadline passed while queued for backend '{self.name}'")
                    )
                continue
            if not pending.taken:
                self.stats.queue_wait.observe(now - pending.arrived)
            count = min(request.rows - pending.taken, room)
            slices.append((pending, pending.taken, pending.taken + count))
            pending.taken += count
            room -= count
            self._queued -= count
            if pending.taken == request.rows:
                queue.popleft()
        if not queue:
            del self._queues[key]
        return slices

    def _timeout(self, slices: list[_Slice]) -> float | None:
        """The backend call may last until the latest caller's deadline (and timeout_ms)."""
        deadlines = [p.request.deadline for p, _, _ in slices]
        timeout = self._timeout_s
        if None not in deadlines:
            left = max(max(deadlines) - self._loop.time(), 0.0)  # type: ignore[type-var]
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    async def _dispatch(self, slices: list[_Slice]) -> None:
        try:
            await self._attempt(slices)
        except asyncio.CancelledError:
            self._fail(slices, Unavailable(f"backend '{self.name}' is shutting down"))
            raise
        finally:
            self._in_flight -= 1
            self._wakeup.set()
            self._settled.set()

    async def _attempt(self, slices: list[_Slice]) -> None:
        """Run a batch; if it fails in a way one bad request can cause, split and retry.

        Halving isolates the offending requests in at most 2n-1 calls for n requests,
        so the good requests that shared their batch still get their answers.
        """
        try:
            outputs = await self._call_backend(slices)
            batching.check_rows(outputs, sum(b - a for _, a, b in slices), self.name)
        except Exception as exc:
            code = exc.code if isinstance(exc, CoalesceError) else grpc.StatusCode.INTERNAL
            if code in ISOLATE and len(slices) > 1:
                self.stats.retries += 2
                half = len(slices) // 2
                await self._attempt(slices[:half])
                await self._attempt(slices[half:])
                return
            self._fail(slices, self._failed(sum(b - a for _, a, b in slices), exc))
        else:  # after this step, which sends the next batch: the backend is not kept idle
            self._loop.call_soon(self._split, slices, outputs)  # while callers are answered

    def _split(self, slices: list[_Slice], outputs: Tensors) -> None:
        start, sizes = time.perf_counter(), [b - a for _, a, b in slices]
        parts = batching.views(outputs, sizes)
        self.stats.split(sum(sizes), time.perf_counter() - start)
        self._deliver(slices, parts)

    async def _call_backend(self, slices: list[_Slice]) -> Tensors:
        # durations by the clock, not loop.time(): uvloop's ticks in whole milliseconds
        began = time.perf_counter()
        inputs = batching.merge([(p.request.inputs, a, b) for p, a, b in slices])
        timeout = self._timeout(slices)
        # the batch shares its forwarded metadata (the batching key); trace context: the first's
        metadata = slices[0][0].request.metadata
        stats, start = self.stats, time.perf_counter()
        rows = sum(b - a for _, a, b in slices)
        traced = self._trace(slices, self._loop.time()) if self.tracer is not None else None
        if traced is not None:  # the batch's own trace context replaces the caller's
            kept = tuple(p for p in metadata if p[0] not in forwarding.TRACE_CONTEXT)
            metadata = kept + traced.headers
        sent = forwarding.sending(metadata) if metadata else None
        parameters = slices[0][0].request.parameters  # shared: part of the batching key
        carried = forwarding.sending_parameters(parameters) if parameters else None
        call = self._call(inputs, timeout)
        stats.batch_size.observe(rows)
        error: BaseException | None = None
        try:
            if timeout is None or self._call_keeps_timeout:
                return await call
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            error = DeadlineExceeded(
                f"backend '{self.name}' did not answer within {timeout * 1000:.0f} ms"
            )
            raise error from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            end = time.perf_counter()
            stats.called(rows, len(slices), start - began, end - start, time.time())
            if sent is not None:
                forwarding.done(sent)
            if carried is not None:
                forwarding.done_parameters(carried)
            if traced is not None:
                traced.end(rows, error)

    def _trace(self, slices: list[_Slice], now: float) -> BatchSpans | None:
        """Queue and backend-call spans for the traced requests of this batch."""
        traced = [(p.request.span, now - p.arrived) for p, _, _ in slices if p.request.span]
        if not traced:
            return None
        return self.tracer.batch([s for s, _ in traced], [w for _, w in traced])

    def _failed(self, rows: int, exc: Exception) -> CoalesceError:
        """Log a failed backend call once; the error its callers get."""
        self.stats.error(exc.code.name if isinstance(exc, CoalesceError) else "INTERNAL")
        if isinstance(exc, CoalesceError):
            self._log.log(
                exc.code,
                logging.WARNING,
                "backend %s: %d rows failed: %s: %s",
                self.name,
                rows,
                exc.code.name,
                exc.message,
                extra={"backend": self.name, "status": exc.code.name},
            )
            return exc
        self._log.log(
            type(exc),
            logging.ERROR,
            "backend %s failed",
            self.name,
            exc_info=exc,
            extra={"backend": self.name, "status": "INTERNAL"},
        )
        return Internal(f"backend '{self.name}' failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _fail(slices: list[_Slice], error: CoalesceError) -> None:
        for pending, _, _ in slices:
            if not pending.future.done():
                pending.future.set_exception(error)

    @staticmethod
    def _deliver(slices: list[_Slice], parts: list[Tensors]) -> None:
        for (pending, start, stop), part in zip(slices, parts, strict=True):
            if pending.future.done():
                continue
            rows = pending.request.rows
            if stop - start == rows:
                pending.future.set_result(part)
                continue
            pending.parts[start] = part
            pending.done_rows += stop - start
            if pending.done_rows == rows:
                ordered = [pending.parts[k] for k in sorted(pending.parts)]
                pending.future.set_result(batching.join(ordered))

    def _fail_queued(self, error: CoalesceError) -> None:
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(error)
        self._queues.clear()
        self._queued = 0
