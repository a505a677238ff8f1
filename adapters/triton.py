"""`type: triton` — a model on a Triton Inference Server, over its gRPC API.

Messages are tritonclient's own (service_pb2), sent through the backend's caller
(coalesce.adapters.channels: Coalesce's HTTP/2 client or gRPC core).

The model's own config is read so that no batch exceeds its max_batch_size; a
model with batching off (max_batch_size 0) is called once per row. An
unreachable Triton is not an error at start-up: the adapter reports not ready
and reads the config on the first call after Triton comes back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from coalesce.config import TritonBackend
from coalesce.core import forwarding
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.core.tensors import from_raw, to_raw
from coalesce.errors import InvalidArgument, Unavailable, from_backend
from coalesce.http2.client import CallError
from tritonclient.grpc import service_pb2

from . import channels

log = logging.getLogger("coalesce")
_PROBE_TIMEOUT_S = 2.0
_SERVICE = "/inference.GRPCInferenceService/"


def _specs(tensors: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors)


class _InOrder:
    """One lock per sequence id, held while its request is at Triton: requests of one
    sequence reach the model in the order the batcher sent them (asyncio's locks are
    FIFO), even with several batches in flight. Entries go when unused."""

    def __init__(self) -> None:
        self._locks: dict[object, list] = {}  # id -> [lock, users]

    async def run(self, sequence: object, call):
        entry = self._locks.setdefault(sequence, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                return await call
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[sequence]


class TritonAdapter:
    keeps_timeout = True  # the call's gRPC deadline (see coalesce.core.adapter)
    takes_parameters = True  # request parameters, sequences included (coalesce.core.router)

    def __init__(self, name: str, config: TritonBackend) -> None:
        self.name = name
        self.config = config
        self._caller: channels.Caller | None = None
        self._info = ModelInfo()
        self._limit: int | None = None
        self._loaded = False
        self._config: bytes | None = None
        self._in_order = _InOrder()
        self.retry_counter: Any = None

    async def load(self) -> None:
        self._caller = channels.open_caller(self.config)
        self.retry_counter = self._caller.retry_counter
        await self._read_model()

    async def _ask(self, method: str, request: Any, response: Any) -> Any:
        """One of Triton's calls other than inference, within the probe timeout."""
        answer = await self._caller.unary(  # type: ignore[union-attr]
            _SERVICE + method, request.SerializeToString(), _PROBE_TIMEOUT_S
        )
        return response.FromString(answer)

    async def _read_model(self) -> bool:
        model, version = self.config.model, self.config.version
        try:
            config = await self._ask(
                "ModelConfig",
                service_pb2.ModelConfigRequest(name=model, version=version),
                service_pb2.ModelConfigResponse,
            )
            meta = await self._ask(
                "ModelMetadata",
                service_pb2.ModelMetadataRequest(name=model, version=version),
                service_pb2.ModelMetadataResponse,
            )
        except CallError as exc:
            log.warning(
                "backend %s: cannot read model %r from %s: %s",
                self.name,
                model,
                self.config.address,
                exc.details,
            )
            return False
        self._limit = config.config.max_batch_size
        self._config = config.config.SerializeToString()
        self._info = ModelInfo(
            _specs(meta.inputs), _specs(meta.outputs), meta.platform, tuple(meta.versions)
        )
        self._loaded = True
        log.info("backend %s: triton model %r, max_batch_size %d", self.name, model, self._limit)
        return True

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        if not self._loaded and not await self._read_model():
            raise Unavailable(
                f"backend '{self.name}': Triton at {self.config.address} is not ready"
            )
        parameters = forwarding.parameters()
        sequence = next((v for n, _, v in parameters if n == "sequence_id"), None)
        if sequence is not None:
            call = self._rows(inputs, timeout, parameters, ordered=True)
            return await self._in_order.run(sequence, call)
        return await self._rows(inputs, timeout, parameters)

    async def _rows(
        self, inputs: Tensors, timeout: float | None, parameters, ordered: bool = False
    ) -> Tensors:
        if self._limit:
            return await self._call(inputs, timeout, parameters)
        rows = len(next(iter(inputs.values())))
        if ordered:  # a sequence's rows one after the other, the others' at once
            answers = [
                await self._call({k: v[i : i + 1] for k, v in inputs.items()}, timeout, parameters)
                for i in range(rows)
            ]
            return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}
        answers = await asyncio.gather(
            *(
                self._call({k: v[i : i + 1] for k, v in inputs.items()}, timeout, parameters)
                for i in range(rows)
            )
        )
        return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}

    async def _call(self, inputs: Tensors, timeout: float | None, parameters=()) -> Tensors:
        """One ModelInfer on tritonclient's own stub, with raw contents built directly.

        tritonclient's `infer()` wraps every tensor in InferInput/InferResult objects;
        per batch that costs more than the call itself, so the request message is
        built here and the outputs are numpy views of the response's raw bytes.
        """
        request = service_pb2.ModelInferRequest(
            model_name=self.config.model, model_version=self.config.version
        )
        for name, array in inputs.items():
            datatype, raw = to_raw(array, name)
            if datatype == "BF16":
                raise InvalidArgument(
                    f"tensor '{name}': BF16 is not supported by the triton adapter"
                )
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, datatype
            tensor.shape.extend(array.shape)
            request.raw_input_contents.append(raw)
        for name, kind, value in parameters:
            setattr(request.parameters[name], kind, value)
        try:
            answer = await self._caller.unary(  # type: ignore[union-attr]
                _SERVICE + "ModelInfer",
                request.SerializeToString(),
                timeout,
                forwarding.outgoing(),
            )
        except CallError as exc:
            raise from_backend(self.name, exc.code, exc.details) from exc
        response = service_pb2.ModelInferResponse.FromString(answer)
        return {
            out.name: from_raw(raw, out.datatype, tuple(out.shape), out.name)
            for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    async def ready(self) -> bool:
        request = service_pb2.ModelReadyRequest(name=self.config.model, version=self.config.version)
        try:
            answer = await self._ask("ModelReady", request, service_pb2.ModelReadyResponse)
        except CallError:
            return False
        return answer.ready and (self._loaded or await self._read_model())

    def info(self) -> ModelInfo:
        return self._info

    def model_config(self) -> bytes | None:
        """Triton's own config of the model (a serialized ModelConfig), once read."""
        return self._config

    @property
    def max_batch_size(self) -> int | None:
        return self._limit or None

    async def close(self) -> None:
        if self._caller is not None:
            await self._caller.close()
