"""The adapter interface: how Coalesce talks to one kind of backend.

An adapter is a small async class, registered by `type` name as a lazy
"module:attr" string so that an unused backend's library is never imported. Any
other `type` of the form "module:Class" is taken as a user's own adapter.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from .request import ModelInfo, Tensors

ADAPTERS: dict[str, str] = {
    "local": "coalesce.adapters.local:LocalAdapter",
    "triton": "coalesce.adapters.triton:TritonAdapter",
    "grpc": "coalesce.adapters.grpc:GrpcAdapter",
    "python": "coalesce.adapters.python:PythonAdapter",
    "tfserving": "coalesce.adapters.tfserving:TFServingAdapter",
}


@runtime_checkable
class Adapter(Protocol):
    """One backend model. Constructed as `Adapter(name, config)` with its config block."""

    async def load(self) -> None:
        """Connect or load; an unreachable backend must not raise here (ready() says so)."""

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        """Run one batch: inputs and outputs share the first (row) dimension.

        An adapter whose call enforces `timeout` itself (a gRPC deadline) says so with a
        class attribute `keeps_timeout = True`; else the batcher bounds the call."""

    async def ready(self) -> bool:
        """Whether the backend can serve now."""

    def info(self) -> ModelInfo:
        """Tensor names, datatypes and shapes (batch dimension -1), for metadata calls."""

    @property
    def max_batch_size(self) -> int | None:
        """The most rows the backend accepts in one call, or None for no limit."""

    async def close(self) -> None:
        """Release connections, threads and processes."""

    # Optional: `model_config() -> bytes | None`, the model's own Triton configuration
    # (a serialized inference.ModelConfig) for ModelConfig calls; without it Coalesce
    # builds one from info() (see coalesce.frontends.kserve.triton_api).


def import_string(path: str) -> Any:
    """The object at "package.module:attr.sub"."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {path!r}: {exc}") from exc
    return obj


def adapter_class(kind: str) -> type[Adapter]:
    return import_string(ADAPTERS.get(kind, kind))
