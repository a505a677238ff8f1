"""The one internal request form shared by every front end and every adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]
"""Named arrays whose first dimension is the row (batch) dimension."""


@dataclass(slots=True)
class InferRequest:
    """One caller's rows: what a front end hands to a batcher."""

    inputs: Tensors
    rows: int
    deadline: float | None = None
    """`loop.time()` after which the caller no longer wants the answer."""
    id: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    route: str = ""
    """The model name the caller asked for (a metrics label)."""
    trace: dict[str, str] | None = None
    """The caller's W3C trace headers, read only when tracing is on."""
    span: Any = None
    """This request's span while tracing (coalesce.telemetry.tracing)."""
    parameters: tuple[tuple[str, str, Any], ...] = ()
    """KServe request parameters to pass on: (name, InferParameter kind, value), sorted."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor as a model declares it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a backend says about its model, for metadata calls."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    platform: str = ""
    versions: tuple[str, ...] = field(default=("1",))
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)
    """Class labels per output, by index (config `labels`), for classification answers."""
