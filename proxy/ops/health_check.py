"""`coalesce health`: a grpc.health.v1 client for probes (Docker HEALTHCHECK, scripts).

Exit status 0 when the service answers SERVING, 1 for anything else: another status,
an unknown service (NOT_FOUND), nothing listening or no answer within the timeout.
It never waits for a connection: a refused one fails at once.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def open_channel(
    address: str,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """Plaintext, or TLS trusting `ca` (with a client certificate for mutual TLS)."""
    if ca is None and cert is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str, service: str = "", timeout: float = 2.0, **tls: str | None
) -> tuple[bool, str]:
    """(serving, what to print) for one Check call on `service` at `address`."""
    with open_channel(address, **tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, _describe(exc)
    return answer.status == SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(
        answer.status
    )


def _describe(exc: grpc.RpcError) -> str:
    if exc.code() == grpc.StatusCode.NOT_FOUND:  # how Check answers an unknown service
        return "SERVICE_UNKNOWN"
    return f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name


def run(address: str, service: str, timeout: float, **tls: str | None) -> int:
    """Print `address service: STATUS` and return the exit status."""
    serving, text = check(address, service, timeout, **tls)
    print(f"{address} {service or '(server)'}: {text}")
    return 0 if serving else 1
