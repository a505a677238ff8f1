"""In-process models for benchmarks."""

from __future__ import annotations


def _identity(inputs):
    return {"y": inputs["x"]}


def identity():
    """Returns its input at once: what is left to measure is Coalesce itself."""
    return _identity


def mlp():
    """The benchmark MLP (benchmarks/bench_model.py) as an in-process model."""
    from benchmarks.bench_model import forward

    return lambda inputs: {"y": forward(inputs["x"])}
