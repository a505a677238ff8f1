"""Triton's calls beyond inference, answered from Coalesce's own state: the model
configuration, statistics and the repository index, plus what Coalesce says to the
calls it does not serve. gRPC and REST both start here, so the two agree.

Tools built for Triton (perf_analyzer, Triton's Python client, model analyzers) ask
for these before they infer; each answer describes the model as Coalesce serves it.
"""

from __future__ import annotations

from typing import Any

from coalesce.codecs import wire
from coalesce.core import access
from coalesce.core.request import TensorSpec
from coalesce.core.router import Backend, Router
from coalesce.errors import Unimplemented
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "statistics",
    "system_shared_memory",
]
"""What ServerMetadata lists: exactly the extensions of Triton's protocol Coalesce serves."""

_RELOAD = "edit the config and reload it (SIGHUP, or POST /admin/reload on the admin port)"
NOT_SERVED = {
    "RepositoryModelLoad": "Coalesce loads no models: its routes come from its config; " + _RELOAD,
    "RepositoryModelUnload": "Coalesce unloads no models: its routes come from its config; "
    + _RELOAD,
    "TraceSetting": "Coalesce has no Triton trace settings: its tracing is OpenTelemetry, set "
    "by `tracing:` in the config",
    "LogSettings": "Coalesce's logging is set by `log_level` and `log_format` in the config; "
    + _RELOAD,
    "CudaSharedMemoryStatus": "CUDA shared memory is not supported by Coalesce",
    "CudaSharedMemoryRegister": "CUDA shared memory is not supported by Coalesce",
    "CudaSharedMemoryUnregister": "CUDA shared memory is not supported by Coalesce",
}
"""Triton methods Coalesce does not serve, each with what to do instead."""


def not_served(method: str) -> Unimplemented:
    return Unimplemented(f"{wire.KSERVE}/{method}: {NOT_SERVED[method]}")


def _type(datatype: str) -> int:
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return wire.ConfigDataType.values_by_name[name].number


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched else spec.shape)


def _admitted(router: Router, name: str, version: str, caller: Any) -> Backend:
    backend = router.get(name, version)
    access.admit(router, access.route_of(router, name, version), caller, None)
    return backend


def model_config(router: Router, name: str, version: str, caller: Any) -> Any:
    """The model's configuration as Triton gives it (a wire.ModelConfig).

    A backend with a Triton config of its own (`model_config()` on the adapter: the
    triton adapter's is Triton's) gives that, unknown fields and all; else one is built
    from the model's tensors. Either way `max_batch_size` is what one Coalesce batch may
    hold, and `name` the name the caller used.
    """
    backend = _admitted(router, name, version, caller)
    limit = backend.batcher.capacity()
    own = getattr(backend.adapter, "model_config", None)
    raw = own() if own is not None else None
    if raw is not None:
        config = wire.ModelConfig.FromString(raw)
        if config.max_batch_size > limit:
            config.max_batch_size = limit
    else:
        info = backend.info()
        # every spec Coalesce batches has the row dimension first (-1)
        config = wire.ModelConfig(platform=info.platform, backend="coalesce", max_batch_size=limit)
        for spec in info.inputs:
            config.input.add(name=spec.name, data_type=_type(spec.datatype), dims=_dims(spec, True))
        for spec in info.outputs:
            config.output.add(
                name=spec.name, data_type=_type(spec.datatype), dims=_dims(spec, True)
            )
        delay = router.config.backends[backend.name].batching.max_delay_ms
        config.dynamic_batching.max_queue_delay_microseconds = int(delay * 1000)
    config.name = name
    return config


def _duration(target: Any, count: int, seconds: float) -> None:
    target.count, target.ns = count, int(seconds * 1e9)


_PARTS = ("compute_input", "compute_infer", "compute_output")


def _statistics(router: Router, name: str, version: str) -> Any:
    backend = router.get(name, version)
    route, batcher = backend.route_stats(name), backend.batcher.stats
    stats = wire.ModelStatisticsResponse().model_stats.add()
    stats.name, stats.version = name, version or backend.info().versions[0]
    inference = stats.inference_stats
    if route is not None:
        ok = route.requests.get("OK", 0)
        failed = sum(route.requests.values()) - ok
        _duration(inference.success, ok, route.ok_seconds)
        _duration(inference.fail, failed, route.latency.sum - route.ok_seconds)
        stats.inference_count = route.rows.get("OK", 0)
    # Queue and compute are the backend's batcher's, shared by the routes that use it;
    # a request sent at once, without queueing, waited 0 ns.
    calls = requests = 0
    spent = [0.0, 0.0, 0.0]  # merging inputs, calling, splitting outputs; per request
    for rows, (count, held, *seconds) in sorted(batcher.by_size.items()):
        batch = stats.batch_stats.add(batch_size=rows)
        for target, total in zip(_PARTS, seconds, strict=True):
            _duration(getattr(batch, target), count, total)
        calls, requests = calls + count, requests + held
        spent = [s + total * held / count for s, total in zip(spent, seconds, strict=True)]
    for target, total in zip(_PARTS, spent, strict=True):
        _duration(getattr(inference, target), requests, total)
    _duration(inference.queue, requests, batcher.queue_wait.sum)
    stats.execution_count = calls
    stats.last_inference = int(batcher.last_call * 1000)
    return stats


def statistics(router: Router, name: str, version: str, caller: Any) -> Any:
    """ModelStatistics of one model, or of every routed model when `name` is empty."""
    response = wire.ModelStatisticsResponse()
    if name:
        _admitted(router, name, version, caller)
        response.model_stats.append(_statistics(router, name, version))
    else:
        for model in router.routes:
            response.model_stats.append(_statistics(router, model, ""))
    return response


def repository_index(router: Router, ready_only: bool) -> Any:
    """Every routed model (each pinned version too), READY or UNAVAILABLE."""
    response = wire.RepositoryIndexResponse()
    for model in router.routes:
        for route in router.table.routes_of(model):
            backend = router.backends[route.backend]
            if ready_only and not backend.ready:
                continue
            version = str(route.version) if route.version is not None else ""
            state, reason = ("READY", "") if backend.ready else ("UNAVAILABLE", "not ready")
            if backend.down:
                reason = "its readiness probes fail"
            response.models.add(name=model, version=version, state=state, reason=reason)
    return response


_INTEGERS = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(value: Any, descriptor: Any) -> Any:
    """JSON as Triton writes it: 64-bit integers as numbers, not protobuf's strings."""
    for field in descriptor.fields:
        if field.name not in value:
            continue
        if field.type in _INTEGERS:
            item = value[field.name]
            value[field.name] = [int(v) for v in item] if isinstance(item, list) else int(item)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            items = value[field.name] if field.is_repeated else [value[field.name]]
            for item in items:
                _numbers(item, field.message_type)
    return value


def to_json(message: Any) -> dict:
    """A message as Triton's REST API gives it (field names as in the .proto)."""
    document = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(document, message.DESCRIPTOR)
