"""The protocols callers speak: KServe v2 (`kserve`: gRPC, streaming, REST) and TF
Serving (`tfserving`: gRPC, REST), plus the one aiohttp application that serves both
REST front ends (`rest`).

Each front end is thin: decode the caller's message with a codec, call the core,
encode the answer. Front ends do not import each other's packages.

May import: `coalesce.codecs`, `coalesce.core`, `coalesce.http2`, `coalesce.telemetry`,
`coalesce.config`, `coalesce.errors`. Never an adapter, `coalesce.ops` or `coalesce.server`.
"""
