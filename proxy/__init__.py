"""Coalesce: a batching gRPC sidecar for model servers."""

__version__ = "0.1.0"

from .config import Config, ConfigError
from .errors import CoalesceError
from .request import InferRequest, ModelInfo, Tensors, TensorSpec

__all__ = [
    "CoalesceError",
    "Config",
    "ConfigError",
    "InferRequest",
    "ModelInfo",
    "TensorSpec",
    "Tensors",
    "__version__",
]
