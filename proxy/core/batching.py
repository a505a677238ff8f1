"""Pure functions that merge requests into a batch and split a batch's outputs.

Nothing here knows about asyncio or gRPC; the scheduler in batcher.py calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from coalesce.errors import Internal

from .request import Tensors

Slice = tuple[Tensors, int, int]
"""A request's inputs and the [start, stop) rows of it that go in a batch."""


def signature(inputs: Tensors) -> tuple:
    """Requests batch together only if names, dtypes and non-batch dimensions all agree."""
    if len(inputs) == 1:  # the common case needs no sort
        ((name, a),) = inputs.items()
        return ((name, a.dtype.str, a.shape[1:]),)
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def merge(slices: Sequence[Slice]) -> Tensors:
    """One tensor per input name, rows in slice order; a lone whole request is not copied."""
    if len(slices) == 1:
        inputs, start, stop = slices[0]
        if start == 0 and all(len(a) == stop for a in inputs.values()):
            return inputs  # the whole of one request: no views needed
        return {name: a[start:stop] for name, a in inputs.items()}
    names = slices[0][0].keys()
    return {name: np.concatenate([s[0][name][s[1] : s[2]] for s in slices]) for name in names}


def check_rows(outputs: Tensors, total: int, backend: str) -> None:
    """Every output has one row per row of the batch (else INTERNAL, naming it)."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise Internal(
                f"backend '{backend}' returned output '{name}' with shape {list(array.shape)} "
                f"for a batch of {total} rows"
            )


def split(outputs: Tensors, counts: Sequence[int], backend: str) -> list[Tensors]:
    """Each slice's rows of every output, as views, in slice order."""
    check_rows(outputs, sum(counts), backend)
    return views(outputs, counts)


def views(outputs: Tensors, counts: Sequence[int]) -> list[Tensors]:
    """split() of outputs already checked."""
    if len(counts) == 1:
        return [outputs]
    parts, start = [], 0
    for count in counts:
        parts.append({name: a[start : start + count] for name, a in outputs.items()})
        start += count
    return parts


def join(parts: Sequence[Tensors]) -> Tensors:
    """Reassemble a request that was split across batches (parts in row order)."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
