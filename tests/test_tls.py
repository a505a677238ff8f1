"""TLS and mutual TLS on the gRPC, HTTP and admin listeners and towards backends, with
real handshakes: throwaway certificates (tests/support/certs.py), the official clients,
rotation on disk without a reload, and a reload that points at other files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aio
import tritonclient.http.aio as http_aio
from coalesce import config as config_module
from coalesce.http2.server import ServerConnection
from coalesce.server import Server
from tritonclient.utils import InferenceServerException

from tests.client import affine_expected, inputs
from tests.conftest import ROOT, local_backend, running
from tests.support.certs import CA, PKI, Issued
from tests.support.recording import RecordingBatchService, RecordingKServe, serving

X = np.arange(8, dtype=np.float32).reshape(2, 4)
AFFINE = {"backends": {"a": local_backend("affine")}, "routes": [{"model": "m", "backend": "a"}]}
HANDSHAKE_FAILED = (aiohttp.ClientError, ssl.SSLError, ConnectionError)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def grpc_client(port: int, ca: Path | None, client: Issued | None = None):
    """tritonclient over TLS trusting `ca` (plaintext when None), with its own connection."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if ca is None:
        return aio.InferenceServerClient(f"127.0.0.1:{port}", channel_args=options)
    return aio.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        root_certificates=str(ca),
        private_key=str(client.key) if client else None,
        certificate_chain=str(client.cert) if client else None,
        channel_args=options,
    )


async def grpc_infer(port: int, ca: Path | None, client: Issued | None = None) -> None:
    """One inference; raises InferenceServerException if the call (or handshake) fails."""
    triton = grpc_client(port, ca, client)
    try:
        result = await triton.infer("m", inputs(x=X), client_timeout=5)
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
    finally:
        await triton.close()


def http_context(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


async def http_infer(port: int, ca: Path, client: Issued | None = None) -> None:
    triton = http_aio.InferenceServerClient(
        f"127.0.0.1:{port}", ssl=True, ssl_context=http_context(ca, client)
    )
    try:
        x = http_aio.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        result = await triton.infer("m", [x])
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
    finally:
        await triton.close()


async def get(url: str, context: ssl.SSLContext | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as answer:
        return answer.status


def admin_port(server: Server) -> int:
    return server._admin.addresses[0][1]  # type: ignore[union-attr]


async def test_grpc_http_and_admin_listeners_serve_tls(pki):
    data = {**AFFINE, "tls": pki.tls(), "http": "127.0.0.1:0"}
    data |= {"admin": "127.0.0.1:0", "admin_tls": pki.tls()}
    async with running(data) as server:
        await grpc_infer(server.port, pki.ca.path)
        await http_infer(server.http_port, pki.ca.path)
        health = f"https://127.0.0.1:{admin_port(server)}/healthz"
        assert await get(health, http_context(pki.ca.path)) == 200
        with pytest.raises(InferenceServerException):  # a plaintext client gets nowhere
            await grpc_infer(server.port, None)
        with pytest.raises(HANDSHAKE_FAILED):
            await get(f"http://127.0.0.1:{server.http_port}/v2/health/live")
        with pytest.raises(HANDSHAKE_FAILED):  # a client that does not trust the CA
            await get(
                f"https://127.0.0.1:{server.http_port}/v2/health/live", ssl.create_default_context()
            )


async def test_a_closed_tls_connection_is_freed_at_once(pki):
    """Its objects (the TLS ones hold ~30 KiB of buffers) go when it closes, not at the
    next full collection: after a flood of short connections RSS comes back."""
    async with running({**AFFINE, "tls": pki.tls()}) as server:
        listener = server._native.listener  # type: ignore[union-attr]
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                await grpc_infer(server.port, pki.ca.path)
            for _ in range(100):
                if not listener.connections:
                    break
                await asyncio.sleep(0.02)
            left = [o for o in gc.get_objects() if isinstance(o, ServerConnection)]
            assert not [c for c in left if c.app is listener.app], "closed connections kept"
        finally:
            gc.enable()


async def test_mutual_tls_refuses_a_client_without_a_certificate(pki, tmp_path):
    stranger = CA(tmp_path, "stranger").issue("eve", client=True)
    data = {**AFFINE, "tls": pki.tls(mutual=True), "http": "127.0.0.1:0"}
    async with running(data) as server:
        await grpc_infer(server.port, pki.ca.path, pki.alice)
        await http_infer(server.http_port, pki.ca.path, pki.alice)
        for client in (None, stranger):
            with pytest.raises(InferenceServerException) as refused:
                await grpc_infer(server.port, pki.ca.path, client)
            assert "UNAVAILABLE" in str(refused.value.status())
            with pytest.raises(HANDSHAKE_FAILED):
                await http_infer(server.http_port, pki.ca.path, client)


def rotate(source: Issued, target: Issued) -> None:
    """Replace certificate and key as a secret volume does: each file atomically."""
    for src, dst in ((source.key, target.key), (source.cert, target.cert)):
        temporary = dst.with_suffix(".tmp")
        shutil.copy(src, temporary)
        os.replace(temporary, dst)


async def test_rotated_files_serve_from_the_next_handshake_without_a_reload(pki, tmp_path):
    """Server certificate and client CA both rotate to a new CA on disk: new connections
    get the new certificate and only clients of the new CA are let in."""
    new = PKI(tmp_path, "rotated")
    live = Issued(tmp_path / "live.pem", tmp_path / "live.key")
    rotate(pki.server, live)
    client_ca = tmp_path / "clients.pem"
    shutil.copy(pki.ca.path, client_ca)
    tls = {"cert": str(live.cert), "key": str(live.key), "client_ca": str(client_ca)}
    data = {**AFFINE, "tls": {**tls, "require_client_cert": True}, "http": "127.0.0.1:0"}
    async with running(data) as server:
        await grpc_infer(server.port, pki.ca.path, pki.alice)
        await http_infer(server.http_port, pki.ca.path, pki.alice)
        shutil.copy(new.server.key, live.key)  # half-way: a key without its certificate
        await grpc_infer(server.port, pki.ca.path, pki.alice)  # the old pair serves on
        await http_infer(server.http_port, pki.ca.path, pki.alice)
        rotate(new.server, live)
        shutil.copy(new.ca.path, client_ca.with_suffix(".tmp"))
        os.replace(client_ca.with_suffix(".tmp"), client_ca)
        await grpc_infer(server.port, new.ca.path, new.alice)
        await http_infer(server.http_port, new.ca.path, new.alice)
        with pytest.raises(InferenceServerException):  # old server certificate: gone
            await grpc_infer(server.port, pki.ca.path, pki.alice)
        with pytest.raises(HANDSHAKE_FAILED):
            await http_infer(server.http_port, pki.ca.path, pki.alice)
        with pytest.raises(InferenceServerException):  # old client CA: no longer trusted
            await grpc_infer(server.port, new.ca.path, pki.alice)
        with pytest.raises(HANDSHAKE_FAILED):
            await http_infer(server.http_port, new.ca.path, pki.alice)


async def test_a_reload_points_the_listeners_at_other_files(pki, tmp_path):
    new = PKI(tmp_path, "other")
    first = config_module.parse(
        {**AFFINE, "listen": "127.0.0.1:0", "admin": None, "tls": pki.tls()}
    )
    second = config_module.parse({**first.model_dump(), "tls": new.tls()})
    server = Server(first, source=lambda: second)
    await server.start()
    try:
        await grpc_infer(server.port, pki.ca.path)
        await server.reload()
        await grpc_infer(server.port, new.ca.path)
        with pytest.raises(InferenceServerException):
            await grpc_infer(server.port, pki.ca.path)
    finally:
        await server.stop(grace=1)


@contextlib.asynccontextmanager
async def tls_backend(pki: PKI, service: object, server: Issued) -> AsyncIterator[str]:
    """`service` over TLS with `server`'s certificate, requiring clients of `pki`'s CA."""
    credentials = grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)], root_certificates=pki.ca.pem, require_client_auth=True
    )
    async with serving(service, credentials) as target:
        yield target


@pytest.mark.parametrize("transport", ["native", "grpc"])
async def test_grpc_backend_over_mutual_tls_with_a_server_name_override(pki, transport):
    """The backend's certificate names only backend.internal: the channel must expect that
    name, and present a client certificate, or the backend is never ready (on Coalesce's
    own HTTP/2 client and on gRPC core's channel)."""
    named = pki.ca.issue("backend", dns=("backend.internal",), local=False, stem="named")
    service = RecordingBatchService()
    async with tls_backend(pki, service, named) as target:
        client = {"ca": str(pki.ca.path), "cert": str(pki.alice.cert), "key": str(pki.alice.key)}
        good = {**client, "server_name": "backend.internal"}
        backends = {
            "good": {"type": "grpc", "target": target, "model": "affine", "tls": good},
            "no-cert": {
                "type": "grpc",
                "target": target,
                "model": "affine",
                "tls": {"ca": str(pki.ca.path), "server_name": "backend.internal"},
            },
            "no-name": {"type": "grpc", "target": target, "model": "affine", "tls": client},
        }
        for block in backends.values():
            block["transport"] = transport
        data = {"backends": backends, "routes": [{"model": n, "backend": n} for n in backends]}
        async with running(data) as server:
            assert {n: b.ready for n, b in server.router.backends.items()} == {
                "good": True,
                "no-cert": False,
                "no-name": False,
            }
            triton = grpc_client(server.port, None)
            try:
                result = await triton.infer("good", inputs(x=X))
                np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
                with pytest.raises(InferenceServerException, match=r"UNAVAILABLE|not ready"):
                    await triton.infer("no-cert", inputs(x=X))
            finally:
                await triton.close()
    assert len(service.calls) == 1


async def test_triton_and_tfserving_adapters_over_mutual_tls(pki):
    """triton adapter -> a Triton look-alike over mTLS; tfserving adapter -> another
    Coalesce whose listener requires client certificates."""
    mtls = {"ca": str(pki.ca.path), "cert": str(pki.alice.cert), "key": str(pki.alice.key)}
    async with tls_backend(pki, RecordingKServe(), pki.server) as kserve:
        back = {**AFFINE, "routes": [{"model": "affine", "backend": "a"}]}
        async with running({**back, "tls": pki.tls(mutual=True)}) as coalesce:
            backends = {
                "triton": {"type": "triton", "target": kserve, "model": "affine", "tls": mtls},
                "tf": {
                    "type": "tfserving",
                    "target": f"127.0.0.1:{coalesce.port}",
                    "model": "affine",
                    "tls": mtls,
                },
            }
            routes = [{"model": n, "backend": n} for n in backends]
            async with running({"backends": backends, "routes": routes}) as front:
                triton = grpc_client(front.port, None)
                try:
                    for model in backends:
                        result = await triton.infer(model, inputs(x=X))
                        np.testing.assert_allclose(result.as_numpy("y"), affine_expected(X)["y"])
                finally:
                    await triton.close()


async def test_rotated_backend_files_rebuild_that_backend_on_reload(pki, tmp_path):
    """A channel cannot change credentials: a reload sees the new client certificate
    (its digest is part of the backend's block) and rebuilds only that backend."""
    live = Issued(tmp_path / "client.pem", tmp_path / "client.key")
    rotate(pki.alice, live)
    service = RecordingBatchService()
    async with tls_backend(pki, service, pki.server) as target:
        tls = {"ca": str(pki.ca.path), "cert": str(live.cert), "key": str(live.key)}
        data = {
            "listen": "127.0.0.1:0",
            "admin": None,
            "backends": {
                "b": {"type": "grpc", "target": target, "model": "affine", "tls": tls},
                "a": local_backend("affine"),
            },
            "routes": [{"model": "m", "backend": "b"}, {"model": "n", "backend": "a"}],
        }
        server = Server(config_module.parse(data), source=lambda: config_module.parse(data))
        await server.start()
        try:
            assert not any("backend b" in c for c in await server.reload())  # nothing moved
            rotate(pki.bob, live)
            assert "backend b: changed" in await server.reload()
            await grpc_infer_model(server.port, "m")
        finally:
            await server.stop(grace=1)
    assert len(service.calls) == 1


async def grpc_infer_model(port: int, model: str) -> None:
    triton = grpc_client(port, None)
    try:
        result = await triton.infer(model, inputs(x=X))
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
    finally:
        await triton.close()


@pytest.mark.parametrize("transport", ["native", "grpc"])
async def test_a_real_triton_over_mutual_tls(pki, transport):
    """Coalesce's triton adapter against Triton itself serving gRPC with mutual TLS."""
    from tests.support.triton import TritonServer

    flags = [
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={pki.server.cert}",
        f"--grpc-server-key={pki.server.key}",
        f"--grpc-root-cert={pki.ca.path}",
    ]
    mtls = {"ca": str(pki.ca.path), "cert": str(pki.alice.cert), "key": str(pki.alice.key)}
    triton = TritonServer(ROOT / "tests" / "triton_models", extra_args=flags)
    await asyncio.to_thread(triton.start)
    try:
        backend = {
            "type": "triton",
            "target": triton.grpc_url,
            "model": "affine",
            "tls": mtls,
            "transport": transport,
        }
        routes = [{"model": "m", "backend": "t"}]
        async with running({"backends": {"t": backend}, "routes": routes}) as server:
            await grpc_infer_model(server.port, "m")
    finally:
        await asyncio.to_thread(triton.stop)


def test_coalesce_health_speaks_tls_and_mutual_tls(pki, coalesce_process):
    """`coalesce health --tls-*` against a server with `tls:` (mutual TLS required)."""
    import subprocess
    import sys

    proxy = coalesce_process({**AFFINE, "tls": pki.tls(mutual=True)})

    def health(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "coalesce.cli", "health", "--address", proxy.url, *flags],
            capture_output=True,
            text=True,
            timeout=30,
        )

    client = ["--tls-cert", str(pki.alice.cert), "--tls-key", str(pki.alice.key)]
    good = health("--tls-ca", str(pki.ca.path), *client, "--tls-server-name", "localhost")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "SERVING" in good.stdout
    assert health("--tls-ca", str(pki.ca.path), "--tls-server-name", "localhost").returncode == 1
    assert health().returncode == 1  # plaintext against a TLS port
