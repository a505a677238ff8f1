"""Kafka inboxes and outboxes, on librdkafka (confluent-kafka).

Chosen by measurement on this 2-core machine against a Kafka-protocol broker:
confluent-kafka produced 100k 100-byte messages in 0.61 s and consumed them in
~0.8 s; aiokafka took 0.63 s for 20k (about 5x slower per message), its protocol
handling being Python.

librdkafka's calls block, so each pipeline runs them on one thread of its own, in
order (a consumer is not to be called from two threads at once). Exactly once is
Kafka's consume-transform-produce: results, dead letters and the input offsets go
in one transaction (`send_offsets_to_transaction` with the group's metadata, which
also fences a zombie that lost its partitions, KIP-447); a reader with
`isolation.level=read_committed` sees each result once. A restarted instance with
the same transactional.id aborts its predecessor's open transaction at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from coalesce.config import Pipeline
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from .runner import BrokerError, Message, Outgoing, member_name

log = logging.getLogger("coalesce")
T = TypeVar("T")
POLL_S = 0.2  # how long an idle fetch waits for the first message
SLICE = 500  # messages taken from librdkafka's queue at a time, between byte counts
TIMEOUT_S = 30.0  # transactions' and flushes' own limit


class KafkaConnector:
    """A consumer in the pipeline's group and a producer (transactional for exactly once)."""

    def __init__(self, name: str, spec: Pipeline) -> None:
        source = spec.source
        self.name = name
        self.spec = spec
        self.exactly_once = spec.delivery == "exactly_once"
        self.ready = False
        self.partitions: list[int] = []  # of the inbox, assigned to this instance
        self.lag: dict[int, int] = {}  # partition -> messages behind
        self._committed: dict[tuple[str, int], int] = {}  # by this instance, last known
        common: dict[str, Any] = {
            "bootstrap.servers": ",".join(source.brokers),
            "error_cb": self._error,
        }
        self._consumer = Consumer(
            {
                **common,
                "group.id": source.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": source.session_timeout_ms,
                "on_commit": self._commit_done,
                # librdkafka prefetches up to 64 MiB per partition by default: bound it.
                "queued.max.messages.kbytes": 16384,
                **(
                    {"group.instance.id": member_name(source.instance_id)}
                    if source.instance_id
                    else {}
                ),
                **source.options,  # the operator's settings win over these defaults
            }
        )
        # Reports of failures only (all `_delivered` looks at): producing 50k results
        # with a report each took 11.8 us a result in wall time, 3.3 without (measured).
        producer: dict[str, Any] = {
            **common,
            "linger.ms": 1,
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
            **source.options,
        }
        if self.exactly_once:
            me = source.instance_id or socket.gethostname()
            producer["transactional.id"] = member_name(
                source.transactional_id or f"coalesce-{name}-{me}"
            )
            producer["transaction.timeout.ms"] = 60_000
        else:
            producer["enable.idempotence"] = True
        self._producer = Producer(producer)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{name}")
        self._failures: list[str] = []  # delivery reports of this cycle's failures
        self._in_transaction = False  # the cycle's transaction is begun (exactly_once)
        self._early: list[asyncio.Future[None]] = []  # publish hand-offs not yet done
        self._producing: asyncio.Future[None] | None = None  # the hand-off under way
        self._ready: list[Outgoing] = []  # results waiting for it to end
        self._checked = 0.0

    def _error(self, error: KafkaError) -> None:
        """librdkafka's global errors (on its threads): all brokers down means not ready."""
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.ready = False
        log.warning("pipeline %s: kafka: %s", self.name, error.str())

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Rebalance callbacks run inside consume(), between cycles: nothing is in flight."""
        log.info("pipeline %s: assigned %s", self.name, _names(partitions))

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("pipeline %s: revoked %s", self.name, _names(partitions))

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def start(self) -> None:
        self._consumer.subscribe(
            [self.spec.source.topic], on_assign=self._assigned, on_revoke=self._revoked
        )
        if self.exactly_once:
            await self._call(
                lambda: self._transaction(lambda: self._producer.init_transactions(TIMEOUT_S))
            )
        await self._probe()
        await self._call(self._warm)

    def _warm(self) -> None:
        """Learn the outboxes' leaders now: else the first result waits for a metadata
        request and a new connection (tens of ms)."""
        dead = self.spec.dead_letter
        for topic in filter(None, (self.spec.sink.topic, dead and dead.topic)):
            with contextlib.suppress(KafkaException):  # unreachable: the first result learns
                self._producer.list_topics(topic, timeout=1.0)

    async def _probe(self) -> None:
        """Whether a broker answers (a metadata request), at most once a second."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        topic = self.spec.source.topic
        try:
            await self._call(lambda: self._consumer.list_topics(topic, timeout=1.0))
            self.ready = True
        except KafkaException:
            self.ready = False

    async def fetch(self, limit: int, max_bytes: int) -> list[Message]:
        def take() -> list[Any]:
            got: list[Any] = []
            size = 0
            while len(got) < limit and size < max_bytes:  # what is buffered already
                more = self._consumer.consume(min(limit - len(got), SLICE), 0)
                if not more and not got:  # nothing yet: wait a moment for one
                    first = self._consumer.poll(POLL_S)
                    more = [] if first is None else [first]
                if not more:
                    break
                got += more
                size += sum(len(record.value() or b"") for record in more)
            self._measure_lag()  # as of this fetch: it holds while the cycle runs
            return got

        taken = []
        for record in await self._call(take):
            error = record.error()
            if error is None:
                taken.append(
                    Message(
                        record.value() or b"",
                        record.key(),
                        record.headers() or [],  # a new list each call
                        record.topic(),
                        record.partition(),
                        record.offset(),
                    )
                )
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("pipeline %s: consume: %s", self.name, error.str())
        if taken:
            self.ready = True
        elif not self.ready:
            await self._probe()
        return taken

    def _measure_lag(self) -> None:
        """Per assigned partition, messages not yet committed, as Kafka's consumer-group
        lag: the high watermark (as the last fetch saw it: no request) minus our last
        commit there, else our position."""
        assigned = self._consumer.assignment()
        self.partitions = sorted(p.partition for p in assigned)
        lag = {}
        for position in self._consumer.position(assigned) if assigned else ():
            _, high = self._consumer.get_watermark_offsets(position, cached=True)
            done = self._committed.get((position.topic, position.partition), position.offset)
            if high >= 0 and done >= 0:
                lag[position.partition] = max(high - done, 0)
        self.lag = lag

    async def publish(self, out: list[Outgoing]) -> None:
        """Handed to the client's thread without waiting, so the cycle goes on while they
        are produced; this cycle's `complete` runs after them, in order.

        One hand-off at a time: what is answered while one is being produced goes in
        the next (smart batching again). A hand-off per batch of results made the
        client's thread and the loop take the GIL from each other thousands of times a
        second: 39.3k vs 46.0k msgs/s (kserve-proto, noida-db, 2 workers, medians of 4
        alternated runs).

        Not under exactly_once: there results go out at commit, in the cycle's
        transaction. A read_committed reader would see nothing sooner anyway, and a
        transaction held open through a long cycle (a backend down, retried for
        minutes) would hold every reader of those partitions back and then time out,
        fencing this producer."""
        if self.exactly_once:
            return
        self._ready += out
        if self._producing is None:
            self._hand_off()

    def _hand_off(self) -> None:
        items, self._ready = self._ready, []
        loop = asyncio.get_running_loop()
        future = self._producing = loop.run_in_executor(self._thread, lambda: self._send(items))
        future.add_done_callback(self._handed)
        self._early.append(future)

    def _handed(self, _future: asyncio.Future[None]) -> None:
        self._producing = None
        if self._ready:
            self._hand_off()

    def _send(self, out: list[Outgoing]) -> None:
        """Produce what is not yet sent (inside the cycle's transaction, begun here,
        under exactly_once)."""
        if self.exactly_once and not self._in_transaction:
            self._transaction(self._producer.begin_transaction)
            self._in_transaction = True
        sink = self.spec.sink.topic
        dead = self.spec.dead_letter.topic if self.spec.dead_letter else None
        produce = self._producer.produce
        for item in out:
            topic = dead if item.dead else sink
            if topic is not None and not item.sent:
                try:
                    produce(topic, item.value, item.source.key, headers=item.headers)
                except BufferError:  # the producer's queue is full: let it drain
                    self._produce(topic, item)
            item.sent = True

    async def complete(self, taken: list[Message], out: list[Outgoing]) -> None:
        offsets = {}
        for message in taken:  # the next offset to read, per partition
            key = (message.topic, message.partition)
            offsets[key] = max(offsets.get(key, 0), message.offset + 1)
        positions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        self._ready = []  # not handed off yet: sent below with the rest
        early, self._early = self._early, []
        await asyncio.gather(*early, return_exceptions=True)  # what failed is sent again
        await self._call(lambda: self._publish(out, positions))
        self._committed.update(offsets)

    def _publish(self, out: list[Outgoing], positions: list[TopicPartition]) -> None:
        try:
            self._send(out)
            if self.exactly_once:
                metadata = self._consumer.consumer_group_metadata()
                self._transaction(
                    lambda: self._producer.send_offsets_to_transaction(
                        positions, metadata, TIMEOUT_S
                    )
                )
                self._transaction(lambda: self._producer.commit_transaction(TIMEOUT_S))
                self._in_transaction = False
                return
            left = self._producer.flush(TIMEOUT_S)
            if left or self._failures:
                problem = self._failures[0] if self._failures else f"{left} not delivered in time"
                raise BrokerError(f"publishing results failed: {problem}")
            self._commit(positions)
        except BaseException:
            if self.exactly_once and self._in_transaction:
                self._abort()
                self._in_transaction = False
            for item in out:  # aborted, or perhaps not delivered: all of them again
                item.sent = False
            raise
        finally:
            self._failures.clear()

    def _commit(self, positions: list[TopicPartition]) -> None:
        """Commit what was published without waiting for the broker's answer. The
        results are delivered already, so a commit that fails (a rebalance, a broker
        gone a moment) only leaves those messages to be read again: duplicates a reader
        recognises by their coordinates, never a loss, and the next cycle's commit of
        the same partitions supersedes it. Waiting for each answer held every cycle
        back: 44.4k vs 58.1k msgs/s (noida-db, kserve-proto, 2 workers, medians of 3
        alternated runs). close() commits the last positions and waits."""
        try:
            self._consumer.commit(offsets=positions, asynchronous=True)
        except KafkaException as exc:  # refused at once: their next owner reads them
            log.warning("pipeline %s: offsets not committed: %s", self.name, exc.args[0].str())

    def _commit_done(self, error: KafkaError | None, _partitions: Any) -> None:
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            log.warning("pipeline %s: offsets not committed: %s", self.name, error.str())

    def _produce(self, topic: str, item: Outgoing) -> None:
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(topic, item.value, item.source.key, headers=item.headers)
                return
            except BufferError:
                continue

    def _delivered(self, error: KafkaError | None, _record: Any) -> None:
        if error is not None:
            self._failures.append(error.str())

    def _transaction(self, step: Callable[[], Any]) -> Any:
        """A transactional call, its failure as BrokerError (fatal: this producer is
        fenced or broken and only a restart helps)."""
        try:
            return step()
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            fatal = error.fatal() or error.code() == KafkaError._FENCED
            raise BrokerError(f"kafka transaction: {error.str()}", fatal=fatal) from None

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(TIMEOUT_S)
        except KafkaException as exc:
            log.warning("pipeline %s: abort_transaction: %s", self.name, exc.args[0].str())

    async def close(self) -> None:
        """Leave the group (the partitions go to the others at once) and flush."""

        def close() -> None:
            mine = {(p.topic, p.partition) for p in self._consumer.assignment()}
            done = self._committed.items()
            last = [TopicPartition(t, p, o) for (t, p), o in done if (t, p) in mine]
            if last and not self.exactly_once:  # what commits did not wait for, waited for
                with contextlib.suppress(KafkaException):
                    self._consumer.commit(offsets=last, asynchronous=False)
            self._consumer.close()
            self._producer.flush(5.0)

        await self._call(close)
        self._thread.shutdown(wait=False)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing"
