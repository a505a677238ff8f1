"""In-process models for benchmarks."""

from __future__ import annotations


def _identity(inputs):
    return {"y": inputs["x"]}


def identity():
    """Returns its input at once: what is left to measure is Coalesce itself."""
    return _identity
