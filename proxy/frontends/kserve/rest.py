"""The Open Inference Protocol (KServe v2) over HTTP/JSON, as Triton serves it.

Tensors travel as JSON (`data`, flat row-major or nested) or, with the binary-data
extension that tritonclient.http uses by default, as raw bytes after the JSON header:
the `Inference-Header-Content-Length` header gives the JSON's length, an input's
`parameters.binary_data_size` its bytes (KServe raw encoding, as over gRPC). Outputs
go back binary when the request asks (`binary_data_output`, or an output's
`binary_data`), else as flat JSON lists.
"""

from __future__ import annotations

import asyncio
import json
from math import prod
from typing import Any

from aiohttp import web
from coalesce.codecs.json_tensors import dumps, parse, to_array, to_arrays, to_json
from coalesce.codecs.kserve import Classes, class_count, classify
from coalesce.core import access
from coalesce.core.request import InferRequest, ModelInfo, Tensors, TensorSpec
from coalesce.core.router import Router
from coalesce.core.tensors import BF16, check_shape, datatype_of, from_raw, request_of, to_raw
from coalesce.errors import InvalidArgument
from coalesce.telemetry.tracing import carrier_of
from coalesce.version import __version__

from . import triton_api
from .shared_memory import SharedMemory

HEADER_LENGTH = "Inference-Header-Content-Length"


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary data after it)."""
    if header_length is None:
        return body, memoryview(b"")
    # ASCII digits, and not too many of them: int() raises on "²" and on 5000 digits
    digits = header_length.isascii() and header_length.isdigit() and len(header_length) < 20
    end = int(header_length) if digits else -1
    if not 0 <= end <= len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH}: {header_length!r:.40} is not a length within the "
            f"{len(body)}-byte body"
        )
    return body[:end], memoryview(body)[end:]


_KIND_NAMES = {str: "string", list: "list"}


def _field(obj: dict, key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise InvalidArgument(f"{where}: '{key}' is missing or not a {_KIND_NAMES[kind]}")
    return value


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be an object")
    return parameters


def _placement(parameters: dict, where: str) -> tuple[str, int, int] | None:
    """(region, offset, byte size) of a tensor in shared memory, from its parameters."""
    region = parameters.get("shared_memory_region")
    if region is None:
        return None
    size, offset = (
        parameters.get("shared_memory_byte_size"),
        parameters.get("shared_memory_offset", 0),
    )
    if not isinstance(region, str):
        raise InvalidArgument(f"{where}: shared_memory_region must be a string")
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{where}: {key} must be a non-negative integer")
    return region, offset, size


def _input(
    spec: Any, blobs: memoryview, offset: int, shared: SharedMemory | None
) -> tuple[str, Any, int]:
    """One entry of `inputs`: (name, array, offset after its binary data)."""
    if not isinstance(spec, dict):
        raise InvalidArgument("inputs: every entry must be an object")
    name = _field(spec, "name", str, "inputs")
    where = f"tensor '{name}'"
    datatype = _field(spec, "datatype", str, where)
    shape_list = _field(spec, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape_list):
        raise InvalidArgument(f"{where}: shape {shape_list} must hold integers")
    shape = check_shape(shape_list, name)
    parameters = _parameters(spec, where)
    place = _placement(parameters, where)
    if place is not None:
        if shared is None:
            raise InvalidArgument(f"{where}: shared memory is not served here")
        data = shared.read(*place, name)
        return name, from_raw(data, datatype, shape, name), offset
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{where}: binary_data_size must be a non-negative integer")
        if offset + size > len(blobs):
            raise InvalidArgument(
                f"{where}: binary_data_size {size} overruns the {len(blobs)} bytes of binary data"
            )
        return name, from_raw(blobs[offset : offset + size], datatype, shape, name), offset + size
    if "data" not in spec:
        raise InvalidArgument(f"{where}: has neither 'data' nor parameters.binary_data_size")
    array = to_array(spec["data"], datatype, name)
    if array.size != prod(shape):
        raise InvalidArgument(
            f"{where}: data holds {array.size} values, shape {list(shape)} needs {prod(shape)}"
        )
    return name, array.reshape(shape), offset


def decode(document: Any, blobs: memoryview, shared: SharedMemory | None = None) -> InferRequest:
    """An inference request body as named arrays; every problem names the field."""
    if not isinstance(document, dict):
        raise InvalidArgument("request body must be a JSON object")
    deadline = _deadline(_parameters(document, "request"))
    entries = document.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("inputs: the request has no input tensors")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("id: must be a string")
    tensors: Tensors = {}
    offset = 0
    for entry in entries:
        name, array, offset = _input(entry, blobs, offset, shared)
        if name in tensors:
            raise InvalidArgument(f"tensor '{name}': sent twice")
        tensors[name] = array
    if offset != len(blobs):
        raise InvalidArgument(
            f"binary data: {len(blobs)} bytes follow the JSON header, the inputs declare {offset}"
        )
    decoded = request_of(tensors, deadline, request_id)
    parameters = _parameters(document, "request")
    if parameters:
        decoded.parameters = _passed_on(parameters)
    return decoded


_ENTRY = frozenset({"name", "datatype", "shape", "data"})
_PLAIN = frozenset({"id", "inputs"})


class Known:
    """The inputs (names, datatypes, shapes) of a JSON body that passed every check with
    nothing but an id and inputs of flat `data` lists: bodies with these same inputs
    would pass them too, so their data lists are taken as they are (`take`) and a
    batch's turned into arrays together (`join`): 2 + 4 us a one-row body of 64
    numbers instead of 13-19 (measured)."""

    __slots__ = ("answer", "rows", "specs")

    def __init__(self, specs: list[tuple[str, str, list[int], int]], rows: int, answer) -> None:
        self.specs, self.rows, self.answer = specs, rows, answer

    @classmethod
    def of(cls, document: Any, request: InferRequest, answer: Wanted) -> Known | None:
        """The layout of a fully decoded body, where it is one (else None)."""
        if request.parameters or not document.keys() <= _PLAIN:
            return None
        specs = []
        for entry in document["inputs"]:
            data = entry.get("data")
            if entry.keys() != _ENTRY or entry["datatype"] == "BYTES" or type(data) is not list:
                return None
            size = prod(entry["shape"])
            if len(data) != size or (size and isinstance(data[0], list)):
                return None  # nested data
            specs.append((entry["name"], entry["datatype"], list(entry["shape"]), size))
        return cls(specs, request.rows, answer)

    def take(self, document: Any) -> list[list] | None:
        """The data lists of a body of this layout, or None: decode it fully then."""
        if type(document) is not dict or not document.keys() <= _PLAIN:
            return None
        entries = document.get("inputs")
        if type(document.get("id", "")) is not str or type(entries) is not list:
            return None
        if len(entries) != len(self.specs):
            return None
        datas = []
        for entry, (name, datatype, shape, size) in zip(entries, self.specs, strict=True):
            if type(entry) is not dict or entry.keys() != _ENTRY:
                return None
            data, dims = entry["data"], entry["shape"]
            if entry["name"] != name or entry["datatype"] != datatype or dims != shape:
                return None
            if any(type(d) is not int for d in dims):  # 1.0 and True equal 1
                return None
            if type(data) is not list or len(data) != size:  # its values: read by join
                return None
            datas.append(data)
        return datas

    def join(self, taken: list[list[list]]) -> Tensors:
        """The inputs of several bodies of this layout as one batch, each body's data
        read as the full decode reads it (a string, a nested list, a value out of range
        is refused, naming the tensor)."""
        rows = self.rows * len(taken)
        return {
            name: to_arrays([datas[j] for datas in taken], size, datatype, name).reshape(
                (rows, *shape[1:])
            )
            for j, (name, datatype, shape, size) in enumerate(self.specs)
        }


class Layout:
    """The Known layout of the last JSON body to one model that passed every check."""

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: Known | None = None

    def learn(self, document: Any, request: InferRequest, answer: Wanted) -> None:
        self.known = Known.of(document, request, answer)


_KINDS = (
    (bool, "bool_param"),
    (int, "int64_param"),
    (float, "double_param"),
    (str, "string_param"),
)
_HTTP_ONLY = frozenset({"binary_data_output"})  # about this answer's encoding, not the model


def _passed_on(parameters: dict) -> tuple:
    """The request's parameters as InferParameters, (name, kind, value) sorted, as the
    gRPC front end gives them (coalesce.codecs.kserve)."""
    found = []
    for name, value in parameters.items():
        if name in _HTTP_ONLY:
            continue
        kind = next((k for t, k in _KINDS if isinstance(value, t)), None)
        if kind is None:
            raise InvalidArgument(f"parameters.{name}: must be a boolean, number or string")
        found.append((name, kind, value))
    return tuple(sorted(found))


Wanted = tuple[dict[str, bool], bool, dict[str, tuple[str, int, int]], Classes]


def requested_outputs(document: dict, info: ModelInfo, model: str) -> Wanted:
    """(output name -> whether it goes back as binary data, the default for the others,
    the outputs that go into shared memory, those asked for as classifications: how
    many classes); no names means every output."""
    entries = document.get("outputs", [])
    if not isinstance(entries, list):
        raise InvalidArgument("outputs: must be a list")
    default = _parameters(document, "request").get("binary_data_output", False)
    known = {spec.name for spec in info.outputs}
    wanted: dict[str, bool] = {}
    placed: dict[str, tuple[str, int, int]] = {}
    classes: Classes = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidArgument("outputs: every entry must be an object")
        name = _field(entry, "name", str, "outputs")
        if known and name not in known:
            raise InvalidArgument(
                f"outputs: '{name}' is not an output of model '{model}' "
                f"(it has {', '.join(sorted(known))})"
            )
        parameters = _parameters(entry, f"output '{name}'")
        if "classification" in parameters:
            count = class_count(parameters["classification"], name)
            classes[name] = (count, info.labels.get(name, ()))
        wanted[name] = bool(parameters.get("binary_data", default))
        place = _placement(parameters, f"output '{name}'")
        if place is not None:
            placed[name] = place
    return wanted, bool(default), placed, classes


def encode(
    model: str,
    version: str,
    request_id: str,
    outputs: Tensors,
    wanted: Wanted,
    shared: SharedMemory | None = None,
) -> tuple[bytes, int | None]:
    """The answer's bytes, and the JSON header's length when binary data follows it
    (the body a broker pipeline publishes too)."""
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id:
        header["id"] = request_id
    entries, blobs = [], []
    binary, default, placed, classes = wanted
    if placed and shared is None:
        raise InvalidArgument("outputs: shared memory is not served here")
    for name in binary or outputs:
        array = outputs.get(name)
        if array is None:
            raise InvalidArgument(f"outputs: model '{model}' has no output '{name}'")
        if name in classes:
            count, labels = classes[name]
            array = classify(array, count, name, labels)
        shape = list(array.shape)
        if name in placed:
            datatype, raw = to_raw(array, name)
            shared.write(*placed[name], raw, name)  # type: ignore[union-attr]
            region = placed[name][0]
            parameters = {"shared_memory_region": region, "shared_memory_byte_size": len(raw)}
            entries.append(
                {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}
            )
        elif binary.get(name, default):
            datatype, raw = to_raw(array, name)
            parameters = {"binary_data_size": len(raw)}
            entries.append(
                {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}
            )
            blobs.append(raw)
        else:
            datatype, data = datatype_of(array, name), to_json(array.reshape(-1), name)
            entries.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    header["outputs"] = entries
    body = dumps(header)
    if not blobs:
        return body, None
    return b"".join([body, *blobs]), len(body)


def encode_rows(
    model: str, version: str, ids: list[str], rows: int, outputs: Tensors, wanted: Wanted
) -> list[bytes] | None:
    """The JSON answers of requests (`ids`) of `rows` rows each that were one batch and
    asked for the same outputs, in order: the bytes encode() gives each one, with each
    output written as JSON once for the whole batch (json's own text of every element,
    cut per request) instead of once per request. None where an answer carries
    binary data, shared memory, classifications or a BYTES or BF16 output: encode each."""
    binary, default, placed, classes = wanted
    if placed or classes or default or any(binary.values()):
        return None
    count = len(ids)
    columns = []
    for name in binary or outputs:
        array = outputs.get(name)
        if array is None:
            raise InvalidArgument(f"outputs: model '{model}' has no output '{name}'")
        if array.dtype.kind not in "biuf" or array.dtype == BF16 or len(array) != rows * count:
            return None
        datatype = datatype_of(array, name)
        head = f'{{"name":{_text(name)},"datatype":{_text(datatype)},"shape":'
        head += _text([rows, *array.shape[1:]]) + ',"data":['
        size = array.size // count
        texts = _text(array.reshape(-1).tolist())[1:-1].split(",") if size else []
        columns.append((head, texts, size))
    start = f'{{"model_name":{_text(model)},"model_version":{_text(version)}'
    answers = []
    for i, request_id in enumerate(ids):
        entries = [
            head + ",".join(texts[i * size : (i + 1) * size]) + "]}"
            for head, texts, size in columns
        ]
        named = f',"id":{_text(request_id)}' if request_id else ""
        answers.append(f'{start}{named},"outputs":[{",".join(entries)}]}}'.encode())
    return answers


def _text(value: Any) -> str:
    """json's compact text of a value, as dumps() writes it inside a document."""
    return json.dumps(value, separators=(",", ":"))


def _deadline(parameters: dict) -> float | None:
    """Triton's `parameters.timeout` (microseconds), as a loop.time() deadline."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not number or not 0 <= timeout < 1e15:  # also NaN, inf and 10**400 (beyond a float)
        raise InvalidArgument("parameters.timeout: must be a non-negative number of microseconds")
    return asyncio.get_running_loop().time() + timeout / 1e6


def _tensors(specs: tuple[TensorSpec, ...]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


_NOT_SERVED = [
    ("/v2/trace/setting", "TraceSetting"),
    ("/v2/models/{name}/trace/setting", "TraceSetting"),
    ("/v2/logging", "LogSettings"),
    ("/v2/cudasharedmemory/status", "CudaSharedMemoryStatus"),
    ("/v2/cudasharedmemory/region/{region}/status", "CudaSharedMemoryStatus"),
    ("/v2/cudasharedmemory/region/{region}/register", "CudaSharedMemoryRegister"),
    ("/v2/cudasharedmemory/unregister", "CudaSharedMemoryUnregister"),
    ("/v2/cudasharedmemory/region/{region}/unregister", "CudaSharedMemoryUnregister"),
]
"""Triton's REST paths for the calls Coalesce does not serve (see triton_api.NOT_SERVED)."""


class KServeREST:
    """/v2 endpoints over the router."""

    def __init__(self, router: Router, shared: SharedMemory | None = None) -> None:
        self.router = router
        self.shared = shared

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.router.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "coalesce", "version": __version__, "extensions": triton_api.EXTENSIONS}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        info = self.router.get(name, version).info()
        route = access.route_of(self.router, name, version)
        access.admit(self.router, route, access.HttpCaller(request), None)
        return web.json_response(
            {
                "name": name,
                "versions": list(info.versions),
                "platform": info.platform,
                "inputs": _tensors(info.inputs),
                "outputs": _tensors(info.outputs),
            }
        )

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        caller = access.HttpCaller(request)
        config = triton_api.model_config(self.router, name, version, caller)
        return web.json_response(triton_api.to_json(config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        caller = access.HttpCaller(request)
        answer = triton_api.statistics(self.router, name, version, caller)
        return web.json_response(triton_api.to_json(answer))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        document = parse(body) if body.strip() else {}
        ready = document.get("ready", False) if isinstance(document, dict) else False
        if not isinstance(ready, bool):
            raise InvalidArgument("ready: must be true or false")
        index = triton_api.repository_index(self.router, ready)
        return web.json_response(triton_api.to_json(index).get("models", []))

    def _registry(self) -> SharedMemory:
        if self.shared is None:
            raise triton_api.not_served("SystemSharedMemoryStatus")
        return self.shared

    async def shm_register(self, request: web.Request) -> web.Response:
        document = parse(await request.read())
        if not isinstance(document, dict):
            raise InvalidArgument("request body must be a JSON object")
        key = _field(document, "key", str, "register")
        offset, size = document.get("offset", 0), document.get("byte_size")
        for field, value in (("offset", offset), ("byte_size", size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"register: '{field}' must be an integer")
        self._registry().register(request.match_info["region"], key, offset, size)
        return web.Response()

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self._registry().unregister(request.match_info.get("region", ""))
        return web.Response()

    async def shm_status(self, request: web.Request) -> web.Response:
        regions = self._registry().status(request.match_info.get("region", ""))
        return web.json_response(
            [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in regions
            ]
        )

    @staticmethod
    def _not_served(method: str):
        async def answer(request: web.Request) -> web.Response:
            raise triton_api.not_served(method)

        return answer

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = await self.router.get(name, version).adapter.ready()
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        backend = self.router.get(name, version)
        route = access.route_of(self.router, name, version)
        caller = access.HttpCaller(request)
        metadata = access.admit(self.router, route, caller, request.content_length)
        body = await request.read()
        access.check_size(route, len(body))  # a chunked body has no Content-Length
        header, blobs = split_body(body, request.headers.get(HEADER_LENGTH))
        document = parse(header)
        decoded = decode(document, blobs, self.shared)
        decoded.metadata, decoded.route = metadata, name
        if self.router.tracer is not None:
            decoded.trace = carrier_of(request.headers.items())
        wanted = requested_outputs(document, backend.info(), name)
        outputs = await backend.infer(decoded)
        version = version or backend.info().versions[0]
        body, header_length = encode(name, version, decoded.id, outputs, wanted, self.shared)
        if header_length is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(
            body=body,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        shm = "/v2/systemsharedmemory/region/{region}"
        return [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get("/v2/models/stats", self.statistics),  # before {name} takes "stats"
            *(web.get(f"{path}/config", self.model_config) for path in (model, versioned)),
            *(web.get(f"{path}/stats", self.statistics) for path in (model, versioned)),
            web.post("/v2/repository/index", self.repository_index),
            web.get("/v2/systemsharedmemory/status", self.shm_status),
            web.get(f"{shm}/status", self.shm_status),
            web.post(f"{shm}/register", self.shm_register),
            web.post(f"{shm}/unregister", self.shm_unregister),
            web.post("/v2/systemsharedmemory/unregister", self.shm_unregister),
            *(
                web.post(f"/v2/repository/models/{{name}}/{verb}", self._not_served(method))
                for verb, method in (
                    ("load", "RepositoryModelLoad"),
                    ("unload", "RepositoryModelUnload"),
                )
            ),
            *(web.route("*", path, self._not_served(method)) for path, method in _NOT_SERVED),
            *(web.get(path, self.model_metadata) for path in (model, versioned)),
            *(web.get(f"{path}/ready", self.model_ready) for path in (model, versioned)),
            *(web.post(f"{path}/infer", self.infer) for path in (model, versioned)),
        ]
