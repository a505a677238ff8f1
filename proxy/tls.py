"""TLS for the front ends and towards the backends, with files re-read when they change.

Certificates get rotated on disk (cert-manager, a Vault agent) without anyone telling
Coalesce, so every listener remembers the files' modification times and, before a
new handshake, loads them again if one moved:

- gRPC asks a fetcher before every handshake (`grpc.dynamic_ssl_server_credentials`);
- aiohttp's `ssl.SSLContext` calls its SNI callback on every ClientHello, which
  swaps in a context loaded from the new files (`SSLObject.context = ...`).

A half-written rotation (a key that does not match its certificate yet) keeps the
old material serving until the pair loads. Towards backends, a gRPC channel cannot
change credentials: rotated client files are used from the next config reload,
which rebuilds the backend (see config.BackendTLS).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

import grpc

from .config import BackendTLS, ServerTLS

log = logging.getLogger("coalesce")
Stamp = tuple[int, ...]


def _stamp(paths: list[str]) -> Stamp:
    """The files' mtimes (and sizes): any rewrite, even in the same second, changes it."""
    stamp: list[int] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamp += (-1, -1)
            continue
        stamp += (info.st_mtime_ns, info.st_size)
    return tuple(stamp)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def server_context(config: ServerTLS, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A listener's context for `config` (client certificates verified if a CA), offering
    `alpn` protocols (h2 for gRPC; none for aiohttp, which speaks HTTP/1.1)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.load_cert_chain(config.cert, config.key)
    if config.client_ca:
        context.load_verify_locations(config.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    return context


class ServerCertificates:
    """One listener's TLS files and the material last loaded from them.

    `update()` takes a reloaded config; `refresh()` (cheap: one stat per file) loads
    the files again when they changed. The gRPC fetcher runs on gRPC's own threads,
    hence the lock.
    """

    def __init__(self, config: ServerTLS, listener: str, alpn: tuple[str, ...] = ()) -> None:
        self.listener = listener
        self._alpn = alpn
        self._lock = threading.Lock()
        self._stamp: Stamp = ()  # of the files loaded
        self._failed: Stamp = ()  # of files that did not load: not retried until they move
        self._config = config
        self._pem: tuple[bytes, bytes, bytes | None] = (b"", b"", None)
        self._context: ssl.SSLContext
        self._loads = 0  # successful loads so far
        self._given = 0  # the load gRPC was last handed
        self.update(config)

    def update(self, config: ServerTLS) -> None:
        """Serve `config`'s files from the next handshake (a config reload)."""
        with self._lock:
            self._config = config
            self._stamp = ()
            if not self._load():
                raise OSError(f"{self.listener}: cannot load TLS files {config.cert}")

    def refresh(self) -> bool:
        """Load the files again if they changed since the last load; whether it did."""
        with self._lock:
            stamp = _stamp(self._paths())
            return stamp not in (self._stamp, self._failed) and self._load()

    def _paths(self) -> list[str]:
        config = self._config
        return [config.cert, config.key, *([config.client_ca] if config.client_ca else [])]

    def _load(self) -> bool:
        config, before = self._config, _stamp(self._paths())
        try:
            pem = (_read(config.key) or b"", _read(config.cert) or b"", _read(config.client_ca))
            context = server_context(config, self._alpn)
        except (OSError, ssl.SSLError) as exc:
            log.warning("%s: TLS files not loaded (old ones serve on): %s", self.listener, exc)
            self._failed = before
            return False
        if _stamp(self._paths()) != before:  # rewritten while being read: next handshake
            return False
        self._pem, self._context, self._stamp = pem, context, before
        self._loads += 1
        log.info("%s: TLS certificate loaded from %s", self.listener, config.cert)
        return True

    # gRPC

    def _grpc_config(self) -> Any:
        key, cert, ca = self._pem
        self._given = self._loads
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        """Called by gRPC before every handshake: new material, or None to keep the old."""
        try:
            self.refresh()
            with self._lock:
                return self._grpc_config() if self._given != self._loads else None
        except Exception:  # an exception here would fail the handshake, not explain it
            log.exception("%s: TLS refresh failed", self.listener)
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port`; client certificates are asked for only when
        required (gRPC's dynamic credentials have no optional mode)."""
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(),
            self._fetch,
            require_client_authentication=self._config.require_client_cert,
        )

    # asyncio: aiohttp and our own HTTP/2

    def ssl_context(self) -> ssl.SSLContext:
        """A context whose SNI callback hands each handshake the newest files."""
        context = server_context(self._config, self._alpn)
        context.sni_callback = self._on_hello
        return context

    def _on_hello(self, connection: Any, server_name: str | None, context: Any) -> None:
        self.refresh()
        connection.context = self._context


def peer_identity(ssl_object: ssl.SSLObject | None) -> dict[str, list[bytes]]:
    """A verified client certificate's names, keyed as gRPC's auth_context keys them
    (x509_common_name, peer_dns, peer_uri), for access rules; empty without one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return {}
    names: dict[str, list[bytes]] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.setdefault("x509_common_name", []).append(value.encode())
    for kind, value in cert.get("subjectAltName", ()):
        key = {"DNS": "peer_dns", "URI": "peer_uri"}.get(kind)
        if key:
            names.setdefault(key, []).append(value.encode())
    return names


class ClientCertificates:
    """A backend's TLS files as gRPC channel credentials (read when the channel opens)."""

    def __init__(self, config: BackendTLS) -> None:
        self.config = config

    def credentials(self) -> grpc.ChannelCredentials:
        config = self.config
        return grpc.ssl_channel_credentials(
            root_certificates=_read(config.ca),
            private_key=_read(config.key),
            certificate_chain=_read(config.cert),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel arguments TLS needs (the certificate name to expect, when overridden)."""
        name = self.config.server_name
        return [("grpc.ssl_target_name_override", name)] if name else []


def client_certificates(config: BackendTLS | None) -> ClientCertificates | None:
    return None if config is None else ClientCertificates(config)


def open_channel(
    target: str, certificates: ClientCertificates | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A plaintext channel, or a TLS one when the backend has a `tls:` block."""
    if certificates is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, certificates.credentials(), options=[*options, *certificates.options()]
    )
