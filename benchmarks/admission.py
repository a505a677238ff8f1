"""What the per-request security checks cost: `access.admit` for one request, per kind
of route, in-process (no network), against a baseline that only finds the route.

    python -m benchmarks.admission [--number 200000]

`admit` runs on every inference request of every front end, before decoding, so this
is the whole added hot-path cost of routes with tokens, identities, size limits and
metadata forwarding. The caller stands in for a gRPC context with a realistic
metadata list (tritonclient sends about five entries) and a verified client
certificate's auth context, as gRPC gives them.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import timeit
from pathlib import Path

from coalesce import config as config_module
from coalesce.core import access
from coalesce.core.router import Router

from tests.support.certs import PKI

TOKEN = "a-long-random-bearer-token-0123456789abcdef"


class _Context:
    """The two ServicerContext calls `access.GrpcCaller` makes, with gRPC's shapes."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            ("user-agent", "grpc-python/1.81.2 grpc-c/52.0.0 (linux; chttp2)"),
            ("authorization", f"Bearer {TOKEN}"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("x-tenant", "team-a"),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
        )

    def auth_context(self) -> dict[str, list[bytes]]:
        return {
            "transport_security_type": [b"ssl"],
            "x509_common_name": [b"alice"],
            "x509_subject_alternative_name": [b"alice.clients.internal"],
        }


def _router(pki: PKI) -> Router:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    local = {"type": "local", "model": "coalesce.example_model:load"}
    forward = {  # never connected: Router() only indexes the config
        "type": "grpc",
        "target": "127.0.0.1:1",
        "forward_metadata": ["authorization", "traceparent"],
    }
    routes = [
        {"model": "open", "backend": "plain"},
        {"model": "token", "backend": "plain", "auth": {"bearer_token_sha256": [digest]}},
        {"model": "size", "backend": "plain", "max_request_bytes": 1 << 20},
        {"model": "forward", "backend": "forwarding"},
        {"model": "identity", "backend": "plain", "auth": {"allowed_client_cns": ["alice"]}},
    ]
    data = {
        "backends": {"plain": local, "forwarding": forward},
        "routes": routes,
        "tls": pki.tls(mutual=True),
    }
    return Router(config_module.parse(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        router, context = _router(PKI(Path(folder))), _Context()
    cases = ["open", "token", "size", "forward", "identity"]

    def lookup_only(model: str) -> None:
        access.route_of(router, model)

    def full(model: str) -> None:
        route = access.route_of(router, model)
        access.admit(router, route, access.GrpcCaller(context), 1000)  # type: ignore[arg-type]

    base = min(timeit.repeat(lambda: lookup_only("open"), number=args.number, repeat=5))
    print(f"route lookup alone: {base / args.number * 1e9:6.0f} ns")
    for model in cases:
        best = min(timeit.repeat(lambda m=model: full(m), number=args.number, repeat=5))
        per_call, over = best / args.number * 1e9, (best - base) / args.number * 1e9
        print(f"{model:>9}: {per_call:6.0f} ns per request ({over:+.0f} ns over the lookup)")


if __name__ == "__main__":
    main()
