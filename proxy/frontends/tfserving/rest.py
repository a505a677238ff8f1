"""The TensorFlow Serving REST API, as TF Serving serves it.

    POST /v1/models/{name}[/versions/{v} | /labels/{l}]:predict
    GET  /v1/models/{name}[/versions/{v} | /labels/{l}]          (model status)
    GET  /v1/models/{name}[/versions/{v} | /labels/{l}]/metadata (signature)

Predict takes the row format ({"instances": [...]}, one entry per row, answered
{"predictions": [...]}) or the columnar one ({"inputs": ...}, batch dimension
first, answered {"outputs": ...}); inputs are named, or unnamed for a model with
one input. JSON carries no datatypes: each input becomes the datatype the model
declares (or, for a model that declares none, bool -> BOOL, integers -> INT64,
other numbers -> FP32, strings -> BYTES). Binary strings travel as {"b64": "..."};
BYTES outputs go back as strings, as {"b64": ...} when the output's name ends in
`_bytes` (TF Serving's rule) or when they are not valid UTF-8. Routes, versions,
labels and signatures resolve exactly as in the gRPC API (tfserving_grpc.resolve).
Errors are {"error": "..."}, as TF Serving answers them.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from aiohttp import web
from coalesce.codecs import wire
from coalesce.codecs.json_tensors import dumps, infer_datatype, parse, to_array, to_json
from coalesce.config import Route
from coalesce.core import access
from coalesce.core.request import ModelInfo, Tensors
from coalesce.core.router import Router
from coalesce.core.tensors import request_of
from coalesce.errors import CoalesceError, InvalidArgument, NotFound
from coalesce.telemetry.tracing import carrier_of
from google.protobuf.json_format import MessageToDict

from .grpc import Target, resolve, served_version, signature_def_map

_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<verb>:[A-Za-z]+|/metadata)?$"
)
ModelSpec = wire.message("tensorflow.serving.ModelSpec")


def _is_named(value: Any) -> bool:
    """A JSON object of named inputs, as opposed to one {"b64": ...} value."""
    return isinstance(value, dict) and value.keys() != {"b64"}


def _array(data: Any, name: str, info: ModelInfo) -> Any:
    declared = {spec.name: spec.datatype for spec in info.inputs}
    datatype = declared.get(name) or infer_datatype(data)
    return to_array(data, datatype, name, b64=True)


def _only_input(info: ModelInfo, model: str, key: str) -> str:
    names = [spec.name for spec in info.inputs]
    if len(names) == 1:
        return names[0]
    if not names:
        raise InvalidArgument(
            f"{key}: model '{model}' does not declare its inputs, so they must be named"
        )
    raise InvalidArgument(f"{key}: model '{model}' has inputs {', '.join(names)}: name them")


def rows(instances: Any, info: ModelInfo, model: str) -> Tensors:
    """The row format: one list entry per row, an object of named inputs or a bare value."""
    if not isinstance(instances, list) or not instances:
        raise InvalidArgument("instances: must be a non-empty list, one entry per row")
    named = [_is_named(row) for row in instances]
    if not any(named):
        name = _only_input(info, model, "instances")
        return {name: _array(instances, name, info)}
    if not all(named):
        raise InvalidArgument("instances: mixes objects of named inputs with bare values")
    names = instances[0].keys()
    for i, row in enumerate(instances):
        if row.keys() != names:
            raise InvalidArgument(
                f"instances[{i}]: has inputs {sorted(row)}, instances[0] has {sorted(names)}"
            )
    return {name: _array([row[name] for row in instances], name, info) for name in names}


def columns(inputs: Any, info: ModelInfo, model: str) -> Tensors:
    """The columnar format: each input's whole batch, batch dimension first."""
    if not _is_named(inputs):
        name = _only_input(info, model, "inputs")
        return {name: _array(inputs, name, info)}
    if not inputs:
        raise InvalidArgument("inputs: names no input tensors")
    return {name: _array(data, name, info) for name, data in inputs.items()}


def _json(outputs: Tensors) -> dict[str, Any]:
    return {
        name: to_json(array, name, b64=True if name.endswith("_bytes") else None)
        for name, array in outputs.items()
    }


def predictions(outputs: Tensors) -> list:
    """Row format: a list per row of the one output, or a list of objects per row."""
    converted = _json(outputs)
    if len(converted) == 1:
        return next(iter(converted.values()))
    count = len(next(iter(outputs.values())))
    return [{name: values[i] for name, values in converted.items()} for i in range(count)]


def columnar(outputs: Tensors) -> Any:
    converted = _json(outputs)
    return next(iter(converted.values())) if len(converted) == 1 else converted


def decode(document: Any, info: ModelInfo, model: str) -> tuple[Tensors, bool]:
    """(inputs, whether the request used the row format)."""
    if "instances" in document and "inputs" in document:
        raise InvalidArgument("request holds both 'instances' and 'inputs': send one of them")
    if "instances" not in document and "inputs" not in document:
        raise InvalidArgument("request needs 'instances' (row format) or 'inputs' (columnar)")
    if "instances" in document:
        return rows(document["instances"], info, model), True
    return columns(document["inputs"], info, model), False


def _object(body: bytes) -> dict:
    document = parse(body)
    if not isinstance(document, dict):
        raise InvalidArgument("request body must be a JSON object")
    signature = document.get("signature_name", "")
    if not isinstance(signature, str):
        raise InvalidArgument("signature_name: must be a string")
    return document


def model_spec(path: re.Match, signature: str = "") -> Any:
    """The ModelSpec a URL names, so that REST resolves routes as the gRPC API does."""
    spec = ModelSpec(name=path["name"], signature_name=signature)
    if path["version"]:
        digits = path["version"]
        if len(digits) > 19 or int(digits) >= 2**63:  # an int64 field
            raise NotFound(f"model '{path['name']}' has no version {digits:.30}")
        spec.version.value = int(digits)
    elif path["label"]:
        spec.version_label = path["label"]
    return spec


def _status(target: Target) -> dict[str, Any]:
    """One ModelVersionStatus as TF Serving's REST API prints it."""
    version = str(target.version or served_version(target.route, target.backend))
    if target.backend.ready:
        status = {"error_code": "OK", "error_message": ""}
        return {"version": version, "state": "AVAILABLE", "status": status}
    message = f"backend '{target.backend.name}' is not ready"
    status = {"error_code": "UNAVAILABLE", "error_message": message}
    return {"version": version, "state": "LOADING", "status": status}


def _as_json(message: Any) -> dict[str, Any]:
    """A message as TF Serving prints one: proto field names, every field."""
    return MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


class TFServingREST:
    """/v1/models endpoints over the router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def dispatch(self, request: web.Request) -> web.Response:
        path = _PATH.match(request.path)
        verb = path and path["verb"]
        if path and request.method == "POST" and verb == ":predict":
            return await self.predict(request, path)
        if path and request.method == "POST" and verb in (":classify", ":regress"):
            message = f"{verb[1:]} is not supported by Coalesce: use predict with tensors"
            raise CoalesceError(message, grpc.StatusCode.UNIMPLEMENTED)
        if path and request.method == "GET" and verb is None:
            return self.status(path)
        if path and request.method == "GET" and verb == "/metadata":
            access.admit(self.router, self._route(path), access.HttpCaller(request), None)
            return self.metadata(path)
        raise NotFound(f"Malformed request: {request.method} {request.path}")

    def _route(self, path: re.Match) -> Route:
        return access.route_of(
            self.router, path["name"], path["version"] or "", path["label"] or ""
        )

    async def predict(self, request: web.Request, path: re.Match) -> web.Response:
        route = self._route(path)
        caller = access.HttpCaller(request)
        metadata = access.admit(self.router, route, caller, request.content_length)
        body = await request.read()
        access.check_size(route, len(body))  # a chunked body has no Content-Length
        document = _object(body)
        target = resolve(self.router, model_spec(path, document.get("signature_name", "")))
        tensors, row_format = decode(document, target.backend.info(), path["name"])
        decoded = request_of(tensors, None)
        decoded.metadata, decoded.route = metadata, path["name"]
        if self.router.tracer is not None:
            decoded.trace = carrier_of(request.headers.items())
        outputs = await target.backend.infer(decoded)
        answer = (
            {"predictions": predictions(outputs)} if row_format else {"outputs": columnar(outputs)}
        )
        return web.Response(body=dumps(answer), content_type="application/json")

    def status(self, path: re.Match) -> web.Response:
        """GetModelStatus: the version asked for, or every routed version of the model."""
        if path["version"] or path["label"]:
            targets = [resolve(self.router, model_spec(path), check_signature=False)]
        else:
            routes = self.router.table.routes_of(path["name"])
            if not routes:
                raise NotFound(f"model '{path['name']}' is not routed by this server")
            targets = [Target(r, self.router.backends[r.backend], 0) for r in routes]
        statuses = {s["version"]: s for s in map(_status, targets)}
        return web.json_response({"model_version_status": list(statuses.values())})

    def metadata(self, path: re.Match) -> web.Response:
        """GetModelMetadata: the route's signature with the backend's tensors."""
        target = resolve(self.router, model_spec(path), check_signature=False)
        signatures = signature_def_map(target.route, target.backend.info())
        spec = {"name": path["name"], "signature_name": "", "version": str(target.version)}
        return web.json_response(
            {
                "model_spec": spec,
                "metadata": {"signature_def": _as_json(signatures)},
            }
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/v1/models/{tail:.+}", self.dispatch)]
