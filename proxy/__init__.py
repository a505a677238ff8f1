"""Coalesce: a batching gRPC sidecar for model servers.

The package is layered; each layer imports only the layers below it (checked by
tests/test_layers.py):

    cli, server            assembly: the command line, and the server that wires it all
    ops | pipelines        operators' surfaces (admin HTTP, stats) | broker pipelines
    frontends | adapters   the protocols callers speak | the backends batches go to
    codecs                 wire formats: protobuf messages, KServe, TF and JSON tensors
    core | http2           requests, batching, routing | our own HTTP/2 and gRPC framing
    telemetry              metrics, tracing, log helpers the core records into
    config, errors, tls    the typed configuration, the error hierarchy, certificates

This module is the public surface: what a model or adapter author imports.
"""

from .config import Config, ConfigError
from .core.adapter import Adapter
from .core.request import InferRequest, ModelInfo, Tensors, TensorSpec
from .errors import CoalesceError
from .version import __version__

__all__ = [
    "Adapter",
    "CoalesceError",
    "Config",
    "ConfigError",
    "InferRequest",
    "ModelInfo",
    "TensorSpec",
    "Tensors",
    "__version__",
]
