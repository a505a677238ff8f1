"""`type: tfserving` — a model on a TensorFlow Serving server, via its gRPC PredictionService.

Each batch is one Predict call (inputs in `tensor_content`, as tf.make_tensor_proto
sends them). The signature's tensors come from GetModelMetadata, so requests are
checked before they travel and metadata calls on any front end describe the model.
An unreachable TF Serving is not an error at start-up: the adapter reports not
ready and reads the metadata on the first call after the server comes back.
TensorFlow is not needed: the messages are Coalesce's own (coalesce.codecs.wire).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from coalesce.codecs import wire
from coalesce.codecs.tf_tensors import BY_ENUM, fill_proto, to_array
from coalesce.config import TFServingBackend
from coalesce.core import forwarding
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.errors import CoalesceError, Internal, InvalidArgument, Unavailable, from_backend
from coalesce.http2.client import CallError

from . import channels

log = logging.getLogger("coalesce")
_PROBE_TIMEOUT_S = 2.0
_SIGNATURE_DEF_MAP = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
_AVAILABLE = wire.ModelVersionStatus.State.Value("AVAILABLE")


def _spec(name: str, info: Any) -> TensorSpec | None:
    """A signature tensor as a TensorSpec; None for one whose rank TF does not know."""
    if info.tensor_shape.unknown_rank:
        return None
    kind = BY_ENUM.get(info.dtype)
    datatype = (kind.kserve or kind.name) if kind else str(info.dtype)
    return TensorSpec(name, datatype, tuple(d.size for d in info.tensor_shape.dim))


def _specs(tensors: Any) -> tuple[TensorSpec, ...]:
    """Every tensor, or none at all when one cannot be described (the backend checks)."""
    specs = [_spec(name, tensors[name]) for name in sorted(tensors)]
    return () if None in specs else tuple(specs)  # type: ignore[arg-type]


class TFServingAdapter:
    keeps_timeout = True  # the call's gRPC deadline (see coalesce.core.adapter)

    def __init__(self, name: str, config: TFServingBackend) -> None:
        self.name = name
        self.config = config
        self._caller: channels.Caller | None = None
        self._predict: Any = None
        self._metadata: Any = None
        self._status: Any = None
        self._info = ModelInfo()
        self._loaded = False
        self.retry_counter: Any = None

    async def load(self) -> None:
        self._caller = channels.open_caller(self.config)
        self.retry_counter = self._caller.retry_counter
        self._predict = self._method(wire.TF_PREDICTION, "Predict", wire.PredictResponse)
        self._metadata = self._method(
            wire.TF_PREDICTION, "GetModelMetadata", wire.GetModelMetadataResponse
        )
        self._status = self._method(wire.TF_MODEL, "GetModelStatus", wire.GetModelStatusResponse)
        await self._read_model()

    def _method(self, service: str, method: str, response: Any) -> Any:
        """`call(message, timeout, metadata=None)`: the decoded answer, or CallError."""
        path, caller = f"/{service}/{method}", self._caller

        async def call(message: Any, timeout: float | None, metadata: Any = None) -> Any:
            answer = await caller.unary(path, message.SerializeToString(), timeout, metadata)
            return response.FromString(answer)

        return call

    def _model_spec(self, spec: Any, signature: bool = True) -> None:
        spec.name = self.config.model
        if self.config.version is not None:
            spec.version.value = self.config.version
        if signature:
            spec.signature_name = self.config.signature

    async def _read_model(self) -> bool:
        request = wire.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, signature=False)
        try:
            response = await self._metadata(request, _PROBE_TIMEOUT_S)
            self._info = self._model_info(response)
        except (CallError, CoalesceError) as exc:
            detail = exc.details if isinstance(exc, CallError) else exc.message
            log.warning(
                "backend %s: cannot read model %r from %s: %s",
                self.name,
                self.config.model,
                self.config.address,
                detail,
            )
            return False
        self._loaded = True
        log.info("backend %s: tfserving model %r", self.name, self.config.model)
        return True

    def _model_info(self, response: Any) -> ModelInfo:
        packed = response.metadata.get("signature_def")
        if packed is None or packed.type_url != _SIGNATURE_DEF_MAP:
            raise Internal("GetModelMetadata holds no SignatureDefMap")
        signatures = wire.SignatureDefMap.FromString(packed.value).signature_def
        wanted = self.config.signature
        if wanted not in signatures:
            raise Internal(f"no signature '{wanted}' (it has {', '.join(sorted(signatures))})")
        signature = signatures[wanted]
        version = str(response.model_spec.version.value or self.config.version or 1)
        return ModelInfo(
            _specs(signature.inputs), _specs(signature.outputs), "tensorflow_serving", (version,)
        )

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        if not self._loaded and not await self._read_model():
            raise Unavailable(
                f"backend '{self.name}': TF Serving at {self.config.address} is not ready"
            )
        request = wire.PredictRequest()
        self._model_spec(request.model_spec)
        for name, array in inputs.items():
            fill_proto(request.inputs[name], array, name, content=True)
        try:
            response = await self._predict(request, timeout, forwarding.outgoing())
        except CallError as exc:
            raise from_backend(self.name, exc.code, exc.details) from exc
        try:
            return {name: to_array(proto, name) for name, proto in response.outputs.items()}
        except InvalidArgument as exc:
            raise Internal(f"backend '{self.name}' answered {exc.message}") from exc

    async def ready(self) -> bool:
        request = wire.GetModelStatusRequest()
        self._model_spec(request.model_spec, signature=False)
        try:
            response = await self._status(request, _PROBE_TIMEOUT_S)
        except CallError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                return False
        else:
            if not any(s.state == _AVAILABLE for s in response.model_version_status):
                return False
        return self._loaded or await self._read_model()

    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_size(self) -> int | None:
        return None

    async def close(self) -> None:
        if self._caller is not None:
            await self._caller.close()
