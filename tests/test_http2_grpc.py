"""gRPC on Coalesce's own HTTP/2 (coalesce.http2): the `listen` front end.

tests/test_kserve_grpc.py and tests/test_streaming.py run their every test against it
and the grpc.aio fallback; these cover what only this stack does itself: flow control
both ways, streams, compression, deadlines, cancellation, limits, bad HTTP/2, shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
from coalesce import config as config_module
from coalesce.codecs import wire
from coalesce.config import ConfigError
from coalesce.http2.grpc_server import GrpcApp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.conftest import local_backend, model_of, running
from tests.support import h2peer as h2

CONFIG = {
    "max_message_mb": 24,
    "backends": {
        "echo": local_backend("echo"),
        "affine": local_backend("affine"),
        "slow": local_backend("affine", args={"delay_ms": 300}),
        "gated": local_backend("gated", inline=True),
    },
    "routes": [{"model": m, "backend": m} for m in ("echo", "affine", "slow", "gated")],
}


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


async def in_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def test_concurrent_callers_each_get_their_own_rows_in_shared_batches():
    async with running(CONFIG) as server:
        client = aio.InferenceServerClient(address(server))
        xs = [np.full((1, 4), i, dtype=np.float32) for i in range(300)]
        results = await asyncio.gather(*(client.infer("affine", inputs(x=x)) for x in xs))
        await client.close()
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)
        assert max(model_of(server, "affine").batches) > 1  # they were coalesced


async def test_messages_far_beyond_every_flow_control_window_go_both_ways():
    """20 MiB each way: over our 4 MiB stream window and the client's 64 KiB one."""
    async with running(CONFIG) as server:
        x = np.random.default_rng(0).standard_normal((5, 1 << 20), dtype=np.float32)

        def call():
            with tc.InferenceServerClient(address(server)) as client:
                return client.infer("echo", inputs(x=x), client_timeout=60).as_numpy("x")

        np.testing.assert_array_equal(await in_thread(call), x)


async def test_a_message_in_frames_of_every_size_arrives_whole():
    """DATA frames of 1, 2, 3... bytes: the length prefix split between frames, the
    body kept in pieces (Stream.parts) and joined once complete."""
    x = np.arange(3000, dtype=np.float32).reshape(1, 3000)
    request = wire.ModelInferRequest(model_name="echo", id="pieces")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3000])
    request.raw_input_contents.append(x.tobytes())
    message = h2.grpc_message(request.SerializeToString())
    async with running(CONFIG) as server:

        def call() -> list[h2.Frame]:
            with h2.Peer(server.port).handshake() as peer:
                block = h2.request_block("/inference.GRPCInferenceService/ModelInfer")
                out = [h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block)]
                at, size = 0, 1
                while at < len(message):
                    piece = message[at : at + size]
                    at += size
                    end = h2.END_STREAM if at >= len(message) else 0
                    out.append(h2.frame(h2.DATA, end, 1, piece))
                    size = size + 1 if size < 64 else 4096
                peer.send(b"".join(out))
                frames = []
                while not frames or not frames[-1].flags & h2.END_STREAM:
                    frames.append(peer.expect(lambda f: f.stream == 1))
                return frames

        frames = await in_thread(call)
    assert h2.grpc_status(frames) == "0"
    body = b"".join(f.payload for f in frames if f.kind == h2.DATA)
    answer = wire.ModelInferResponse.FromString(body[5:])
    assert answer.id == "pieces"
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32), x[0])


async def test_a_message_over_max_message_mb_is_resource_exhausted_and_serving_goes_on():
    async with running({**CONFIG, "max_message_mb": 1}) as server:
        client = aio.InferenceServerClient(address(server))
        with pytest.raises(InferenceServerException) as error:
            await client.infer("echo", inputs(x=np.zeros((1, 1 << 19), np.float32)))
        assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in error.value.message()
        small = np.ones((1, 4), np.float32)
        result = await client.infer("affine", inputs(x=small))
        np.testing.assert_array_equal(result.as_numpy("y"), 3 * small)
        await client.close()


async def test_the_deadline_ends_the_call_and_its_batch_mates_are_unaffected():
    async with running(CONFIG) as server:
        client = aio.InferenceServerClient(address(server))
        x = np.ones((1, 4), np.float32)
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            await client.infer("slow", inputs(x=x), client_timeout=0.1)
        assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert time.monotonic() - start < 0.29  # the model takes 0.3 s
        result = await client.infer("slow", inputs(x=x), client_timeout=5)
        np.testing.assert_array_equal(result.as_numpy("y"), 3 * x)
        await client.close()


async def held_call(server, x: np.ndarray):
    """A client, the gated model, and a call of `x` the model now holds (gate closed)."""
    gated = model_of(server, "gated")
    client = aio.InferenceServerClient(address(server))
    call = asyncio.ensure_future(client.infer("gated", inputs(x=x)))
    await asyncio.wait_for(gated.entered.wait(), 5)
    return client, gated, call


async def test_a_cancelled_call_leaves_the_server_and_other_calls_alone():
    async with running(CONFIG) as server:
        x = np.ones((1, 4), np.float32)
        client, gated, doomed = await held_call(server, x)
        other = asyncio.ensure_future(client.infer("gated", inputs(x=2 * x)))
        await asyncio.sleep(0.05)
        doomed.cancel()  # RST_STREAM from the client
        await asyncio.sleep(0.05)
        gated.gate.set()
        result = await asyncio.wait_for(other, 5)
        np.testing.assert_array_equal(result.as_numpy("y"), 5 * x)
        await client.close()


async def test_calls_queued_behind_a_busy_backend_cost_no_task_each():
    """While the backend is busy, a ModelInfer of a known layout is queued as the parser
    completes it and answered from its future's callback (KServeService.begin): no
    task of ours per call, and each caller still gets its own rows, its own deadline."""
    loop = asyncio.get_running_loop()
    async with running(CONFIG) as server:
        x = np.ones((1, 4), np.float32)
        client, gated, first = await held_call(server, x)  # its layout is learnt
        batcher = server.router.backends["gated"].batcher
        ours = []

        def factory(loop, coro, **kwargs):
            if getattr(coro, "__qualname__", "").startswith("GrpcApp."):
                ours.append(coro.__qualname__)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)
        try:
            queued = [
                asyncio.ensure_future(client.infer("gated", inputs(x=(i + 2) * x)))
                for i in range(20)
            ]
            late = asyncio.ensure_future(client.infer("gated", inputs(x=-x), client_timeout=0.2))
            for _ in range(500):
                if batcher.queued_rows >= 21:
                    break
                await asyncio.sleep(0.01)
            assert batcher.queued_rows == 21
        finally:
            loop.set_task_factory(None)
        assert ours == []
        with pytest.raises(InferenceServerException) as error:
            await late
        assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        gated.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *queued), 5)
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.as_numpy("y"), 2 * (i + 1) * x + 1)
        assert not (np.concatenate(gated.seen) == -x).all(axis=1).any()
        await client.close()


async def test_calls_the_peer_resets_in_the_same_read_never_start(monkeypatch):
    """Rapid Reset's currency is work started for streams the peer cancels at once: a
    call's handler starts only once the parser is through the read that completed it,
    so HEADERS + DATA + RST_STREAM read together cost no task and no batcher's time."""
    started = []
    start = GrpcApp.start

    def counted(self, connection, stream, message, flag):
        started.append(stream.id)
        start(self, connection, stream, message, flag)

    monkeypatch.setattr(GrpcApp, "start", counted)
    async with running(CONFIG) as server:
        block = h2.request_block("/inference.GRPCInferenceService/ModelInfer")
        burst = b"".join(
            h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, block)
            + h2.frame(h2.DATA, h2.END_STREAM, 2 * i + 1, h2.grpc_message(b"\n\x04echo"))
            + h2.frame(h2.RST_STREAM, 0, 2 * i + 1, (h2.CANCEL).to_bytes(4, "big"))
            for i in range(200)
        )

        def attack() -> None:
            with h2.Peer(server.port).handshake() as p:
                p.send(burst)
                p.ping()  # read after the burst: every stream in it was parsed

        await in_thread(attack)
        # (a read may end between a call's DATA and its RST_STREAM)
        assert len(started) <= 2, f"{len(started)} of 200 reset calls were started"
        client = aio.InferenceServerClient(address(server))
        x = np.ones((1, 4), np.float32)
        result = await client.infer("echo", inputs(x=x))  # the connection's neighbours: served
        np.testing.assert_array_equal(result.as_numpy("x"), x)
        await client.close()


async def test_a_stream_is_answered_request_by_request_before_the_client_half_closes():
    async with running(CONFIG) as server:
        client = aio.InferenceServerClient(address(server))
        sent, answered = asyncio.Queue(), []

        async def requests():
            for i in range(3):
                yield {"model_name": "affine", "inputs": inputs(x=np.full((1, 4), i, np.float32))}
                await sent.get()  # the next only once this one is answered: no half-close yet

        async for result, error in client.stream_infer(requests()):
            assert error is None
            answered.append(result.as_numpy("y"))
            sent.put_nowait(None)
            if len(answered) == 3:
                break
        await client.close()
    for i, y in enumerate(answered):
        np.testing.assert_array_equal(y, np.full((1, 4), 2 * i + 1, np.float32))


async def test_unknown_methods_are_unimplemented_at_once_naming_them():
    async with running(CONFIG) as server, grpc.aio.insecure_channel(address(server)) as channel:
        call = channel.stream_stream("/no.Such/Method")()  # never half-closed
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), 5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/no.Such/Method" in error.value.details()


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_compressed_requests_are_inflated(compression):
    async with (
        running(CONFIG) as server,
        grpc.aio.insecure_channel(address(server), compression=compression) as channel,
    ):
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:  # big enough to be compressed
            await check(health_pb2.HealthCheckRequest(service="affine" * 200), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND  # read, and not a service
        answer = await check(health_pb2.HealthCheckRequest(service="affine"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_compressed_bomb_stops_at_max_message():
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    framed = b"\x01" + len(bomb).to_bytes(4, "big") + bomb
    async with running(CONFIG) as server:
        peer = h2.Peer(server.port)
        block = h2.request_block("/grpc.health.v1.Health/Check", grpc_encoding="deflate")
        frames = await asyncio.to_thread(_call_raw, peer, block, framed)
        peer.close()
    assert h2.grpc_status(frames) == "8"  # RESOURCE_EXHAUSTED: inflated only to the limit


def _call_raw(peer: h2.Peer, block: bytes, framed: bytes) -> list:
    peer.handshake()
    peer.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block))
    for at in range(0, len(framed), 16384):
        last = h2.END_STREAM if at + 16384 >= len(framed) else 0
        peer.send(h2.frame(h2.DATA, last, 1, framed[at : at + 16384]))
    out = []
    while not out or not out[-1].flags & h2.END_STREAM:
        out.append(peer.expect(lambda f: f.stream == 1))
    return out


async def test_health_watch_streams_status_changes():
    async with running(CONFIG) as server, grpc.aio.insecure_channel(address(server)) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="affine")
        )
        first = await asyncio.wait_for(watch.read(), 5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await server.health.set("affine", health_pb2.HealthCheckResponse.NOT_SERVING)
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_tf_serving_predict_and_health():
    async with running(CONFIG) as server, grpc.aio.insecure_channel(address(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="affine"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "affine"
        request.inputs["x"].CopyFrom(_tensor_proto(np.ones((2, 4), np.float32)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = await stub.Predict(request, timeout=5)
        assert list(response.outputs["y"].float_val or _floats(response.outputs["y"])) == [3.0] * 8


def _tensor_proto(array: np.ndarray):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=array.tobytes()
    )


def _floats(tensor) -> list[float]:
    return np.frombuffer(tensor.tensor_content, dtype=np.float32).tolist()


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64],
)
async def test_what_is_not_http2_closes_that_connection_only(garbage):
    async with running(CONFIG) as server:

        def poke() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(garbage)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        answer = await in_thread(poke)  # returns: the server closed the connection
        assert answer[3] == 4  # our SETTINGS came first ...
        assert b"\x07\x00\x00\x00\x00\x00" in answer  # ... and a GOAWAY ended it
        client = aio.InferenceServerClient(address(server))
        assert await client.is_server_live()
        await client.close()


async def test_stop_lets_an_in_flight_call_finish_then_refuses_new_ones():
    async with running(CONFIG) as server:
        x = np.ones((1, 4), np.float32)
        client, gated, call = await held_call(server, x)
        stopping = asyncio.ensure_future(server.stop(grace=5))
        await asyncio.sleep(0.1)
        gated.gate.set()
        result = await asyncio.wait_for(call, 5)
        np.testing.assert_array_equal(result.as_numpy("y"), 3 * x)
        await stopping
        await client.close()
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", server.port)) != 0


def test_fast_listen_is_gone_with_a_message_that_says_what_replaced_it():
    with pytest.raises(ConfigError) as error:
        config_module.parse({**CONFIG, "fast_listen": "127.0.0.1:0"})
    assert "fast_listen: gone" in str(error.value) and "grpc_aio_listen" in str(error.value)


def test_many_connections_and_threads_at_once():
    """Several sync clients (one connection each) from threads, all answered right."""

    async def scenario():
        async with running(CONFIG) as server:
            errors: list = []

            def worker(k: int) -> None:
                with tc.InferenceServerClient(address(server)) as client:
                    for i in range(50):
                        x = np.full((1, 4), k * 100 + i, dtype=np.float32)
                        y = client.infer("affine", inputs(x=x)).as_numpy("y")
                        if not np.array_equal(y, 2 * x + 1):
                            errors.append((k, i))

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            await in_thread(lambda: [t.join() for t in threads])
            return errors

    assert asyncio.run(scenario()) == []
