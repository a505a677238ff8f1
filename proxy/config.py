"""The routing config: parsed once, at the edge, into typed and validated objects.

Every default lives here, in the field that it belongs to. A config has three
sections, as in Envoy: where to listen, the backends (each with its own batcher)
and the routes that map the model names clients ask for onto backends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one "key.path: problem" per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be host:port, got {value!r}")
    return value


def _check_import_path(value: str) -> str:
    module, sep, attr = value.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"must be 'module:attribute', got {value!r}")
    return value


class Batching(_Strict):
    """How one backend's batcher forms batches."""

    max_batch_size: int = Field(64, ge=1, description="Most rows in one backend call.")
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="How long a batch may wait for more rows once a dispatch slot is free. "
        "0 sends whatever is queued at once: batches grow with load by themselves.",
    )
    max_in_flight: int = Field(1, ge=1, description="Batches sent to the backend at one time.")
    max_queue: int = Field(
        4096, ge=1, description="Rows that may wait; beyond it requests get RESOURCE_EXHAUSTED."
    )


class _Backend(_Strict):
    batching: Batching = Field(default_factory=Batching, description="Batching policy.")
    timeout_ms: float | None = Field(
        None, gt=0, description="Longest backend call; the callers' deadlines also bound it."
    )


class LocalBackend(_Backend):
    """An in-process Python model."""

    type: Literal["local"]
    model: str = Field(
        description="'module:factory'; the factory returns a callable taking and returning "
        "dict[str, numpy.ndarray] (or an object with such a __call__; async allowed)."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments to the factory."
    )
    threads: int | None = Field(
        None, ge=1, description="Threads running a blocking model; default max_in_flight."
    )
    inline: bool = Field(
        False,
        description="Call the model on the event loop: only for models that take microseconds.",
    )

    _check_model = field_validator("model")(classmethod(lambda cls, v: _check_import_path(v)))


class TritonBackend(_Backend):
    """A model on a Triton Inference Server, over gRPC."""

    type: Literal["triton"]
    target: str = Field(description="Triton's gRPC address, host:port.")
    model: str = Field(min_length=1, description="The model's name on Triton.")
    version: str = Field("", description="The model version; empty for Triton's choice.")

    _check_target = field_validator("target")(classmethod(lambda cls, v: _check_address(v)))


class GrpcBackend(_Backend):
    """A team's own gRPC model service: Coalesce's batch protocol, or any protos via a codec."""

    type: Literal["grpc"]
    target: str = Field(description="The service's gRPC address, host:port.")
    model: str = Field(
        "", description="Sent in every coalesce.batch.v1 call, for services hosting several."
    )
    codec: str | None = Field(
        None,
        description="'module:Class' of a codec for a service with its own protos (see "
        "coalesce.adapters.grpc.Codec); default: the coalesce.batch.v1 protocol.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments to the codec class."
    )

    _check_target = field_validator("target")(classmethod(lambda cls, v: _check_address(v)))

    @field_validator("codec")
    @classmethod
    def _check_codec(cls, value: str | None) -> str | None:
        return None if value is None else _check_import_path(value)


class PythonBackend(_Backend):
    """A Python model that Coalesce runs in worker processes of its own (adapters/python.py)."""

    type: Literal["python"]
    model: str = Field(
        description="'module:factory', imported in each worker; the factory returns a callable "
        "taking and returning dict[str, numpy.ndarray]."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments to the factory."
    )
    processes: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Worker processes, each running one batch at a time; default the cores.",
    )
    python: str | None = Field(
        None,
        min_length=1,
        description="The workers' interpreter (e.g. a venv's bin/python), which needs numpy "
        "but not Coalesce; default the sidecar's own.",
    )
    hang_timeout_ms: float | None = Field(
        None,
        gt=0,
        description="A worker holding one batch longer is killed and replaced, and the batch "
        "retried once on another; default timeout_ms, else 60000.",
    )
    start_timeout_s: float = Field(60.0, gt=0, description="Longest a worker may load the model.")

    _check_model = field_validator("model")(classmethod(lambda cls, v: _check_import_path(v)))

    @model_validator(mode="before")
    @classmethod
    def _one_batch_per_worker(cls, data: Any) -> Any:
        """Unless set, batching.max_in_flight = processes: one batch for each worker."""
        if not isinstance(data, dict):
            return data
        batching = data.get("batching", {})
        processes = data.get("processes", os.cpu_count() or 1)
        if isinstance(batching, dict) and "max_in_flight" not in batching:
            if isinstance(processes, int) and processes >= 1:
                return {**data, "batching": {**batching, "max_in_flight": processes}}
        return data


class TFServingBackend(_Backend):
    """A model on a TensorFlow Serving server, over its gRPC PredictionService."""

    type: Literal["tfserving"]
    target: str = Field(description="TF Serving's gRPC address, host:port.")
    model: str = Field(min_length=1, description="The model's name on TF Serving.")
    signature: str = Field(
        "serving_default", min_length=1, description="The signature each batch calls."
    )
    version: int | None = Field(
        None, ge=1, description="The model version; default the latest TF Serving has."
    )

    _check_target = field_validator("target")(classmethod(lambda cls, v: _check_address(v)))


class CustomBackend(_Backend):
    """A backend implemented by a user's adapter class."""

    type: str = Field(description="'module:Class' of an adapter (see coalesce.adapter).")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the adapter.")

    _check_type = field_validator("type")(classmethod(lambda cls, v: _check_import_path(v)))


BUILTIN_TYPES = ("local", "triton", "grpc", "python", "tfserving")


def _backend_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in BUILTIN_TYPES else "custom"


Backend = Annotated[
    Annotated[LocalBackend, Tag("local")]
    | Annotated[TritonBackend, Tag("triton")]
    | Annotated[GrpcBackend, Tag("grpc")]
    | Annotated[PythonBackend, Tag("python")]
    | Annotated[TFServingBackend, Tag("tfserving")]
    | Annotated[CustomBackend, Tag("custom")],
    Discriminator(_backend_kind),
]


class Route(_Strict):
    """Clients asking for `model` are served by `backend`.

    Several routes may share a model name when they are pinned to different
    versions or labels (see coalesce.routing for how a request picks one).
    """

    model: str = Field(min_length=1, description="The model name clients ask for.")
    backend: str = Field(min_length=1, description="A key of `backends`.")
    version: int | None = Field(
        None,
        ge=1,
        description="Serve only requests for this version of `model` (and requests naming no "
        "version, if it is the highest); default: any version the backend has.",
    )
    label: str | None = Field(
        None,
        min_length=1,
        description="A TF Serving version label (e.g. stable) that reaches this route.",
    )
    signature: str = Field(
        "serving_default",
        min_length=1,
        description="The signature name TF Serving clients call this route by.",
    )
    ordered: bool = Field(
        False,
        description="On a ModelStreamInfer stream, answer this model's requests in the order "
        "they were sent (default: each as soon as it is ready).",
    )


def _route_keys(route: Route) -> list[tuple[str, str]]:
    """What a route claims: its model name alone, or each version and label it is pinned to."""
    name = repr(route.model)
    if route.version is None and route.label is None:
        return [(route.model, name)]
    keys = [] if route.version is None else [(route.model, f"{name} version {route.version}")]
    return keys + ([] if route.label is None else [(route.model, f"{name} label {route.label!r}")])


class Config(_Strict):
    """A whole Coalesce configuration."""

    listen: str = Field("127.0.0.1:8500", description="gRPC front end address.")
    admin: str | None = Field(
        "127.0.0.1:9464", description="HTTP admin address (/healthz, /readyz); null disables it."
    )
    http: str | None = Field(
        None,
        description="HTTP/JSON front ends (KServe v2 REST under /v2, TF Serving REST under "
        "/v1), e.g. 127.0.0.1:8501; null (the default) turns them off.",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long queued and in-flight requests may finish."
    )
    max_message_mb: float = Field(64, gt=0, description="Largest gRPC message, either way.")
    max_stream_outstanding: int = Field(
        256,
        ge=1,
        description="Requests one ModelStreamInfer stream may have unanswered; beyond it "
        "Coalesce stops reading the stream and gRPC flow control pushes back on the client.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Serving processes sharing the listen port (SO_REUSEPORT), each with its "
        "own batchers; client connections are spread across them by the kernel.",
    )
    backends: dict[str, Backend] = Field(description="Backend models by name.")
    routes: list[Route] = Field(description="Model names served, each mapped to a backend.")

    _check_listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))

    @field_validator("admin", "http")
    @classmethod
    def _check_optional_address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @model_validator(mode="after")
    def _check_routes(self) -> Config:
        problems, seen = [], set()
        if self.workers > 1 and self.listen.endswith(":0"):
            problems.append("listen: workers > 1 need a fixed port to share, not port 0")
        for i, route in enumerate(self.routes):
            if route.backend not in self.backends:
                problems.append(f"routes.{i}.backend: unknown backend {route.backend!r}")
            for key in _route_keys(route):
                if key in seen:
                    problems.append(f"routes.{i}.model: {key[1]} is routed twice")
                seen.add(key)
        if problems:
            raise ConfigError(problems)
        return self


DEFAULT_CONFIG = """
# Served by `coalesce serve` with no --config: the example model bundled with Coalesce.
listen: 127.0.0.1:8500
admin: 127.0.0.1:9464
backends:
  example:
    type: local
    model: coalesce.example_model:load
routes:
  - {model: example, backend: example}
"""


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    if len(loc) > 2 and loc[0] == "backends" and loc[2] in (*BUILTIN_TYPES, "custom"):
        del loc[2]  # the union's tag, not a key the user wrote
    kind, ctx = error["type"], error.get("ctx", {})
    message = {
        "extra_forbidden": "unknown key",
        "missing": "required",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "greater_than": f"must be > {ctx.get('gt')}",
    }.get(kind, error["msg"].removeprefix("Value error, "))
    return f"{'.'.join(loc) or '(top)'}: {message}"


def parse(data: Any) -> Config:
    """Validate a loaded YAML document; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top): must be a mapping"])
    try:
        return Config.model_validate(data)  # cross-references raise ConfigError themselves
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from None


def load(path: str | Path | None) -> Config:
    """The config at `path`, or the bundled example config when `path` is None."""
    if path is None:
        return parse(yaml.safe_load(DEFAULT_CONFIG))
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    try:
        return parse(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise ConfigError([f"(yaml): {exc}"]) from None
