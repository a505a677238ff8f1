"""Broker pipelines: inference requests read from a message broker's inbox, batched
by the same batchers as gRPC and REST callers, results published to an outbox.

Empty for now (see the issue that adds Kafka, Redis Streams and NATS JetStream).

May import: `coalesce.codecs`, `coalesce.core`, `coalesce.telemetry`,
`coalesce.config`, `coalesce.errors`. Never a front end, `coalesce.ops` or the assembly.
"""
