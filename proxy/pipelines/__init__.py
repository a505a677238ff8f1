"""Broker pipelines: inference requests read from a message broker's inbox, batched
by the same batchers as gRPC and REST callers, results published to an outbox.

runner.py is the loop and the connector interface; formats.py turns messages into
requests and results into messages (the front ends' own bodies); one module per
broker (kafka.py), imported only when a pipeline names that broker.

May import: `coalesce.frontends` (its body codecs), `coalesce.codecs`, `coalesce.core`,
`coalesce.telemetry`, `coalesce.config`, `coalesce.errors`. Never `coalesce.ops` or the
assembly.
"""
