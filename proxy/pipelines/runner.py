"""A pipeline's loop: take what the inbox holds, infer it through the route's batcher,
publish the results, and only then commit.

Batching follows the backlog: a fetch returns whatever has arrived (up to
`max_in_flight`), and every message of it is submitted at once to the same batcher
gRPC and REST callers use, so a lone message goes at once and a backlog makes big
batches. Each batch's results are published as soon as it is answered (`ordering:
as_ready`), or the cycle's together in input order (`input`); its inputs are committed
once all are out. One cycle at a time: consuming resumes only once the last cycle's results
and offsets are committed, so a rebalance (which librdkafka runs inside the consume
call) never finds work in flight, and memory holds at most `max_in_flight` messages.

A message that cannot succeed (undecodable, INVALID_ARGUMENT from the model...) goes
to the dead-letter outbox and is committed; a transient failure (the backend
UNAVAILABLE, its queue full, a deadline) is retried with backoff and nothing is
committed meanwhile, so nothing is lost while a backend restarts.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from coalesce.config import Pipeline
from coalesce.core import batching
from coalesce.core.request import InferRequest
from coalesce.core.router import Backend, Router, StartupError
from coalesce.errors import CoalesceError, ResourceExhausted

from . import formats

log = logging.getLogger("coalesce")
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.NOT_FOUND,  # the route is gone for a reload's moment
    }
)
MAX_BACKOFF_S = 5.0
_LENGTH = formats.HEADER_LENGTH.lower()  # a result's own replaces its request's
_SIZE = len(_LENGTH)
CONNECTORS = {
    "kafka": ("coalesce.pipelines.kafka", "KafkaConnector", "kafka"),
    "redis": ("coalesce.pipelines.redis", "RedisConnector", "redis"),
    "nats": ("coalesce.pipelines.nats", "NatsConnector", "nats"),
}
"""source type -> (module, class, the `pip install coalesce[...]` extra it needs)."""


@dataclass(slots=True)
class Message:
    """One message taken from an inbox, with where it came from."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int | str  # a Redis entry id is a string
    ref: Any = None  # the connector's own handle (a NATS message to ack)

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(slots=True)
class Outgoing:
    """A result (or a rejected message, `dead`) to publish for one input message."""

    source: Message
    value: bytes
    headers: list[tuple[str, bytes]]
    dead: bool = False
    sent: bool = False  # published ahead of its cycle's commit (ordering: as_ready)


class Connector(Protocol):
    """A broker's side of a pipeline: one per pipeline and instance."""

    ready: bool
    partitions: list[int]  # the inbox's partitions (or shards) this instance reads
    lag: dict[int, int]  # partition -> messages not yet read

    async def start(self) -> None: ...

    async def fetch(self, limit: int, max_bytes: int) -> list[Message]:
        """What has arrived, up to `limit` messages and about `max_bytes` of values (the
        message that passes it is the last); waits a moment for one when none has."""

    async def publish(self, out: list[Outgoing]) -> None:
        """Publish results before their cycle commits (`ordering: as_ready`), marking
        each `sent` once it is. Where the broker acknowledges per message (Redis, NATS)
        their inputs are settled too."""

    async def complete(self, taken: list[Message], out: list[Outgoing]) -> None:
        """Publish what of `out` is not `sent` and commit `taken` (atomically where the
        broker can). Where a failure undoes what was sent early (an aborted
        transaction), the connector clears their `sent`, so a retry sends them again."""

    async def close(self) -> None: ...


class BrokerError(Exception):
    """The broker failed a fetch or a commit; `fatal` when retrying cannot help."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def member_name(name: str) -> str:
    """A name unique to this process in a consumer group: with `workers` > 1 each serving
    process runs its own consumer, so the worker's index is added (two members with one
    static id, or two producers with one transactional.id, would fence each other)."""
    index = os.environ.get("COALESCE_WORKER_INDEX")
    return name if index is None else f"{name}-w{index}"


def _connector_class(name: str, spec: Pipeline) -> type:
    module, cls, extra = CONNECTORS[spec.source.type]
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise StartupError(
            f"pipelines.{name}: a {spec.source.type} pipeline needs {exc.name}, which is not "
            f"installed: pip install 'coalesce[{extra}]'"
        ) from None
    connector: type = getattr(found, cls)
    return connector


def connector_for(name: str, spec: Pipeline) -> Connector:
    connector: Connector = _connector_class(name, spec)(name, spec)
    return connector


def missing_clients(specs: dict[str, Pipeline]) -> list[str]:
    """What stops these pipelines from starting here (a broker client not installed),
    so a reload can be refused before anything changes."""
    problems = []
    for name, spec in specs.items():
        try:
            _connector_class(name, spec)
        except StartupError as exc:
            problems.append(str(exc))
    return problems


class Pause:
    """Lets the event loop serve others (gRPC and REST callers, probes) while a cycle
    decodes or encodes a backlog: a yield after every so many messages or bytes.

    `due` is a plain call, the yield the caller's: an awaited check per message cost
    4% of a pipeline's samples (py-spy, kserve-proto)."""

    MESSAGES = 256
    BYTES = 1 << 20

    def __init__(self) -> None:
        self._messages = self._bytes = 0

    def due(self, size: int) -> bool:
        self._messages += 1
        self._bytes += size
        if self._messages >= self.MESSAGES or self._bytes >= self.BYTES:
            self._messages = self._bytes = 0
            return True
        return False


@dataclass
class Counters:
    consumed: int = 0
    published: int = 0
    dead_lettered: int = 0
    retried: int = 0
    cycles: int = 0
    last_cycle: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Runner:
    """One pipeline on this instance."""

    def __init__(self, name: str, spec: Pipeline, router: Router, connector: Connector) -> None:
        self.name = name
        self.spec = spec
        self.router = router
        self.connector = connector
        self.counters = Counters()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._max_bytes = int(spec.max_in_flight_mb * (1 << 20))
        self._layout = formats.layout(spec.format)

    @property
    def ready(self) -> bool:
        return self.connector.ready and not self._stopping

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, grace: float) -> None:
        """Stop consuming; the cycle in flight gets `grace` s to commit, then is abandoned
        (its messages are delivered again: at least once, or its transaction aborts)."""
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                log.warning("pipeline %s: the cycle in flight outlived the grace period", self.name)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        await self.connector.close()

    async def _connect(self) -> None:
        """Until the connector starts: a broker down at start is NOT_SERVING, not fatal."""
        delay = 0.5
        while not self._stopping:
            try:
                await self.connector.start()
                return
            except BrokerError as exc:
                if exc.fatal:
                    raise
                log.warning(
                    "pipeline %s: cannot start: %s (retry in %.1f s)", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _run(self) -> None:
        try:
            await self._connect()
        except BrokerError as exc:
            log.error("pipeline %s: stopped: %s", self.name, exc)
            self._stopping = True
            return
        delay = 0.1
        while not self._stopping:
            try:
                taken = await self.connector.fetch(self.spec.max_in_flight, self._max_bytes)
                if not taken:
                    continue
                out = await self._infer(taken)
                await self._commit(taken, out)
                delay = 0.1
            except BrokerError as exc:
                if exc.fatal:
                    log.error("pipeline %s: stopped: %s", self.name, exc)
                    self._stopping = True
                    return
                log.warning("pipeline %s: %s (retry in %.1f s)", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            except Exception:  # a bug must not end the pipeline silently
                log.exception("pipeline %s: cycle failed (retry in %.1f s)", self.name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _commit(self, taken: list[Message], out: list[Outgoing]) -> None:
        """Publish and commit, retrying a broker's transient failure: the results are
        in memory, so a retry publishes the same ones (an aborted transaction's are
        never seen by read_committed readers)."""
        delay = 0.1
        while True:
            try:
                await self.connector.complete(taken, out)
                break
            except BrokerError as exc:
                if exc.fatal or self._stopping:
                    raise
                log.warning(
                    "pipeline %s: commit failed: %s (retry in %.1f s)", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        counters = self.counters
        counters.consumed += len(taken)
        counters.dead_lettered += sum(o.dead for o in out)
        counters.published += sum(not o.dead for o in out)
        counters.cycles += 1
        counters.last_cycle = len(taken)

    async def _infer(self, taken: list[Message]) -> list[Outgoing]:
        """One Outgoing per message, in input order; transient failures retried."""
        out: list[Outgoing | None] = [None] * len(taken)
        decoded: dict[int, formats.Decoded] = {}
        pending = list(range(len(taken)))
        delay = 0.1
        while pending:
            retry = await self._attempt(taken, pending, decoded, out)
            if retry and not self._stopping:
                self.counters.retried += len(retry)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            elif retry:  # stopping: leave them uncommitted, to be delivered again
                raise BrokerError("stopping with messages the backend did not answer")
            pending = retry
        return [o for o in out if o is not None]

    async def _attempt(
        self,
        taken: list[Message],
        pending: list[int],
        decoded: dict[int, formats.Decoded],
        out: list[Outgoing | None],
    ) -> list[int]:
        """Settle each pending message (answered or dead-lettered); return those to retry.

        Messages that can share a batch go to the batcher as chunks of one batch each,
        not one by one: a backlog costs the batcher a future per batch instead of per
        message. A chunk the backend rejects is tried again message by message, so one
        bad message fails only itself (as the batcher's halving does for callers)."""
        try:
            backend = self.router.get(self.spec.route)
        except CoalesceError:
            return pending
        retry: list[int] = []
        chunks = await self._chunks(taken, pending, decoded, out, backend)
        alone = await self._submit(backend, chunks, taken, decoded, out, retry)
        if alone:
            await self._submit(backend, [[i] for i in alone], taken, decoded, out, retry)
        return sorted(retry)

    async def _chunks(
        self,
        taken: list[Message],
        pending: list[int],
        decoded: dict[int, formats.Decoded],
        out: list[Outgoing | None],
        backend: Backend,
    ) -> list[list[int]]:
        """Decode what is not yet decoded (the undecodable are dead letters) and cut the
        rest into chunks of at most one batch. Requests with parameters or a deadline
        travel alone: the batcher decides what they may share. Rows of one Known layout
        (messages shaped as one that passed the checks) are chunked together: each
        chunk's tensors are joined at once and its answers encoded together
        (kserve-proto: 43 -> 12-20 us a message in process, measured)."""
        route, kind, info = self.spec.route, self.spec.format, backend.info()
        batcher = backend.batcher
        capacity, max_queue = batcher.capacity(), batcher.max_queue
        groups: dict[tuple, list[int]] = {}
        chunks: list[list[int]] = []
        pause = Pause()
        for i in pending:
            if pause.due(len(taken[i].value)):
                await asyncio.sleep(0)
            if i not in decoded:
                try:
                    message = taken[i]
                    decoded[i] = formats.decode(
                        kind, message.value, message.headers, route, info, self._layout
                    )
                except CoalesceError as exc:
                    out[i] = self._dead(taken[i], exc)
                    continue
            this = decoded[i]
            request = this.request
            if this.rows > max_queue:  # would never fit
                error = ResourceExhausted(
                    f"request has {this.rows} rows, more than backend "
                    f"'{backend.name}' queues (max_queue {max_queue})"
                )
                out[i] = self._dead(taken[i], error)
            elif this.rows >= capacity or (
                request is not None and (request.parameters or request.deadline is not None)
            ):
                chunks.append([i])
            else:  # rows group by their Known layout (alike by it), the others by signature
                key = this.known or batching.signature(request.inputs)  # type: ignore[union-attr]
                groups.setdefault(key, []).append(i)
        for members in groups.values():
            chunk: list[int] = []
            rows = 0
            for i in members:
                count = decoded[i].rows
                if rows + count > capacity:
                    chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(i)
                rows += count
            chunks.append(chunk)
        return chunks

    async def _submit(
        self,
        backend: Backend,
        chunks: list[list[int]],
        taken: list[Message],
        decoded: dict[int, formats.Decoded],
        out: list[Outgoing | None],
        retry: list[int],
    ) -> list[int]:
        """Submit each chunk and settle its messages once answered, oldest first; return
        the members of chunks of several that failed for good (to be tried alone).

        At most half the batcher's queue is ours at a time (room for other callers):
        once that many chunks wait, the oldest is settled before the next goes in. With
        `ordering: as_ready` each settled chunk's results are published at once."""
        batcher = backend.batcher
        slots = max(1, batcher.max_queue // 2 // max(1, batcher.capacity()))
        waiting: deque[tuple[list[int], asyncio.Future[Any]]] = deque()
        alone: list[int] = []
        settle = _Settle(self, backend, taken, decoded, out, retry, alone)
        for chunk in chunks:
            if len(waiting) >= slots:
                await settle(*waiting.popleft())
            try:
                future = backend.submit(self._request(chunk, decoded))
            except CoalesceError as exc:
                self._failed(chunk, exc, taken, out, retry, alone)
                continue
            waiting.append((chunk, future))
        while waiting:
            await settle(*waiting.popleft())
        return alone

    async def _publish_early(self, items: list[Outgoing]) -> None:
        """Results out before their cycle commits; what the broker refuses now is left
        to `complete`, which publishes whatever is not yet `sent`."""
        if items:
            try:
                await self.connector.publish(items)
            except BrokerError as exc:
                log.debug("pipeline %s: early publish failed (left to commit): %s", self.name, exc)

    def _request(self, chunk: list[int], decoded: dict[int, formats.Decoded]) -> InferRequest:
        """One message's request, or a chunk's rows as one request."""
        route = self.spec.route
        known = decoded[chunk[0]].known
        if known is not None:  # the chunk's rows are all of this layout (_chunks)
            inputs = known.join([decoded[i].raws for i in chunk])  # type: ignore[misc]
            return InferRequest(inputs, known.rows * len(chunk), route=route)
        parts: list[InferRequest] = [decoded[i].request for i in chunk]  # type: ignore[misc]
        if len(parts) == 1:  # not rows of a Known layout: each has its request
            parts[0].route = route
            return parts[0]
        inputs = {n: np.concatenate([p.inputs[n] for p in parts]) for n in parts[0].inputs}
        return InferRequest(inputs, sum(p.rows for p in parts), route=route)

    def _failed(
        self,
        chunk: list[int],
        error: BaseException,
        taken: list[Message],
        out: list[Outgoing | None],
        retry: list[int],
        alone: list[int],
    ) -> None:
        """A transient failure is retried; a chunk's is tried message by message; a lone
        message's is its dead letter."""
        if not isinstance(error, CoalesceError) or error.code in TRANSIENT:
            retry.extend(chunk)
        elif len(chunk) > 1:
            alone.extend(chunk)
        else:
            out[chunk[0]] = self._dead(taken[chunk[0]], error)

    @staticmethod
    def _headers(
        message: Message, extra: list[tuple[str, bytes]], decoded: formats.Decoded
    ) -> list[tuple[str, bytes]]:
        """The request's own headers (for correlation), plus where it came from."""
        kept = [h for h in message.headers if len(h[0]) != _SIZE or h[0].lower() != _LENGTH]
        kept += extra
        kept.append(("coalesce-source", message.coordinates.encode()))
        if decoded.id:
            kept.append(("coalesce-request-id", decoded.id.encode()))
        return kept

    def _dead(self, message: Message, error: CoalesceError) -> Outgoing:
        code = error.code.name
        self.counters.errors[code] = self.counters.errors.get(code, 0) + 1
        if self.spec.dead_letter is None:
            log.warning(
                "pipeline %s: %s dropped (no dead_letter): %s: %s",
                self.name,
                message.coordinates,
                code,
                error.message,
            )
        headers = [
            *message.headers,
            ("coalesce-status", code.encode()),
            ("coalesce-error", error.message.encode(errors="replace")),
            ("coalesce-source", message.coordinates.encode()),
        ]
        return Outgoing(message, message.value, headers, dead=True)

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "ready": self.ready,
            "partitions": list(self.connector.partitions),
            "lag": dict(self.connector.lag),
            "consumed": c.consumed,
            "published": c.published,
            "dead_lettered": c.dead_lettered,
            "retried": c.retried,
            "last_cycle_messages": c.last_cycle,
            "errors": dict(c.errors),
        }


class _Settle:
    """Settling one answered chunk of a cycle: each message's Outgoing (its result, or
    its dead letter), published at once under `ordering: as_ready`."""

    def __init__(
        self,
        runner: Runner,
        backend: Backend,
        taken: list[Message],
        decoded: dict[int, formats.Decoded],
        out: list[Outgoing | None],
        retry: list[int],
        alone: list[int],
    ) -> None:
        self.runner, self.backend, self.taken, self.decoded = runner, backend, taken, decoded
        self.out, self.retry, self.alone = out, retry, alone
        info = backend.info()
        self.version = info.versions[0] if info.versions else ""
        self.early = runner.spec.ordering == "as_ready"
        self.pause = Pause()

    async def __call__(self, chunk: list[int], future: asyncio.Future[Any]) -> None:
        runner, taken, decoded, out = self.runner, self.taken, self.decoded, self.out
        if not future.done():
            await asyncio.wait([future])
        if self.pause.due(sum(len(taken[i].value) for i in chunk)):
            await asyncio.sleep(0)
        error = future.exception()
        if error is not None:
            runner._failed(chunk, error, taken, out, self.retry, self.alone)
            return
        outputs, spec = future.result(), runner.spec
        answers: list[tuple[bytes, list[tuple[str, bytes]]] | CoalesceError]
        try:  # a chunk of messages alike: their answers at once, else each alone
            alike = [decoded[i] for i in chunk]
            values = formats.encode_rows(spec.format, spec.route, self.version, alike, outputs)
        except CoalesceError as exc:
            answers = [exc] * len(chunk)
        else:
            if values is None:
                counts = [decoded[i].rows for i in chunk]
                parts = batching.split(outputs, counts, self.backend.name)
                answers = [self._encode(i, part) for i, part in zip(chunk, parts, strict=True)]
            else:
                answers = [(value, []) for value in values]
        for i, answer in zip(chunk, answers, strict=True):
            if isinstance(answer, CoalesceError):
                out[i] = runner._dead(taken[i], answer)
            else:
                body, headers = answer
                out[i] = Outgoing(taken[i], body, runner._headers(taken[i], headers, decoded[i]))
        if self.early:
            await runner._publish_early([o for i in chunk if (o := out[i]) is not None])

    def _encode(
        self, i: int, outputs: Any
    ) -> tuple[bytes, list[tuple[str, bytes]]] | CoalesceError:
        spec = self.runner.spec
        try:
            return formats.encode(spec.format, spec.route, self.version, self.decoded[i], outputs)
        except CoalesceError as exc:
            return exc


class Pipelines:
    """Every pipeline of the config on this instance: started, reloaded, stopped."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.running: dict[str, Runner] = {}

    async def start(self, specs: dict[str, Pipeline]) -> None:
        for name, spec in specs.items():
            await self._start(name, spec)

    async def _start(self, name: str, spec: Pipeline) -> None:
        connector = connector_for(name, spec)
        runner = Runner(name, spec, self.router, connector)
        runner.start()
        self.running[name] = runner
        log.info(
            "pipeline %s: %s -> %s -> %s", name, spec.source.inbox, spec.route, spec.sink.topic
        )

    async def update(self, specs: dict[str, Pipeline], grace: float) -> list[str]:
        """A reload: removed and changed pipelines stop (committing), new ones start."""
        changes = []
        for name, runner in list(self.running.items()):
            if specs.get(name) != runner.spec:
                await runner.stop(grace)
                del self.running[name]
                changes.append(f"pipeline {name}: {'changed' if name in specs else 'removed'}")
        for name, spec in specs.items():
            if name not in self.running:
                await self._start(name, spec)
                if not any(c.startswith(f"pipeline {name}:") for c in changes):
                    changes.append(f"pipeline {name}: added")
        for change in changes:
            log.info("reloaded config: %s", change)
        return changes

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(r.stop(grace) for r in self.running.values()))
        self.running.clear()

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.running.values())

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: runner.status() for name, runner in self.running.items()}
