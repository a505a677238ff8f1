"""NATS JetStream pipelines: inbox stream -> the route's batcher -> outbox stream, through
real `coalesce serve` and a real nats-server (Debian's), with nats-py on the test side
as a team's producer and reader would use it.

The producer publishes with `stream="REQUESTS"` (a `Nats-Expected-Stream` header, kept
in the stored message): a connector that copied it onto its results could never publish
them, so every test also checks that the input's `Nats-*` headers stay behind.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.support.coalesce import Process
from tests.support.pipelines import (
    affine_pipeline,
    bad_messages,
    batch_totals,
    check_answer,
    grpc_caller,
    messages,
    readyz,
    until,
)

pytest.importorskip("nats")
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tests.support.nats import NatsServer

pytestmark = pytest.mark.timeout(180)
STREAMS = {"REQUESTS": "requests", "RESULTS": "results", "REJECTED": "rejected"}


@pytest.fixture
def server() -> Iterator[NatsServer]:
    started = NatsServer()
    yield started
    started.close()


def pipeline_config(
    server: NatsServer, delay_ms: float = 0.0, max_in_flight: int = 10_000, **source
) -> dict:
    inbox = {
        "type": "nats",
        "servers": [server.url],
        "stream": "REQUESTS",
        "subject": "requests",
        "durable": "coalesce-scores",
    }
    return affine_pipeline({**inbox, **source}, delay_ms, max_in_flight=max_in_flight)


def publish(server: NatsServer, values: list[tuple[str, bytes]]) -> None:
    """Each request as a producer would: its key and a trace header, via JetStream."""

    async def send(js) -> None:
        futures = []
        for key, value in values:
            headers = {"key": key, "trace": key}
            futures.append(
                await js.publish_async("requests", value, stream="REQUESTS", headers=headers)
            )
        for future in futures:
            await future

    server.run(send)


def count(server: NatsServer, stream: str) -> int:
    async def messages_in(js) -> int:
        return (await js.stream_info(stream)).state.messages

    return server.run(messages_in)


def contents(server: NatsServer, stream: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message `stream` holds, as (headers, value), read by an ephemeral consumer."""

    async def read(js) -> list[tuple[dict[str, str], bytes]]:
        total = (await js.stream_info(stream)).state.messages
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        sub = await js.pull_subscribe(STREAMS[stream], stream=stream, config=config)
        found = []
        while len(found) < total:
            found += await sub.fetch(total - len(found), timeout=5)
        await sub.unsubscribe()
        return [(dict(m.headers or {}), m.data) for m in found]

    return server.run(read)


def consumer(server: NatsServer):
    async def info(js):
        return await js.consumer_info("REQUESTS", "coalesce-scores")

    return server.run(info)


def check_result(headers: dict[str, str], value: bytes, x_of: dict[str, np.ndarray]) -> str:
    """It answers its own request (its key, headers, value by value), published with
    the id the server de-duplicates by, without the input's Nats-* directives."""
    assert "Nats-Expected-Stream" not in headers
    source = headers["coalesce-source"]
    assert headers["Nats-Msg-Id"] == f"REQUESTS:{source.rsplit('/', 1)[1]}:coalesce-scores:result"
    as_bytes = {k: v.encode() for k, v in headers.items()}
    return check_answer(headers["key"], as_bytes, value, x_of, "requests")


def read_every(server: NatsServer, x_of: dict, timeout: float = 60) -> list[str]:
    """The keys answered in RESULTS once every request in `x_of` has a result (at least
    once: each checked, and a request answered twice came from the same input)."""
    end = time.monotonic() + timeout
    while True:
        if count(server, "RESULTS") >= len(x_of):
            found = contents(server, "RESULTS")
            keys = [check_result(headers, value, x_of) for headers, value in found]
            if set(keys) == set(x_of):
                break
        assert time.monotonic() < end, "some requests never answered"
        time.sleep(0.3)
    sources: dict[str, set[str]] = {}
    for headers, _ in found:
        sources.setdefault(headers["key"], set()).add(headers["coalesce-source"])
    assert all(len(s) == 1 for s in sources.values()), "a duplicate is the same input's"
    return keys


def status(proxy: Process) -> dict:
    return readyz(proxy)["pipelines"]["scores"]


def freeze_holding(proxy: Process, server: NatsServer) -> None:
    """SIGSTOP the consumer's only instance at a moment it holds messages it has not
    acked (as the consumer says)."""
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "it never held a message"
        proxy.proc.send_signal(signal.SIGSTOP)
        if consumer(server).num_ack_pending:
            return
        proxy.proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)


def test_every_message_gets_its_own_result_and_grpc_callers_share_the_batcher(
    server, coalesce_process
):
    server.add_streams(**STREAMS)
    proxy = coalesce_process(pipeline_config(server))
    values, x_of = messages(2000)
    with grpc_caller(proxy) as grpc_answers:
        publish(server, values)
        keys = read_every(server, x_of)
    assert sorted(keys) == sorted(x_of), "each request answered once"
    assert grpc_answers
    until(lambda: status(proxy)["lag"] == {"0": 0}, "lag 0 once everything is acked")
    found = status(proxy)
    assert found["ready"] and found["partitions"] == [0]
    assert found["consumed"] == found["published"] == len(values)
    assert consumer(server).ack_floor.stream_seq == len(values), "every input acked"
    batches, rows_in_batches = batch_totals(proxy, "affine")
    assert rows_in_batches == len(values) + len(grpc_answers)  # one batcher served both
    assert rows_in_batches / batches > 3, "messages that queued together share batches"


def test_a_kill_9_mid_stream_loses_nothing_and_republished_results_are_dropped(
    server, coalesce_process
):
    """Killed holding unacked messages, restarted with the same config: they are
    delivered again after ack_wait_s, and the results it had already published are
    published again under the same Nats-Msg-Id, which the outbox stream drops."""
    server.add_streams(**STREAMS)
    config = pipeline_config(server, delay_ms=5, max_in_flight=200, ack_wait_s=2)
    values, x_of = messages(4000)
    publish(server, values)
    first = coalesce_process(config)
    until(lambda: status(first)["published"] >= 1000, "the pipeline does not move")
    freeze_holding(first, server)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = coalesce_process(config)
    read_every(server, x_of)
    assert status(second)["consumed"] < len(values), "resumed, not redone"
    until(lambda: consumer(server).ack_floor.stream_seq == len(values), "every input acked")
    kept = count(server, "RESULTS")
    print(
        f"\nresults kept {kept} for {len(values)} requests; the restarted instance "
        f"published {status(second)['published']} (of which dropped by the server as "
        f"duplicates: {'dropped by the server as duplicates' in second.output()})"
    )
    assert kept == len(values), "each result kept once"


def test_two_instances_share_the_durable_and_a_killed_ones_messages_go_to_the_other(
    server, coalesce_process
):
    server.add_streams(**STREAMS)
    config = pipeline_config(server, delay_ms=5, max_in_flight=50, ack_wait_s=2)
    a, b = coalesce_process(config), coalesce_process(config)
    values, x_of = messages(6000)
    publish(server, values)
    until(lambda: status(a)["published"] and status(b)["published"], "both should be working")
    before = status(b)["consumed"]
    b.proc.send_signal(signal.SIGKILL)  # mid-cycle, and never comes back
    b.proc.wait()
    read_every(server, x_of)
    until(lambda: consumer(server).ack_floor.stream_seq == len(values), "every input acked")
    assert count(server, "RESULTS") == len(values), "each result kept once"
    print(f"\nb consumed {before}+ before its kill, a {status(a)['consumed']} of {len(values)}")


def test_a_frozen_instances_late_results_are_dropped_as_duplicates(server, coalesce_process):
    """b is frozen (SIGSTOP) holding messages; after ack_wait_s they go to a, which
    answers everything. b then wakes and publishes its cycle's results too: the same
    Nats-Msg-Ids, so the outbox still holds each result once."""
    server.add_streams(**STREAMS)
    a = coalesce_process(pipeline_config(server, delay_ms=5, max_in_flight=50, ack_wait_s=1))
    # b's model is slow: it spends nearly all its time inside a cycle, holding messages
    b = coalesce_process(pipeline_config(server, delay_ms=1500, max_in_flight=50, ack_wait_s=1))
    values, x_of = messages(3000)
    publish(server, values)
    until(lambda: status(a)["published"] and status(b)["published"], "both should be working")
    b.proc.send_signal(signal.SIGSTOP)  # mid-cycle: it holds messages it has not acked
    read_every(server, x_of)
    b.proc.send_signal(signal.SIGCONT)
    until(
        lambda: status(a)["consumed"] + status(b)["consumed"] > len(values),
        "b finishes the cycle it held (answered by a meanwhile)",
    )
    assert count(server, "RESULTS") == len(values), "each result kept once"
    assert "dropped by the server as duplicates" in b.output()
    until(lambda: consumer(server).ack_floor.stream_seq == len(values), "every input acked")
    print(
        f"\nconsumed by a {status(a)['consumed']} and b {status(b)['consumed']}, "
        f"kept {count(server, 'RESULTS')}"
    )


def test_results_the_outbox_refuses_keep_their_inputs_unacked(server, coalesce_process):
    """No stream captures `results` yet: publishing fails, so nothing is acked, and a
    `kill -9` then loses nothing (an ack sent before the PubAck would have)."""
    server.add_streams(REQUESTS="requests", REJECTED="rejected")
    config = pipeline_config(server, ack_wait_s=2)
    values, x_of = messages(300)
    publish(server, values)
    first = coalesce_process(config)
    until(lambda: status(first)["ready"], "the consumer is created")
    until(lambda: consumer(server).num_ack_pending == len(values), "all taken")
    until(lambda: "publishing results" in first.output(), "publishing should fail")
    time.sleep(1)
    assert consumer(server).ack_floor.stream_seq == 0, "nothing acked"
    assert status(first)["published"] == 0
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    server.add_streams(RESULTS="results")
    coalesce_process(config)
    assert sorted(read_every(server, x_of)) == sorted(x_of)


def test_bad_messages_go_to_the_dead_letter_subject_with_their_error(server, coalesce_process):
    server.add_streams(**STREAMS)
    proxy = coalesce_process(pipeline_config(server))
    good, x_of = messages(20)
    bad = bad_messages()
    publish(server, [*good[:10], *bad, *good[10:]])
    assert sorted(read_every(server, x_of)) == sorted(x_of)
    until(lambda: count(server, "REJECTED") == len(bad), "each bad message dead-lettered")
    rejected = {h["key"]: (h, v) for h, v in contents(server, "REJECTED")}
    assert set(rejected) == {k for k, _ in bad}
    for key, value in bad:
        headers, found = rejected[key]
        assert found == value, "the original message, for a replay"
        assert headers["coalesce-source"].startswith("requests/0/")
        assert headers["trace"] == key
        assert headers["Nats-Msg-Id"].endswith(":dead")
        assert "Nats-Expected-Stream" not in headers
    assert rejected["not-json"][0]["coalesce-status"] == "INVALID_ARGUMENT"
    assert "message value" in rejected["not-json"][0]["coalesce-error"]
    assert "'z'" in rejected["wrong-tensor"][0]["coalesce-error"]
    assert rejected["nan"][0]["coalesce-status"]
    found = status(proxy)
    assert found["dead_lettered"] == len(bad) and found["published"] == len(good)
    until(lambda: consumer(server).ack_floor.stream_seq == len(good) + len(bad), "all acked")


def test_a_stopped_nats_server_makes_the_pipeline_not_ready_until_it_is_back(
    server, coalesce_process
):
    server.add_streams(**STREAMS)
    proxy = coalesce_process(pipeline_config(server))
    values, x_of = messages(200)
    publish(server, values[:100])
    until(lambda: count(server, "RESULTS") == 100, "the first half answered")
    until(lambda: readyz(proxy)["ready"], "ready")
    server.stop()
    until(lambda: not status(proxy)["ready"], "a pipeline without its server is not ready", 30)
    assert readyz(proxy)["ready"] is False
    time.sleep(1)
    assert not status(proxy)["ready"], "still down"
    server.start()  # same port, same store
    until(lambda: status(proxy)["ready"], "ready again once reconnected", 30)
    publish(server, values[100:])
    assert sorted(read_every(server, x_of)) == sorted(x_of)
    until(lambda: readyz(proxy)["ready"], "the instance ready again")
    assert "reconnected" in proxy.output()
