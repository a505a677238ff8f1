"""Per-route access (bearer tokens, mTLS identities), per-route and global size limits on
every front end, and the guard on mutating admin calls (loopback or the admin token)."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aio
import yaml
from aiohttp import web
from coalesce import ConfigError
from coalesce import config as config_module
from coalesce.codecs import wire
from coalesce.codecs.tf_tensors import fill_proto
from coalesce.core import access
from coalesce.ops import admin
from coalesce.server import Server
from tritonclient.utils import InferenceServerException

from tests.client import affine_expected, inputs
from tests.conftest import ROOT, local_backend, running
from tests.support.certs import PKI, Issued

X = np.arange(8, dtype=np.float32).reshape(2, 4)
BIG = np.zeros((100, 4), dtype=np.float32)  # 1600 bytes of tensor data
ONE_ROUTE = {"backends": {"a": local_backend("affine")}, "routes": [{"model": "m", "backend": "a"}]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("# team A\ntoken-one\n\ntoken-two\n")
    return str(path)


def routes(tokens_file: str) -> dict:
    digest = hashlib.sha256(b"token-three").hexdigest()
    return {
        "backends": {"a": local_backend("affine")},
        "routes": [
            {"model": "open", "backend": "a"},
            {"model": "tokens", "backend": "a", "auth": {"bearer_tokens_file": tokens_file}},
            {"model": "hashed", "backend": "a", "auth": {"bearer_token_sha256": [digest]}},
            {"model": "small", "backend": "a", "max_request_bytes": 300},
        ],
    }


async def kserve(port: int, model: str, headers=None, x=X, tls: tuple | None = None):
    """(status code name, details) of one ModelInfer via tritonclient; "OK" on success."""
    if tls is None:
        client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    else:
        ca, who = tls
        client = aio.InferenceServerClient(
            f"127.0.0.1:{port}",
            ssl=True,
            root_certificates=str(ca),
            private_key=str(who.key) if who else None,
            certificate_chain=str(who.cert) if who else None,
            channel_args=[("grpc.use_local_subchannel_pool", 1)],
        )
    try:
        result = await client.infer(model, inputs(x=x), headers=headers)
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(x)["y"])
        return "OK", ""
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode."), exc.message()
    finally:
        await client.close()


async def tf_predict(port: int, model: str, metadata=(), x=X) -> tuple[str, str]:
    request = wire.PredictRequest()
    request.model_spec.name = model
    fill_proto(request.inputs["x"], x, "x", content=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        predict = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=wire.PredictRequest.SerializeToString,
            response_deserializer=wire.PredictResponse.FromString,
        )
        try:
            await predict(request, metadata=metadata, timeout=5)
            return "OK", ""
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""


async def post(url: str, body: dict, headers=None, context=None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers, ssl=context) as answer,
    ):
        return answer.status, await answer.text()


def v2_body(x=X) -> dict:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


async def rest(port: int, model: str, headers=None, x=X, context=None) -> tuple[int, str]:
    scheme = "https" if context else "http"
    return await post(
        f"{scheme}://127.0.0.1:{port}/v2/models/{model}/infer", v2_body(x), headers, context
    )


async def tf_rest(port: int, model: str, headers=None, x=X) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/v1/models/{model}:predict"
    return await post(url, {"instances": x.tolist()}, headers)


# --- bearer tokens -----------------------------------------------------------------------


async def test_bearer_tokens_guard_their_routes_on_every_front_end(tokens_file):
    async with running({**routes(tokens_file), "http": "127.0.0.1:0"}) as server:
        port, http = server.port, server.http_port
        assert await kserve(port, "open") == ("OK", "")
        for model, token in (("tokens", "token-two"), ("hashed", "token-three")):
            good = {"authorization": f"Bearer {token}"}
            assert await kserve(port, model, good) == ("OK", "")
            assert await tf_predict(port, model, tuple(good.items())) == ("OK", "")
            assert (await rest(http, model, {"Authorization": f"bearer {token}"}))[0] == 200
            assert (await tf_rest(http, model, good))[0] == 200

            code, message = await kserve(port, model)
            assert code == "UNAUTHENTICATED"
            assert f"route '{model}' needs an 'authorization: Bearer' token" in message
            assert (await tf_predict(port, model))[0] == "UNAUTHENTICATED"
            bad = {"authorization": "Bearer token-nope"}
            code, message = await kserve(port, model, bad)
            assert (code, message) == (
                "UNAUTHENTICATED",
                f"route '{model}': the bearer token is not accepted",
            )
            status, body = await rest(http, model, bad)
            assert status == 401 and f"route '{model}'" in json.loads(body)["error"]
            assert (await tf_rest(http, model))[0] == 401
        # metadata of a guarded model is guarded too; readiness stays open for probes
        client = aio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert await client.is_model_ready("tokens")
            with pytest.raises(InferenceServerException, match="needs an 'authorization"):
                await client.get_model_metadata("tokens")
        finally:
            await client.close()


# --- client certificate identities -------------------------------------------------------


def cn_routes(pki: PKI, require: bool) -> dict:
    return {
        "backends": {"a": local_backend("affine")},
        "routes": [
            {"model": "open", "backend": "a"},
            {
                "model": "alice-only",
                "backend": "a",
                "auth": {"allowed_client_cns": ["alice", "checkout.clients.internal"]},
            },
        ],
        "tls": pki.tls(mutual=True, require=require),
        "http": "127.0.0.1:0",
    }


def context(pki: PKI, who: Issued | None) -> ssl.SSLContext:
    result = ssl.create_default_context(cafile=str(pki.ca.path))
    if who is not None:
        result.load_cert_chain(str(who.cert), str(who.key))
    return result


async def test_client_identities_guard_a_route(pki):
    """A client is known by its certificate's CN or a DNS/URI subject alternative name."""
    checkout = pki.ca.issue("pod-7f9c", dns=("checkout.clients.internal",), client=True)
    async with running(cn_routes(pki, require=True)) as server:
        port, http = server.port, server.http_port
        assert await kserve(port, "alice-only", tls=(pki.ca.path, pki.alice)) == ("OK", "")
        assert await kserve(port, "alice-only", tls=(pki.ca.path, checkout)) == ("OK", "")
        assert (await rest(http, "alice-only", context=context(pki, checkout)))[0] == 200
        assert await kserve(port, "open", tls=(pki.ca.path, pki.bob)) == ("OK", "")
        code, message = await kserve(port, "alice-only", tls=(pki.ca.path, pki.bob))
        assert code == "PERMISSION_DENIED"
        assert message == "route 'alice-only': client bob is not allowed"
        assert (await rest(http, "alice-only", context=context(pki, pki.alice)))[0] == 200
        status, body = await rest(http, "alice-only", context=context(pki, pki.bob))
        assert status == 403 and "client bob is not allowed" in body


async def test_an_http_caller_without_a_certificate_is_unauthenticated(pki):
    """With client certificates optional, the open route serves anyone and the guarded
    one asks for a certificate."""
    async with running(cn_routes(pki, require=False)) as server:
        http = server.http_port
        assert (await rest(http, "open", context=context(pki, None)))[0] == 200
        status, body = await rest(http, "alice-only", context=context(pki, None))
        assert status == 401 and "needs a verified client certificate" in body
        assert (await rest(http, "alice-only", context=context(pki, pki.alice)))[0] == 200


# --- size limits -------------------------------------------------------------------------


async def test_a_route_size_limit_refuses_only_that_routes_big_requests(tokens_file):
    async with running({**routes(tokens_file), "http": "127.0.0.1:0"}) as server:
        port, http = server.port, server.http_port
        assert await kserve(port, "small") == ("OK", "")
        assert await kserve(port, "open", x=BIG) == ("OK", "")
        code, message = await kserve(port, "small", x=BIG)
        assert code == "RESOURCE_EXHAUSTED"
        assert "exceeds the 300-byte max_request_bytes of route 'small'" in message
        assert (await tf_predict(port, "small", x=BIG))[0] == "RESOURCE_EXHAUSTED"
        status, body = await rest(http, "small", x=BIG)
        assert status == 413 and "300-byte max_request_bytes of route 'small'" in body
        assert (await tf_rest(http, "small", x=BIG))[0] == 413
        assert (await rest(http, "open", x=BIG))[0] == 200
        assert (await rest(http, "small"))[0] == 200
        answers = await stream(port, [("small", BIG), ("open", BIG), ("small", X)])
        assert "300-byte max_request_bytes of route 'small'" in answers[0]
        assert answers[1:] == ["OK", "OK"]


async def stream(port: int, calls: list[tuple[str, np.ndarray]]) -> list[str]:
    """Each request's outcome on one ModelStreamInfer stream, in order ("OK" or the error)."""

    async def requests():
        for i, (model, x) in enumerate(calls):
            yield {"model_name": model, "inputs": inputs(x=x), "request_id": str(i)}

    client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    answers: dict[int, str] = {}
    try:
        async for result, error in client.stream_infer(requests()):
            if error is None:
                answers[int(result.get_response().id)] = "OK"
            else:
                answers[len(answers)] = error.message()  # errors carry no id here
            if len(answers) == len(calls):
                break
    finally:
        await client.close()
    return [answers[i] for i in range(len(calls))]


async def test_the_global_message_limit_answers_resource_exhausted_and_413(tokens_file):
    data = {**routes(tokens_file), "http": "127.0.0.1:0", "max_message_mb": 0.001}
    async with running(data) as server:
        assert await kserve(server.port, "open") == ("OK", "")
        code, message = await kserve(server.port, "open", x=BIG)
        assert code == "RESOURCE_EXHAUSTED" and "1048" in message  # grpc names the limit
        status, body = await rest(server.http_port, "open", x=BIG)
        assert status == 413 and "1048" in body


# --- admin --------------------------------------------------------------------------------


def non_loopback_address() -> str:
    """An address of this machine that is not loopback (skip if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the interface
        except OSError:
            pytest.skip("no non-loopback interface")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback interface")
    return address


async def mutate(request: web.Request) -> web.Response:
    """A stand-in mutating admin handler: the guard, then the work."""
    access.require_admin(request)
    return web.json_response({"done": True})


async def admin_with_mutation(server) -> tuple[web.AppRunner, int]:
    app = admin.make_app(server.router)
    app.router.add_post("/mutate", mutate)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", 0).start()
    return runner, runner.addresses[0][1]


async def test_mutating_admin_calls_are_loopback_only_without_a_token():
    remote = non_loopback_address()
    async with running(ONE_ROUTE) as server:
        runner, port = await admin_with_mutation(server)
        try:
            assert (await post(f"http://127.0.0.1:{port}/mutate", {}))[0] == 200
            status, body = await post(f"http://{remote}:{port}/mutate", {})
            assert status == 403 and "loopback callers only" in body
            assert (
                await post(f"http://{remote}:{port}/mutate", {}, {"Authorization": "Bearer x"})
            )[0] == 403
        finally:
            await runner.cleanup()


async def test_an_admin_token_is_required_from_everyone_once_set():
    remote = non_loopback_address()
    async with running({**ONE_ROUTE, "admin_token": "s3cret"}) as server:
        runner, port = await admin_with_mutation(server)
        try:
            for host in ("127.0.0.1", remote):
                url = f"http://{host}:{port}/mutate"
                status, body = await post(url, {})
                assert status == 401 and "needs the admin token" in body
                assert (await post(url, {}, {"Authorization": "Bearer wrong"}))[0] == 401
                assert (await post(url, {}, {"Authorization": "Bearer s3cret"}))[0] == 200
            config = json.loads(await get_text(f"http://127.0.0.1:{port}/api/config"))
            assert "s3cret" not in json.dumps(config)  # the effective config hides it
        finally:
            await runner.cleanup()


async def test_post_reload_is_refused_from_elsewhere_without_a_token():
    remote = non_loopback_address()
    config = config_module.parse({**ONE_ROUTE, "listen": "127.0.0.1:0", "admin": "0.0.0.0:0"})
    server = Server(config, source=lambda: config)
    await server.start()
    try:
        port = server._admin.addresses[0][1]  # type: ignore[union-attr]
        status, body = await post(f"http://{remote}:{port}/reload", {})
        assert status == 403 and "POST /reload is served to loopback callers only" in body
        assert (await post(f"http://127.0.0.1:{port}/reload", {}))[0] == 200
    finally:
        await server.stop(grace=1)


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return await answer.text()


# --- config ------------------------------------------------------------------------------


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as error:
        config_module.parse(data)
    return error.value.problems


def test_security_config_errors_name_their_keys(pki, tmp_path):
    base = {"backends": {"a": local_backend("affine")}}
    route = {"model": "m", "backend": "a"}
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert problems({**base, "routes": [{**route, "auth": {"allowed_client_cns": ["x"]}}]}) == [
        "routes.0.auth.allowed_client_cns: needs tls.client_ca"
    ]
    assert problems({**base, "routes": [{**route, "auth": {}}]}) == [
        "routes.0.auth: set bearer_tokens_file, bearer_token_sha256 or allowed_client_cns"
    ]
    assert problems(
        {**base, "routes": [{**route, "auth": {"bearer_tokens_file": str(empty)}}]}
    ) == [f"routes.0.auth: bearer_tokens_file: {empty} holds no token"]
    assert problems({**base, "routes": [{**route, "max_request_bytes": 0}]}) == [
        "routes.0.max_request_bytes: must be >= 1"
    ]
    forward = {"type": "grpc", "target": "127.0.0.1:1", "forward_metadata": ["grpc-timeout"]}
    assert problems({"backends": {"a": forward}, "routes": [route]}) == [
        "backends.a.forward_metadata: 'grpc-timeout' is not a forwardable text header name"
    ]
    local = {**local_backend("affine"), "forward_metadata": ["authorization"]}
    assert problems({"backends": {"a": local}, "routes": [route]}) == [
        "backends.a: forward_metadata: a local or python model receives no metadata"
    ]
    mismatched = {"cert": str(pki.server.cert), "key": str(pki.alice.key)}
    (problem,) = problems({**base, "routes": [route], "tls": mismatched})
    assert problem.startswith("tls: cannot load the certificate, key or CA")
    half = {"type": "grpc", "target": "127.0.0.1:1", "tls": {"cert": str(pki.alice.cert)}}
    assert problems({"backends": {"a": half}, "routes": [route]}) == [
        "backends.a.tls: cert and key go together"
    ]


def test_the_readme_security_example_loads(pki, tokens_file):
    """The README's example, with its paths pointed at throwaway files."""
    text = (ROOT / "README.md").read_text().split("### Security", 1)[1]
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    files = {
        "/etc/coalesce/tls/server.pem": pki.server.cert,
        "/etc/coalesce/tls/server.key": pki.server.key,
        "/etc/coalesce/tls/clients-ca.pem": pki.ca.path,
        "/etc/coalesce/tls/backend-ca.pem": pki.ca.path,
        "/etc/coalesce/tls/client.pem": pki.alice.cert,
        "/etc/coalesce/tls/client.key": pki.alice.key,
        "/etc/coalesce/tokens": tokens_file,
    }
    for path, real in files.items():
        example = example.replace(path, str(real))
    config = config_module.parse(yaml.safe_load(example))
    assert config.routes[0].auth.token_digests == {
        hashlib.sha256(t).hexdigest() for t in (b"token-one", b"token-two")
    }
    assert config.backends["fraud"].forward_metadata == ("authorization", "traceparent")
