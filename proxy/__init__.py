"""Coalesce: a batching gRPC sidecar for model servers."""

__version__ = "0.1.0"

from .config import Config, ConfigError  # noqa: E402
from .errors import CoalesceError  # noqa: E402
from .request import InferRequest, ModelInfo, Tensors, TensorSpec  # noqa: E402

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
