"""Instruments the core reports through: metrics, tracing spans and log helpers.

Kept apart from `coalesce.ops` (the operator's HTTP surfaces) because the batcher and
the router record into them on every request, while the admin server that reads them
sits above everything.

May import: `coalesce.config`, `coalesce.errors`.
"""
