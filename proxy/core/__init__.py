"""The transport-free heart of Coalesce: requests, tensors, batching and routing.

A request arrives here already decoded (`request.InferRequest`), is checked against
its model (`tensors`), routed (`routing`, `router`), admitted (`access`), merged with
others into a batch and split back (`batching`, `batcher`), and handed to a backend
through the adapter interface (`adapter`).

May import: `coalesce.config`, `coalesce.errors`, `coalesce.telemetry`. Never a wire
format, a transport, a front end or an adapter: those depend on the core, not the
other way round.
"""
