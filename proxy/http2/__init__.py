"""Coalesce's own HTTP/2: frames and flow control (`endpoint`), HPACK (`hpack`), the
server and client connections (`server`, `client`) and gRPC's framing over them
(`grpc_server`).

It moves gRPC messages as bytes: it knows nothing of KServe, TF Serving or the core.

May import: `coalesce.config` (its limits), `coalesce.telemetry` (rate-limited logs).
"""
