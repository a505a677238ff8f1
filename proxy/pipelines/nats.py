"""NATS JetStream inboxes and outboxes, on nats-py's asyncio client.

The inbox is a stream read by a durable pull consumer (explicit acks), created if it
does not exist: every instance with the same `durable` pulls from it, so they share
its messages, and a message not acked within `ack_wait_s` (its instance died) is
delivered again, to any of them.

At least once, without duplicates in the outbox: each result is published through
JetStream with a `Nats-Msg-Id` made of its input's coordinates, every PubAck is
awaited, and only then are the inputs acked. A result published again (the input was
delivered again after a crash between the PubAck and the ack) has the same id, and the
outbox stream drops it within its duplicate window (`duplicate_window`, 2 min by
default: keep `ack_wait_s` well under it).

nats-py reconnects by itself, forever; the pipeline is not ready while it is
disconnected, and again once the consumer is found after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from coalesce.config import Pipeline
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.client import JetStreamContext

from .runner import BrokerError, Message, Outgoing, member_name

log = logging.getLogger("coalesce")
POLL_S = 0.2  # how long an idle fetch waits for the first message
CONNECT_S = 5.0  # a first connection this slow is retried by the runner
TIMEOUT_S = 30.0  # publishing a cycle's results and acking its inputs
NEXT_PULL_S = 0.05  # a later slice's limit (nats-py takes in ~25k messages/s here)
SLICE = 500  # messages pulled at a time, between byte counts
FIRST_PULL = 16  # messages in the first pull, before any message's size is known
LAG_EVERY_S = 1.0


class NatsConnector:
    """A connection, the pipeline's durable pull consumer, and JetStream publishing."""

    def __init__(self, name: str, spec: Pipeline) -> None:
        self.name = name
        self.spec = spec
        self.source = spec.source
        self.ready = False
        self.partitions = [0]  # a stream is one sequence; instances share its consumer
        self.lag: dict[int, int] = {}
        self._nc = Client()
        self._js = self._nc.jetstream()
        self._sub: JetStreamContext.PullSubscription | None = None  # once bound
        self._connected = asyncio.Event()
        self._check = True  # find (or create) the consumer before the next fetch
        self._lag_at = 0.0
        self._message_bytes: float | None = None  # a running estimate of a message's size
        self._last_error = ""

    async def start(self) -> None:
        if not (self._nc.is_connected or self._nc.is_reconnecting):  # once: it reconnects
            try:
                await asyncio.wait_for(self._connect(), CONNECT_S)
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                await self._nc.close()
                self._nc = Client()
                self._js = self._nc.jetstream()
                raise BrokerError(f"nats: cannot connect to {self.source.servers}: {exc}") from None
            self._connected.set()
        await self._call(self._consumer)
        await self._call(self._check_duplicate_window)

    async def _connect(self) -> None:
        await self._nc.connect(
            self.source.servers,
            name=member_name(f"coalesce-{self.name}"),
            max_reconnect_attempts=-1,  # forever: a pipeline outlives a broker's restart
            reconnect_time_wait=1,
            connect_timeout=2,
            ping_interval=10,  # a silent server is noticed within ~30 s
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
        )

    async def _error(self, error: Exception) -> None:
        message = str(error) or type(error).__name__
        if message != self._last_error:  # every reconnect attempt reports the same
            log.warning("pipeline %s: nats: %s", self.name, message)
        self._last_error = message

    async def _disconnected(self) -> None:
        self.ready = False
        self._connected.clear()
        if not self._nc.is_closed:  # not by close()
            log.warning("pipeline %s: nats: disconnected", self.name)

    async def _reconnected(self) -> None:
        self._check = True  # the server may have restarted: is the consumer there?
        self._connected.set()
        self._last_error = ""
        url = self._nc.connected_url
        log.info("pipeline %s: nats: reconnected to %s", self.name, url and url.netloc)

    async def _call(self, step: Callable[[], Awaitable[None]]) -> None:
        """A JetStream call's failures as BrokerError (not fatal: the runner retries)."""
        try:
            await step()
        except nats.js.errors.NotFoundError as exc:
            self.ready, self._check = False, True
            raise BrokerError(f"nats: {exc.description or exc}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            self.ready = False
            raise BrokerError(f"nats: {exc!r}") from None

    async def _consumer(self) -> None:
        """The durable consumer, created if missing; bound once (the binding survives
        reconnects)."""
        source = self.source
        try:
            info = await self._js.consumer_info(source.stream, source.durable)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code != 10014:  # 10014: no such consumer; else no such stream
                raise
            config = ConsumerConfig(
                durable_name=source.durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=source.ack_wait_s,
                filter_subject=source.subject,
                max_ack_pending=-1,  # each instance pulls max_in_flight at most (+ one slice)
            )
            info = await self._js.add_consumer(source.stream, config)
            log.info("pipeline %s: created consumer %s", self.name, source.durable)
        config = info.config
        if config.deliver_subject or config.ack_policy != AckPolicy.EXPLICIT:
            raise BrokerError(
                f"nats: consumer {source.durable} must be a pull consumer with explicit acks",
                fatal=True,
            )
        if config.ack_wait != source.ack_wait_s or config.filter_subject != source.subject:
            log.warning(
                "pipeline %s: consumer %s exists with ack_wait %ss, subject %s: kept as it is",
                self.name,
                source.durable,
                config.ack_wait,
                config.filter_subject,
            )
        if self._sub is None:
            self._sub = await self._js.pull_subscribe_bind(source.durable, stream=source.stream)
        self._check = False
        self.ready = True

    async def _check_duplicate_window(self) -> None:
        """A result republished after its input's ack_wait must still be recognised."""
        outboxes = [self.spec.sink, *([self.spec.dead_letter] if self.spec.dead_letter else [])]
        for outbox in outboxes:
            try:
                stream = await self._js.find_stream_name_by_subject(outbox.topic)
                window = (await self._js.stream_info(stream)).config.duplicate_window or 0
            except nats.js.errors.NotFoundError:
                log.warning("pipeline %s: no stream captures %s yet", self.name, outbox.topic)
                continue
            if window <= self.source.ack_wait_s:
                log.warning(
                    "pipeline %s: stream %s de-duplicates for %ss only, not more than ack_wait "
                    "(%ss): a result published again after a crash may be kept twice",
                    self.name,
                    stream,
                    window,
                    self.source.ack_wait_s,
                )

    async def fetch(self, limit: int, max_bytes: int) -> list[Message]:
        if not self._connected.is_set():  # requests sent now would all go on reconnect
            try:
                await asyncio.wait_for(self._connected.wait(), POLL_S)
            except TimeoutError:
                return []
        if self._check:
            await self._call(self._consumer)
        await self._call(self._measure_lag)  # as of this fetch: it holds while the cycle runs
        got: list[Msg] = []

        async def pull() -> None:
            got.extend(await self._pull(limit, max_bytes))

        await self._call(pull)
        self.ready = self._connected.is_set() and not self._check  # not if lost meanwhile
        return [self._message(msg) for msg in got]

    async def _pull(self, limit: int, max_bytes: int) -> list[Msg]:
        """Up to `limit` messages and about `max_bytes`, a slice at a time (nats-py asks
        for a count, not bytes: each slice is sized from the messages seen so far); the
        first slice waits POLL_S for one message, a later one only follows a full one."""
        assert self._sub is not None
        got: list[Msg] = []
        size, timeout = 0, POLL_S
        while len(got) < limit and size < max_bytes:
            estimate = self._message_bytes
            fit = FIRST_PULL if estimate is None else max(1, int((max_bytes - size) / estimate))
            want = min(limit - len(got), SLICE, fit)
            try:
                more = await self._sub.fetch(want, timeout=timeout)
            except TimeoutError:  # nothing (more) arrived
                break
            except nats.errors.Error:
                if not got:
                    raise
                break  # keep what was taken: the failure shows on the next fetch
            if not more:
                break
            got += more
            read = sum(len(msg.data) for msg in more)
            size += read
            seen = read / len(more)
            self._message_bytes = seen if estimate is None else 0.8 * estimate + 0.2 * seen
            if len(more) < want:  # what had arrived is taken
                break
            timeout = NEXT_PULL_S
        return got

    async def _measure_lag(self) -> None:
        """Messages not yet delivered plus those delivered and not acked, as Kafka counts
        a group's lag (the consumer's, for all instances; at most once a second)."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        info = await self._js.consumer_info(self.source.stream, self.source.durable)
        self.lag = {0: info.num_pending + info.num_ack_pending}

    @staticmethod
    def _message(msg: Msg) -> Message:
        headers = dict(msg.headers or {})
        key = headers.pop("key", None)
        return Message(
            msg.data,
            None if key is None else key.encode(),
            [(k, v.encode()) for k, v in headers.items()],
            msg.subject,
            0,
            msg.metadata.sequence.stream,
            ref=msg,
        )

    async def publish(self, out: list[Outgoing]) -> None:
        """Results published and confirmed, then their inputs acked, as `complete` does."""
        await self.complete([item.source for item in out], out)
        for item in out:
            item.sent = True

    async def complete(self, taken: list[Message], out: list[Outgoing]) -> None:
        """Publish every result, await every PubAck, then ack the inputs and flush: the
        server has every ack once its PONG is back (~200k acks/s here, ack_sync one by
        one ~12k/s). A retry publishes the same ids again: the server drops repeats."""
        sink = self.spec.sink.topic
        dead = self.spec.dead_letter.topic if self.spec.dead_letter else None
        outgoing = [(dead if o.dead else sink, o) for o in out if not o.sent]
        try:
            async with asyncio.timeout(TIMEOUT_S):
                acks = await self._publish([(s, o) for s, o in outgoing if s is not None])
                for message in taken:
                    if not message.ref.is_acked:  # by an earlier try of this cycle
                        await message.ref.ack()
                await self._nc.flush(TIMEOUT_S)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerError(f"nats: publishing results: {exc!r}") from None
        again = sum(bool(a.duplicate) for a in acks)
        if again:
            log.info(
                "pipeline %s: %d results were published before (their inputs were delivered "
                "again): dropped by the server as duplicates",
                self.name,
                again,
            )

    async def _publish(self, items: list[tuple[str, Outgoing]]) -> list[PubAck]:
        """All at once (publish_async: ~20k/s here, against ~15k/s for gathering
        publish requests), then every PubAck."""
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for subject, item in items:
                headers = self._headers(item)
                futures.append(await self._js.publish_async(subject, item.value, headers=headers))
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:  # those left by a failure or a timeout
                future.cancel()

    def _headers(self, item: Outgoing) -> dict[str, str]:
        """NATS headers are text. The input's own `Nats-*` headers were directives for
        publishing the input (Nats-Expected-Stream...), not the result: dropped."""
        headers = {
            k: v.decode(errors="replace")
            for k, v in item.headers
            if not k.lower().startswith("nats-")
        }
        if item.source.key is not None:
            headers["key"] = item.source.key.decode(errors="replace")
        kind = "dead" if item.dead else "result"
        headers["Nats-Msg-Id"] = (
            f"{self.source.stream}:{item.source.offset}:{self.source.durable}:{kind}"
        )
        return headers

    async def close(self) -> None:
        """Close (flushing what is written). Not drain: messages the server has sent for
        a pull and no fetch took would be waited for; unacked, they go to others."""
        self.ready = False
        await self._nc.close()
