"""`type: grpc` — a team's own gRPC model service, one call per batch.

By default the service speaks Coalesce's batch protocol (protos/coalesce_batch.proto,
`coalesce.batch.v1.BatchInference`): named tensors in, named tensors out, plus a
Metadata call for readiness, tensors and batch limit. A service with its own protos
is reached through a user's codec (`codec: mypkg.codec:MyCodec`), which turns a batch
into its request message and its response back into tensors; such a service is
ready when it answers the standard grpc.health.v1 check (or does not implement it,
which still proves it is up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import grpc
from coalesce.codecs import wire
from coalesce.config import GrpcBackend
from coalesce.core import forwarding
from coalesce.core.adapter import import_string
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.core.tensors import check_shape, from_raw, to_raw
from coalesce.errors import CoalesceError, Internal, InvalidArgument, Unavailable, from_backend
from coalesce.http2.client import CallError
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from . import channels

log = logging.getLogger("coalesce")
_PROBE_TIMEOUT_S = 2.0
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@runtime_checkable
class Codec(Protocol):
    """Turns a batch into one service's request message and its response into tensors.

    Constructed as `Codec(**args)` from the backend block. Optional attributes
    `inputs` / `outputs` (TensorSpecs, batch dimension -1) declare the model's tensors
    for input checks and metadata calls; `max_batch_size` caps the rows per call.
    """

    method: str
    """The full method path, "/package.Service/Method"."""
    request_serializer: Callable[[Any], bytes]
    response_deserializer: Callable[[bytes], Any]

    def encode(self, inputs: Tensors) -> Any:
        """The request message for one batch (every array's first dimension is the row)."""

    def decode(self, response: Any) -> Tensors:
        """The outputs in a response, one row per input row, in the same order."""


def _decode_tensor(tensor: Any) -> Any:
    shape = check_shape(tuple(tensor.shape), tensor.name)
    return from_raw(tensor.raw, tensor.datatype, shape, tensor.name)


class BatchCodec:
    """The built-in codec: coalesce.batch.v1.BatchInference/Infer."""

    method = f"/{wire.BATCH}/Infer"

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.request_serializer = wire.BatchRequest.SerializeToString
        self.response_deserializer = wire.BatchResponse.FromString

    def encode(self, inputs: Tensors) -> Any:
        request = wire.BatchRequest(model=self.model)
        for name, array in inputs.items():
            datatype, raw = to_raw(array, name)
            request.inputs.add(name=name, datatype=datatype, shape=array.shape, raw=raw)
        return request

    def decode(self, response: Any) -> Tensors:
        return {tensor.name: _decode_tensor(tensor) for tensor in response.outputs}


def _specs(items: Any) -> tuple[TensorSpec, ...]:
    return tuple(
        s if isinstance(s, TensorSpec) else TensorSpec(s.name, s.datatype, tuple(s.shape))
        for s in items or ()
    )


class GrpcAdapter:
    """Sends each batch as one unary call, encoded by the backend's codec."""

    keeps_timeout = True  # the call's gRPC deadline (see coalesce.core.adapter)

    def __init__(self, name: str, config: GrpcBackend) -> None:
        self.name = name
        self.config = config
        self._builtin = config.codec is None
        self._codec: Codec = (
            BatchCodec(config.model)
            if self._builtin
            else import_string(config.codec)(**config.args)
        )
        self._caller: channels.Caller | None = None
        self._info = ModelInfo(
            _specs(getattr(self._codec, "inputs", ())),
            _specs(getattr(self._codec, "outputs", ())),
            platform="coalesce_grpc",
        )
        self._limit: int | None = getattr(self._codec, "max_batch_size", None)
        self._ready = False
        self.retry_counter: Any = None

    async def load(self) -> None:
        if not isinstance(self._codec, Codec):
            raise TypeError(
                f"codec {self.config.codec!r} lacks method, request_serializer, "
                "response_deserializer, encode or decode"
            )
        self._caller = channels.open_caller(self.config)
        self.retry_counter = self._caller.retry_counter
        await self.ready()

    async def _ask(
        self, path: str, request: bytes, timeout: float | None, metadata: Any = None
    ) -> bytes:
        return await self._caller.unary(path, request, timeout, metadata)  # type: ignore[union-attr]

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        if not self._ready and not await self.ready():
            raise Unavailable(f"backend '{self.name}': {self.config.address} is not ready")
        codec = self._codec
        try:
            request = codec.request_serializer(codec.encode(inputs))
        except CoalesceError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"backend '{self.name}': cannot encode the batch: {exc}") from exc
        try:
            answer = await self._ask(codec.method, request, timeout, forwarding.outgoing())
        except CallError as exc:
            raise from_backend(self.name, exc.code, exc.details) from exc
        try:
            return codec.decode(codec.response_deserializer(answer))
        except CoalesceError as exc:
            raise Internal(f"backend '{self.name}' answered a malformed batch: {exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
            raise Internal(f"backend '{self.name}': cannot decode the answer: {exc}") from exc

    async def ready(self) -> bool:
        """The batch protocol's Metadata (refreshing tensors and limit), else grpc.health.v1;
        while it says no, batches are answered UNAVAILABLE rather than sent."""
        try:
            self._ready = await (self._read_metadata() if self._builtin else self._health())
        except CallError as exc:
            log.debug("backend %s: not ready: %s", self.name, exc.details)
            self._ready = False
        return self._ready

    async def _read_metadata(self) -> bool:
        request = wire.BatchMetadataRequest(model=self.config.model).SerializeToString()
        answer = await self._ask(f"/{wire.BATCH}/Metadata", request, _PROBE_TIMEOUT_S)
        meta = wire.BatchMetadataResponse.FromString(answer)
        self._info = ModelInfo(
            _specs(meta.inputs),
            _specs(meta.outputs),
            meta.platform or "coalesce_grpc",
            tuple(meta.versions) or ("1",),
        )
        self._limit = meta.max_batch_size or None
        return meta.ready

    async def _health(self) -> bool:
        request = health_pb2.HealthCheckRequest().SerializeToString()
        try:
            answer = await self._ask(_HEALTH_CHECK, request, _PROBE_TIMEOUT_S)
        except CallError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                return True  # it answered, so it is up; it just has no health service
            raise
        status = health_pb2.HealthCheckResponse.FromString(answer).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_size(self) -> int | None:
        return self._limit

    async def close(self) -> None:
        if self._caller is not None:
            await self._caller.close()
