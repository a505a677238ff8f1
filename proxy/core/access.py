"""Admission of a request to its route, before it is decoded: who may call, how big,
and which of its metadata travels on; and the guard on mutating admin calls.

Runs once per request on every front end, so it is a few attribute reads when a
route sets nothing, and a set lookup per check when it does (a bearer token is
compared by its SHA-256 digest: a lookup that reveals nothing about the secret).
Each transport supplies a `Caller` that reads its headers and its client
certificate lazily, so a check nobody configured costs nothing.

    missing or wrong token / no client certificate   -> Unauthenticated (401)
    a verified certificate naming no allowed client  -> PermissionDenied (403)
    over the route's max_request_bytes               -> TooLarge (RESOURCE_EXHAUSTED, 413)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from aiohttp import web
from coalesce.config import Route, RouteAuth
from coalesce.errors import NotFound, PermissionDenied, TooLarge, Unauthenticated
from pydantic import SecretStr

from . import forwarding
from .forwarding import Metadata

if TYPE_CHECKING:
    from .router import Router

ADMIN_TOKEN: web.AppKey[Callable[[], SecretStr | None]] = web.AppKey("admin_token")
"""The admin app's current `admin_token` (a callable, so a reload is seen at once)."""

_REQUEST_BYTES: ContextVar[int | None] = ContextVar("coalesce_request_bytes", default=None)


class Caller(Protocol):
    """What a transport knows about the caller of one request."""

    def header(self, name: str) -> str | None:
        """The value of a metadata entry / HTTP header (`name` lower-case)."""

    def identities(self) -> frozenset[str] | None:
        """CN and DNS/URI SANs of the verified client certificate; None without one."""


class GrpcCaller:
    __slots__ = ("_context", "_metadata")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._metadata: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        """(A repeated key gives its last value; -bin keys, whose values are bytes, are
        never asked for: config refuses them.)"""
        if self._metadata is None:
            self._metadata = dict(self._context.invocation_metadata() or ())
        return self._metadata.get(name)

    def identities(self) -> frozenset[str] | None:
        auth = self._context.auth_context()  # peer_*: SANs by kind (we take DNS and URI)
        names = [*auth.get("x509_common_name", ()), *auth.get("peer_dns", ())]
        names += auth.get("peer_uri", ())
        return frozenset(n.decode(errors="replace") for n in names) if names else None


class HttpCaller:
    __slots__ = ("_request",)

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def header(self, name: str) -> str | None:
        return self._request.headers.get(name)

    def identities(self) -> frozenset[str] | None:
        transport = self._request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if not cert:
            return None
        subject = cert.get("subject", ())
        names = [value for rdn in subject for key, value in rdn if key == "commonName"]
        names += [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI")]
        return frozenset(names)


def sized(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A gRPC request deserializer that notes the message's size for `request_bytes()`.

    gRPC deserializes in the task that then runs the handler (or iterates the
    stream), so the size is read back there without re-serializing the message."""

    def deserialize(data: bytes) -> Any:
        _REQUEST_BYTES.set(len(data))
        return deserializer(data)

    return deserialize


def request_bytes() -> int | None:
    """The size of the gRPC message being handled in this task (see `sized`)."""
    return _REQUEST_BYTES.get()


def describe(route: Route) -> str:
    pinned = f" version {route.version}" if route.version is not None else ""
    pinned += f" label '{route.label}'" if route.label is not None else ""
    return f"route '{route.model}'{pinned}"


def route_of(router: Router, model: str, version: str = "", label: str = "") -> Route:
    """The route a request reaches (the one router.get found the backend by)."""
    route = router.table.find(model, version, label)
    if route is None:
        raise NotFound(f"model '{model}' is not routed by this server")
    return route


def admit(router: Router, route: Route, caller: Caller, size: int | None) -> Metadata:
    """Check a request against its route; the metadata to forward to its backend."""
    if route.auth is not None:
        _authorize(route, route.auth, caller)
    check_size(route, size)
    allowed = router.config.backends[route.backend].forward_metadata
    return forwarding.pick(allowed, caller.header) if allowed else ()


def check_size(route: Route, size: int | None) -> None:
    limit = route.max_request_bytes
    if limit is not None and size is not None and size > limit:
        raise TooLarge(
            f"request of {size} bytes exceeds the {limit}-byte max_request_bytes of "
            f"{describe(route)}"
        )


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    scheme, _, token = (value or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def _authorize(route: Route, auth: RouteAuth, caller: Caller) -> None:
    if auth.token_digests:
        token = bearer(caller.header("authorization"))
        if token is None:
            raise Unauthenticated(f"{describe(route)} needs an 'authorization: Bearer' token")
        if hashlib.sha256(token.encode()).hexdigest() not in auth.token_digests:
            raise Unauthenticated(f"{describe(route)}: the bearer token is not accepted")
    if auth.allowed_client_cns:
        names = caller.identities()
        if names is None:
            raise Unauthenticated(f"{describe(route)} needs a verified client certificate")
        if names.isdisjoint(auth.allowed_client_cns):
            who = ", ".join(sorted(names))
            raise PermissionDenied(f"{describe(route)}: client {who} is not allowed")


def _loopback(request: web.Request) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer or not isinstance(peer, tuple):
        return False  # a unix socket or a closed connection: not provably local over TCP
    address = ipaddress.ip_address(peer[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def require_admin(request: web.Request) -> None:
    """Call first in a mutating admin handler (POST /reload, ...).

    With `admin_token` set, every caller must send it as a bearer token (401
    otherwise); without one, only loopback peers are served (403 from elsewhere).
    """
    token = request.app[ADMIN_TOKEN]()
    what = f"{request.method} {request.path}"
    if token is not None:
        sent = bearer(request.headers.get("Authorization")) or ""
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            raise Unauthenticated(f"{what} needs the admin token ('Authorization: Bearer ...')")
        return
    if not _loopback(request):
        raise PermissionDenied(f"{what} is served to loopback callers only (no admin_token set)")
