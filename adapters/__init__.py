"""Backend adapters, one module per kind of backend (the interface: coalesce.core.adapter),
plus what the remote ones share: gRPC core channel options (`channels`).

May import: `coalesce.core`, `coalesce.codecs`, `coalesce.http2`, `coalesce.telemetry`,
`coalesce.tls`, `coalesce.config`, `coalesce.errors`. Never a front end: an adapter
serves whichever front end a request came in by.
"""
