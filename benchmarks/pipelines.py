"""Kafka pipelines: messages/s from inbox to outbox, against a naive consumer, one run.

    python -m benchmarks.pipelines [--messages 100000] [--naive-messages 10000]
                                   [--broker noida|tansu] [--workers N]

The broker (a Kafka-protocol stand-in, tests/support/kafka.py) runs on loopback, 4
partitions: noida-db by default, or Tansu. noida-db answers a fetch at the end of a
partition at once, so every consumer idle on it spins (~60% of a core, measured);
Tansu waits, as Kafka does, but cannot do exactly once. Each message is one row for
the bench MLP (benchmarks/bench_model.py), a `local` backend, as a KServe v2 JSON
body or a serialized ModelInferRequest (kserve-proto). Rows:

1. broker ceiling: produce N messages with librdkafka, and consume them, no model;
   and a relay, the bound on any pipeline: consume each and produce it to an outbox,
   no model, timed as Coalesce's rows are;
2. Coalesce, at_least_once and exactly_once (noida-db only), each format: a backlog of
   N messages in the inbox, then Coalesce starts (`--workers` serving processes, one
   consumer each in one group); timed from its first result's CreateTime to its
   last's, read once all are out, every result checked; `--repeats` runs of every
   row, interleaved, and their median;
3. a naive consumer (one Python process, librdkafka) on the same kind of backlog: per
   message, decode the JSON, call the model on its one row, encode, produce the
   result, commit asynchronously;
4. latency at a light 100 messages/s: produce-to-result p50/p99 (each result carries
   its request's headers, so the send time rides along); the caller produces with
   linger.ms 0 and the reader, assigned its partitions, takes each result as it comes.

Prints a table and writes benchmarks/results/pipelines-<broker>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from coalesce.codecs import wire
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks import bench_model
from benchmarks.run import RESULTS, infer_request
from tests.support.coalesce import Process
from tests.support.kafka import Broker, Tansu


def bodies(count: int, kind: str = "kserve-json") -> tuple[list[bytes], np.ndarray]:
    xs = bench_model.inputs(count)
    if kind == "kserve-proto":
        return [infer_request("mlp", xs[i : i + 1]) for i in range(count)], bench_model.forward(xs)
    out = []
    for i in range(count):
        tensor = {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": xs[i].tolist()}
        out.append(json.dumps({"id": str(i), "inputs": [tensor]}).encode())
    return out, bench_model.forward(xs)


def produce(broker: Broker, topic: str, values: list[bytes], rate: float | None = None) -> None:
    # A paced caller sends each request at once (linger 0): its own batching delay is
    # not the pipeline's latency. A backlog is produced in batches, as fast as it goes.
    linger = 0 if rate else 2
    producer = Producer({"bootstrap.servers": broker.address, "linger.ms": linger})
    start = time.perf_counter()
    for i, value in enumerate(values):
        if rate:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        headers = [("sent", repr(time.time()).encode())]
        send(producer, topic, value, str(i).encode(), headers)
        producer.poll(0)
    producer.flush(60)


def send(producer: Producer, topic: str, value: bytes, key: bytes | None, headers=None) -> None:
    """One record, waiting for room in the client's queue when it is full."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers)
            return
        except BufferError:
            producer.poll(0.01)


def consumer(broker: Broker, topic: str, group: str) -> Consumer:
    """A reader of every partition from the start, assigned rather than subscribed: a
    group join takes a rebalance's time, which would count as the first results'
    latency (~400 ms) and as the consume ceiling's."""
    c = Consumer(
        {
            "bootstrap.servers": broker.address,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    partitions = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return c


@dataclass
class Drained:
    last: float = 0.0  # perf_counter() when the last record arrived
    latencies: list[float] = field(default_factory=list)  # from each record's `sent` header
    wrong: int = 0  # wrong answers, and records missing
    stamped: tuple[int, int] = (0, 0)  # first and last record's CreateTime (ms)

    def rate(self, count: int) -> float:
        """Records per second between the first and the last record's CreateTime: when
        the pipeline produced them, read afterwards, so nothing polls or reads while
        it runs (its workers' own counts reach /readyz only once a second)."""
        first, last = self.stamped
        return (count - 1) / max((last - first) / 1000, 1e-3)


def drain(
    broker: Broker,
    topic: str,
    count: int,
    expected: np.ndarray | None,
    group: str,
    prompt: bool = False,
) -> Drained:
    """Read `count` records, checking each against `expected`. `prompt` takes each
    record as it arrives (for latency): a batch consume waits out its timeout, which
    would count as latency."""
    c = consumer(broker, topic, group)
    seen, found = set(), Drained()
    first, last = float("inf"), 0
    end = time.monotonic() + 600
    try:
        while len(seen) < count and time.monotonic() < end:
            taken = [c.poll(0.1)] if prompt else c.consume(5000, 0.005)
            for record in filter(None, taken):
                if record.error() is not None:
                    continue
                now = time.time()
                found.last = time.perf_counter()
                stamp = record.timestamp()[1]
                first, last = min(first, stamp), max(last, stamp)
                headers = dict(record.headers() or ())
                if "sent" in headers:
                    found.latencies.append(now - float(headers["sent"]))
                if expected is not None:
                    i = int(record.key())
                    y = _output(record.value())
                    found.wrong += not np.allclose(y, expected[i], rtol=1e-4, atol=1e-5)
                seen.add(record.key())
    finally:
        c.close()
    found.wrong += count - len(seen)
    found.stamped = (int(min(first, last)), last)
    return found


def _output(value: bytes) -> np.ndarray:
    """The answer's one output: a KServe JSON body, or a ModelInferResponse."""
    if value.startswith(b"{"):
        return np.array(json.loads(value)["outputs"][0]["data"], dtype=np.float32)
    answer = wire.ModelInferResponse.FromString(value)
    return np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)


def reading(broker: Broker, topic: str, count: int, expected, group: str):
    """drain(prompt=True) on a thread of its own: (the thread, the dict it fills)."""
    result: dict = {}

    def read() -> None:
        result["drained"] = drain(broker, topic, count, expected, group, prompt=True)

    reader = threading.Thread(target=read)
    reader.start()
    return reader, result


def ceiling(broker: Broker, values: list[bytes]) -> dict:
    broker.create_topics("ceiling")
    start = time.perf_counter()
    produce(broker, "ceiling", values)
    produced = time.perf_counter() - start
    start = time.perf_counter()
    drained = drain(broker, "ceiling", len(values), None, "ceiling")
    return {
        "produce_msgs_per_s": len(values) / produced,
        "consume_msgs_per_s": len(values) / (drained.last - start),
        "missing": drained.wrong,
    }


def latency(broker: Broker, tmp: Path, values, expected) -> dict:
    """Messages produced at a light 100/s into a running pipeline: produce-to-result
    latency (each result carries its request's headers, so the send time rides along)."""
    broker.create_topics("in-light", "out-light")
    config = _config(broker, "in-light", "out-light")
    proxy = Process({**config, "admin": None}, tmp, ("--log-level", "WARNING"))
    try:
        time.sleep(4)  # joins the group
        reader, result = reading(broker, "out-light", len(values), expected, "r-light")
        produce(broker, "in-light", values, rate=100)
        reader.join()
    finally:
        proxy.terminate()
    ms = sorted(1000 * s for s in result["drained"].latencies)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(0.99 * (len(ms) - 1))],
        "wrong": result["drained"].wrong,
    }


def pipeline(
    broker: Broker, tmp: Path, tag: str, values, expected, workers: int = 1, **fields
) -> dict:
    """A backlog of `values` in the inbox, then Coalesce starts: messages/s from its
    first result to its last (their CreateTime, see Drained.rate). Every result is
    read and checked once all are out, untimed."""
    inbox, outbox = f"in-{tag}", f"out-{tag}"
    broker.create_topics(inbox, outbox)
    produce(broker, inbox, values)
    config = {**_config(broker, inbox, outbox, **fields), "workers": workers}
    proxy = Process(config, tmp, ("--log-level", "WARNING"))
    try:
        _published_when(proxy, len(values))
    finally:
        proxy.terminate()
    drained = drain(broker, outbox, len(values), expected, f"check-{tag}")
    return {"msgs_per_s": drained.rate(len(values)), "wrong": drained.wrong}


def _config(broker: Broker, inbox: str, outbox: str, **fields) -> dict:
    source = {
        "type": "kafka",
        "brokers": [broker.address],
        "topic": inbox,
        "group": f"coalesce-{inbox}",
        "session_timeout_ms": 6000,
    }
    return {
        "backends": {"mlp": {"type": "local", "model": "benchmarks.models:mlp"}},
        "routes": [{"model": "mlp", "backend": "mlp"}],
        "pipelines": {"p": {"source": source, "route": "mlp", "sink": {"topic": outbox}, **fields}},
    }


def _published_when(proxy: Process, count: int) -> None:
    """Once the pipeline has published at least `count` results."""
    end = time.monotonic() + 600
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://{proxy.admin}/readyz", timeout=5) as answer:
                published = json.load(answer)["pipelines"]["p"]["published"]
        except (OSError, KeyError, ValueError):
            published = 0
        if published >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the pipeline did not publish {count} results in time")


def relay(broker: Broker, tag: str, values: list[bytes]) -> dict:
    """The bound on any pipeline here: each inbox message produced to an outbox as it is,
    no model and no decoding (librdkafka in batches, offsets committed asynchronously).
    Timed as Coalesce's rows are, by the outputs' CreateTime."""
    inbox, outbox = f"in-{tag}", f"out-{tag}"
    broker.create_topics(inbox, outbox)
    produce(broker, inbox, values)
    c = consumer(broker, inbox, tag)
    p = Producer({"bootstrap.servers": broker.address, "linger.ms": 1})
    done = 0
    while done < len(values):
        taken = [r for r in c.consume(5000, 0.1) if r.error() is None]
        for record in taken:
            send(p, outbox, record.value(), record.key())
        p.poll(0)
        if taken:
            c.commit(taken[-1], asynchronous=True)
        done += len(taken)
    p.flush(60)
    c.close()
    drained = drain(broker, outbox, len(values), None, f"check-{tag}")
    return {"msgs_per_s": drained.rate(len(values)), "wrong": drained.wrong}


def naive(broker: Broker, tag: str, values, expected) -> dict:
    """One message at a time, what a team writes first, on the same backlog: from its
    first message to its last result delivered; checked afterwards."""
    broker.create_topics(f"in-{tag}", f"out-{tag}")
    produce(broker, f"in-{tag}", values)
    c = consumer(broker, f"in-{tag}", tag)
    p = Producer({"bootstrap.servers": broker.address, "linger.ms": 2})
    done, start = 0, None
    while done < len(values):
        record = c.poll(1.0)
        if record is None or record.error() is not None:
            continue
        start = start or time.perf_counter()
        body = json.loads(record.value())
        x = np.array(body["inputs"][0]["data"], dtype=np.float32).reshape(1, 64)
        y = bench_model.forward(x)
        answer = {
            "id": body["id"],
            "outputs": [
                {
                    "name": "y",
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "data": y.ravel().tolist(),
                }
            ],
        }
        p.produce(f"out-{tag}", json.dumps(answer).encode(), record.key())
        p.poll(0)
        c.commit(record, asynchronous=True)
        done += 1
    p.flush(60)
    end = time.perf_counter()
    c.close()
    wrong = drain(broker, f"out-{tag}", len(values), expected, f"check-{tag}").wrong
    return {"msgs_per_s": (len(values) - 1) / (end - start), "wrong": wrong}


ROWS = {
    "at_least_once": ("kserve-json", {}),
    "at_least_once, kserve-proto": ("kserve-proto", {"format": "kserve-proto"}),
    "exactly_once": ("kserve-json", {"delivery": "exactly_once"}),
    "exactly_once, kserve-proto": (
        "kserve-proto",
        {"format": "kserve-proto", "delivery": "exactly_once"},
    ),
}
"""Coalesce's rows: (the messages' format, the pipeline's fields)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--naive-messages", type=int, default=10_000)
    parser.add_argument("--light-messages", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1, help="Coalesce's serving processes")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row (medians)")
    parser.add_argument(
        "--broker",
        choices=("noida", "tansu"),
        default="noida",
        help="tansu: no exactly_once rows (its read_committed shows aborted records)",
    )
    args = parser.parse_args(argv)
    values, expected = bodies(args.messages)
    proto, _ = bodies(args.messages, "kserve-proto")
    broker = Broker() if args.broker == "noida" else Tansu()
    rows = [r for r in ROWS if args.broker == "noida" or not r.startswith("exactly")]
    report: dict = {"args": vars(args)}
    try:
        with tempfile.TemporaryDirectory(prefix="coalesce-bench-") as tmp:
            report["ceiling"] = ceiling(broker, values)
            report["relay"] = relay(broker, "relay", proto)
            tmp_path = Path(tmp)
            runs: dict[str, list[dict]] = {row: [] for row in (*rows, "naive")}
            n = args.naive_messages
            for repeat in range(args.repeats):  # interleaved: drift hits every row alike
                for i, row in enumerate(rows):
                    kind, fields = ROWS[row]
                    runs[row].append(
                        pipeline(
                            broker,
                            tmp_path,
                            f"r{repeat}-{i}",
                            proto if kind == "kserve-proto" else values,
                            expected,
                            args.workers,
                            **fields,
                        )
                    )
                runs["naive"].append(naive(broker, f"n{repeat}", values[:n], expected[:n]))
            for row, found in runs.items():
                rates = [r["msgs_per_s"] for r in found]
                report[row] = {
                    "msgs_per_s": statistics.median(rates),
                    "runs": rates,
                    "wrong": sum(r["wrong"] for r in found),
                }
            k = args.light_messages
            report["light"] = latency(broker, tmp_path, values[:k], expected[:k])
    finally:
        broker.close()
    c, naive_rate = report["ceiling"], report["naive"]["msgs_per_s"]
    print(f"\nbroker {args.broker}, {args.workers} Coalesce worker(s)")
    print("\n| path | messages/s | runs | vs naive | vs broker consume ceiling | wrong |")
    print("|---|---|---|---|---|---|")
    print(f"| broker ceiling: produce | {c['produce_msgs_per_s']:,.0f} | 1 | — | — | — |")
    print(
        f"| broker ceiling: consume | {c['consume_msgs_per_s']:,.0f} | 1 | — | 1.00x "
        f"| {c['missing']} |"
    )
    relay_rate = report["relay"]["msgs_per_s"]
    print(
        f"| broker ceiling: relay (consume + produce, no model) | {relay_rate:,.0f} | 1 "
        f"| {relay_rate / naive_rate:.1f}x | {relay_rate / c['consume_msgs_per_s']:.2f}x "
        f"| {report['relay']['wrong']} |"
    )
    for key in (*rows, "naive"):
        r = report[key]
        print(
            f"| {'coalesce ' + key if key != 'naive' else 'naive consumer, one call per message'} "
            f"| {r['msgs_per_s']:,.0f} | {min(r['runs']):,.0f} to {max(r['runs']):,.0f} "
            f"| {r['msgs_per_s'] / naive_rate:.1f}x "
            f"| {r['msgs_per_s'] / c['consume_msgs_per_s']:.2f}x | {r['wrong']} |"
        )
    light = report["light"]
    print(
        f"\nmedians of {args.repeats} runs each, interleaved; "
        f"at 100 messages/s: produce-to-result p50 {light['p50_ms']:.1f} ms, "
        f"p99 {light['p99_ms']:.1f} ms"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pipelines-{args.broker}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    wrong = sum(report[k]["wrong"] for k in (*rows, "naive", "light", "relay"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
