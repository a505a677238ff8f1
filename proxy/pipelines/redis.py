"""Redis Streams inboxes and outboxes, on redis-py's asyncio client.

The inbox is a stream read by a consumer group (XREADGROUP): instances in one group
share its entries, and an entry stays pending until acknowledged. An entry's field
`value` is the message (`key`, if present, its key); every other field is a header,
and results are written the same way.

Results and acknowledgements commit in one server-side script, which Redis runs
atomically as it would a MULTI/EXEC block, with one thing MULTI cannot do: each
result is added only if acknowledging its input succeeded. So a kill at any point
leaves either the result and the ack, or neither (the entry stays pending and is
read again); and when two instances end up with the same entry (one was slow past
`claim_idle_ms`, and the other claimed it), only the first to finish publishes. The
outbox then holds each result once.

A restarted instance first reads the entries still pending under its own consumer
name; entries pending on another consumer for `claim_idle_ms` (a dead instance) are
claimed with XAUTOCLAIM. In Redis Cluster the inbox, outbox and dead-letter stream
must share a hash slot (`{name}` tags), as for any multi-key command.
"""

from __future__ import annotations

import logging
import socket
import time

import redis.asyncio as aioredis
from coalesce.config import Pipeline
from redis.exceptions import RedisError, ResponseError

from .runner import BrokerError, Message, Outgoing, member_name

log = logging.getLogger("coalesce")
BLOCK_MS = 200  # how long an idle fetch waits for the first entry
SLICE = 500  # entries read at a time, between byte counts
FIRST_READ = 16  # entries in the first read, before any entry's size is known
LAG_EVERY_S = 1.0
COMPLETE = """
local group, added, i = ARGV[1], 0, 2
while i <= #ARGV do
  local id, where, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if redis.call('XACK', KEYS[1], group, id) == 1 and where > 0 then
    redis.call('XADD', KEYS[1 + where], '*', unpack(ARGV, i + 3, i + 2 + 2 * n))
    added = added + 1
  end
  i = i + 3 + 2 * n
end
return added
"""
"""KEYS: inbox, outbox, dead letters. ARGV: group, then per input entry its id, where
its result goes (0 nowhere, 1 outbox, 2 dead letters), its field count, its fields."""


class RedisConnector:
    """One consumer of the pipeline's group, and the script that commits its results."""

    def __init__(self, name: str, spec: Pipeline) -> None:
        source = spec.source
        self.name = name
        self.spec = spec
        self.stream = source.stream
        self.group = source.group
        self.consumer = member_name(source.consumer or socket.gethostname())
        self.ready = False
        self.partitions = [0]  # a stream is one sequence; consumers share its entries
        self.lag: dict[int, int] = {}
        self._redis = aioredis.Redis.from_url(
            source.url, socket_timeout=10.0, socket_connect_timeout=5.0
        )
        self._complete = self._redis.register_script(COMPLETE)
        self._own_from: bytes | None = b"0"  # reading our own pending entries, from here
        self._claim_from = b"0-0"
        self._claimed_at = 0.0
        self._lag_at = 0.0
        self.claimed = 0
        self._entry_bytes: float | None = None  # a running estimate of an entry's size

    async def start(self) -> None:
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists: fine
                raise BrokerError(f"redis: creating group {self.group}: {exc}") from None
        except RedisError as exc:
            self.ready = False
            raise BrokerError(f"redis: {exc}") from None
        self.ready = True

    async def fetch(self, limit: int, max_bytes: int) -> list[Message]:
        try:
            entries = await self._own_pending(min(limit, SLICE))
            if not entries:
                entries = await self._claim(min(limit, SLICE))
            if not entries:
                entries = await self._new(limit, max_bytes)
            await self._measure_lag()
        except RedisError as exc:
            self.ready = False
            raise BrokerError(f"redis: {exc}") from None
        self.ready = True
        return [self._message(entry_id, fields) for entry_id, fields in entries]

    async def _new(self, limit: int, max_bytes: int) -> list:
        """New entries, up to `limit` and about `max_bytes`, read a slice at a time;
        waits a moment for the first when there are none."""
        entries: list = []
        size, block = 0, BLOCK_MS
        while len(entries) < limit and size < max_bytes:
            # As many as fit in what is left, at the sizes seen so far: Redis returns
            # whole entries, so the count is what bounds the bytes of one read.
            estimate = self._entry_bytes
            fit = FIRST_READ if estimate is None else max(1, int((max_bytes - size) / estimate))
            got = await self._redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=min(limit - len(entries), SLICE, fit),
                block=block,
            )
            more = got[0][1] if got else []
            if not more:
                break
            entries += more
            read = sum(len(fields.get(b"value", b"")) for _, fields in more)
            size += read
            seen = read / len(more)
            self._entry_bytes = seen if estimate is None else 0.8 * estimate + 0.2 * seen
            block = None  # only the first read waits
        return entries

    async def _own_pending(self, limit: int) -> list:
        """Entries this consumer name read before a restart and never acknowledged."""
        if self._own_from is None:
            return []
        got = await self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: self._own_from}, count=limit
        )
        entries = [(i, f) for i, f in (got[0][1] if got else []) if f]  # deleted: no fields
        if not got or not got[0][1]:
            self._own_from = None
        else:
            self._own_from = got[0][1][-1][0]
            await self._drop_deleted([i for i, f in got[0][1] if not f])
        return entries

    async def _claim(self, limit: int) -> list:
        """Entries idle on another consumer for claim_idle_ms: its instance is gone."""
        now = time.monotonic()
        idle_ms = self.spec.source.claim_idle_ms
        if self._claim_from == b"0-0" and now - self._claimed_at < min(idle_ms / 2000, 1.0):
            return []
        self._claimed_at = now
        reply = await self._redis.xautoclaim(
            self.stream, self.group, self.consumer, idle_ms, self._claim_from, count=limit
        )
        self._claim_from, entries = reply[0], reply[1]
        await self._drop_deleted(reply[2] if len(reply) > 2 else [])
        if entries:
            self.claimed += len(entries)
            log.info(
                "pipeline %s: claimed %d entries idle on other consumers", self.name, len(entries)
            )
        return entries

    async def _drop_deleted(self, ids: list) -> None:
        """Pending entries trimmed from the stream meanwhile: nothing to answer."""
        if ids:
            await self._redis.xack(self.stream, self.group, *ids)

    async def _measure_lag(self) -> None:
        """Entries the group has not yet read plus those read and not acknowledged,
        as Kafka counts a group's lag (at most once a second)."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        for group in await self._redis.xinfo_groups(self.stream):
            if group["name"].decode() == self.group:
                self.lag = {0: int(group.get("lag") or 0) + int(group["pending"])}

    def _message(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Message:
        fields = dict(fields)
        value = fields.pop(b"value", b"")
        key = fields.pop(b"key", None)
        headers = [(k.decode(errors="replace"), v) for k, v in fields.items()]
        return Message(value, key, headers, self.stream, 0, entry_id.decode())

    async def publish(self, out: list[Outgoing]) -> None:
        """Each result added and its input acknowledged at once, as `complete` does."""
        await self.complete([item.source for item in out], out)
        for item in out:
            item.sent = True

    async def complete(self, taken: list[Message], out: list[Outgoing]) -> None:
        sink = self.spec.sink.topic
        dead = self.spec.dead_letter.topic if self.spec.dead_letter else None
        args: list[bytes | str | int] = [self.group]
        answered = set()
        for item in out:
            answered.add(item.source.offset)
            if item.sent:  # added, its input acknowledged, by `publish`
                continue
            where = (2 if dead else 0) if item.dead else 1
            fields: list[bytes | str] = [b"value", item.value]
            if item.source.key is not None:
                fields += [b"key", item.source.key]
            for name, value in item.headers:
                fields += [name, value]
            if where:
                args += [item.source.offset, where, len(fields) // 2, *fields]
            else:  # rejected, and no dead-letter stream: acknowledged, not kept
                args += [item.source.offset, 0, 0]
        for message in taken:
            if message.offset not in answered:
                args += [message.offset, 0, 0]
        if len(args) == 1:
            return
        try:
            await self._complete(keys=[self.stream, sink, dead or sink], args=args)
        except RedisError as exc:
            self.ready = False
            raise BrokerError(f"redis: publishing results: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()
