"""The routing config: parsed once, at the edge, into typed and validated objects.

Every default lives here, in the field that it belongs to. A config has three
sections, as in Envoy: where to listen, the backends (each with its own batcher)
and the routes that map the model names clients ask for onto backends.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
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


def _check_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError(f"no such file: {value}")
    return value


def _check_optional_file(value: str | None) -> str | None:
    return None if value is None else _check_file(value)


def _read_file(path: str, key: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc}") from None


class ServerTLS(_Strict):
    """TLS on a listener. The files are read again whenever they change on disk (see
    coalesce.tls), so a rotated certificate serves from the next handshake on."""

    cert: str = Field(description="PEM certificate chain the listener presents.")
    key: str = Field(description="PEM private key of `cert`.")
    client_ca: str | None = Field(
        None,
        description="PEM CA bundle that client certificates are verified against (mutual "
        "TLS); default none: clients are not asked for a certificate.",
    )
    require_client_cert: bool = Field(
        False,
        description="Refuse the handshake of a client without a valid certificate. Without "
        "it, HTTP listeners ask for (and verify) an optional one; gRPC asks only when true.",
    )

    _check_files = field_validator("cert", "key")(classmethod(lambda cls, v: _check_file(v)))
    _check_ca = field_validator("client_ca")(classmethod(lambda cls, v: _check_optional_file(v)))

    @model_validator(mode="after")
    def _loads(self) -> ServerTLS:
        """A key that does not match its certificate is a config error, not a failed start."""
        if self.require_client_cert and self.client_ca is None:
            raise ValueError("require_client_cert needs client_ca")
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot load the certificate, key or CA: {exc}") from None
        return self


class BackendTLS(_Strict):
    """TLS towards a backend; an empty block (`tls: {}`) verifies it against the default
    roots. A gRPC channel cannot change credentials, so rotated files are used from the
    next reload: the files' digest is part of the block, so the backend counts as changed
    and is rebuilt (its old channel finishing what it holds)."""

    ca: str | None = Field(
        None,
        description="PEM CA bundle the backend's certificate is verified against; "
        "default the system's roots (transport native) or gRPC's bundled ones (grpc).",
    )
    cert: str | None = Field(None, description="PEM client certificate chain (mutual TLS).")
    key: str | None = Field(None, description="PEM private key of `cert`.")
    server_name: str | None = Field(
        None,
        min_length=1,
        description="The name the backend's certificate must carry, when it is not the "
        "target's host (grpc.ssl_target_name_override).",
    )

    _check_files = field_validator("ca", "cert", "key")(
        classmethod(lambda cls, v: _check_optional_file(v))
    )

    _digest: str = PrivateAttr("")

    @model_validator(mode="after")
    def _pair(self) -> BackendTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self

    def model_post_init(self, context: Any) -> None:
        """The files' contents, as a digest: compared when a reload asks what changed."""
        digest = hashlib.sha256()
        for path in (self.ca, self.cert, self.key):
            digest.update(_read_file(path, "tls").encode() if path else b"-")
        self._digest = digest.hexdigest()


_HEADER = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_forward(names: tuple[str, ...]) -> tuple[str, ...]:
    lowered = tuple(dict.fromkeys(name.lower() for name in names))
    for name in lowered:
        if not _HEADER.fullmatch(name) or name.startswith("grpc-") or name.endswith("-bin"):
            raise ValueError(f"{name!r} is not a forwardable text header name")
    return lowered


class RouteAuth(_Strict):
    """Who may call a route. Every check that is set must pass: a bearer token among
    the listed ones and/or a client certificate naming an allowed identity."""

    bearer_tokens_file: str | None = Field(
        None,
        description="File of accepted bearer tokens, one per line ('#' comments); read at "
        "load and on reload, only their SHA-256 kept.",
    )
    bearer_token_sha256: frozenset[str] = Field(
        frozenset(), description="Accepted tokens as hex SHA-256 digests (no secret in config)."
    )
    allowed_client_cns: frozenset[str] = Field(
        frozenset(),
        description="Client identities allowed: a verified client certificate's subject CN "
        "or a DNS/URI subject alternative name. Needs tls.client_ca.",
    )
    _tokens: frozenset[str] = PrivateAttr(frozenset())

    _check_tokens_file = field_validator("bearer_tokens_file")(
        classmethod(lambda cls, v: _check_optional_file(v))
    )

    @field_validator("bearer_token_sha256")
    @classmethod
    def _check_digests(cls, digests: frozenset[str]) -> frozenset[str]:
        lowered = frozenset(d.lower() for d in digests)
        for digest in lowered:
            if not _SHA256.fullmatch(digest):
                raise ValueError(f"{digest!r} is not a hex SHA-256 digest")
        return lowered

    def model_post_init(self, context: Any) -> None:
        """The accepted digests, file and list together: one set lookup per request."""
        tokens = set(self.bearer_token_sha256)
        if self.bearer_tokens_file is not None:
            lines = _read_file(self.bearer_tokens_file, "bearer_tokens_file").splitlines()
            found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
            if not found:
                raise ValueError(f"bearer_tokens_file: {self.bearer_tokens_file} holds no token")
            tokens.update(hashlib.sha256(token.encode()).hexdigest() for token in found)
        if not tokens and not self.allowed_client_cns:
            raise ValueError("set bearer_tokens_file, bearer_token_sha256 or allowed_client_cns")
        self._tokens = frozenset(tokens)

    @functools.cached_property
    def token_digests(self) -> frozenset[str]:
        """SHA-256 hex digests of every accepted bearer token (cached: reading a private
        attribute of a pydantic model takes microseconds, this is the hot path)."""
        return self._tokens


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


class CircuitBreaker(_Strict):
    """Fail fast while a backend is known to be down, instead of queueing callers until
    their deadlines. Readiness probes run every 2 s; one failed probe may be a hiccup, so
    only `failed_probes` failures in a row open the breaker (requests, queued ones too,
    get UNAVAILABLE at once); the first probe that succeeds closes it."""

    failed_probes: int = Field(2, ge=1, description="Failed probes in a row that open it.")


class _Backend(_Strict):
    batching: Batching = Field(default_factory=Batching, description="Batching policy.")
    timeout_ms: float | None = Field(
        None, gt=0, description="Longest backend call; the callers' deadlines also bound it."
    )
    circuit_breaker: CircuitBreaker | None = Field(
        default_factory=CircuitBreaker,
        description="Fail fast while the backend is down; null: requests queue regardless.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Per output, a file of class labels, one per line by index (Triton's "
        "label_filename): classification answers read value:index:label. For a Triton model "
        "give the same file its config names.",
    )
    forward_metadata: tuple[str, ...] = Field(
        (),
        description="Request metadata (gRPC) / header (HTTP) names passed on to the backend, "
        "lower-case, e.g. [authorization, traceparent]; nothing else is. Requests whose "
        "values differ never share a batch, except traceparent/tracestate: a batch carries "
        "its first request's.",
    )

    _check_forward = field_validator("forward_metadata")(
        classmethod(lambda cls, v: _check_forward(v))
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for path in value.values():
            _check_file(path)
        return value

    @model_validator(mode="after")
    def _forwardable(self) -> _Backend:
        """An in-process model gets no metadata: forwarding would only split its batches."""
        if self.forward_metadata and getattr(self, "type", None) in ("local", "python"):
            raise ValueError("forward_metadata: a local or python model receives no metadata")
        return self


def _check_replica(value: str) -> str:
    """One replica's address: an IP literal and a port (gRPC's ipv4:/ipv6: lists take no names)."""
    host = _check_address(value).rpartition(":")[0]
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(
            f"must be ip:port or [ipv6]:port, got {value!r} (for a name, use target: "
            "dns:///name:port, which spreads over every address it resolves to)"
        ) from None
    if ":" in host and not host.startswith("["):
        raise ValueError(f"an IPv6 address goes in brackets, [addr]:port, got {value!r}")
    return value


class OutlierDetection(_Strict):
    """Passive outlier detection by gRPC itself (its outlier_detection LB policy): a replica
    that fails much of its traffic is ejected for a while, then gets calls again; failing
    again, it is ejected for longer. Every non-OK status counts as a failure, so the
    limits below keep bad requests from ejecting healthy replicas wholesale."""

    interval_ms: float = Field(1000, gt=0, description="How often replicas are judged.")
    failure_percent: int = Field(
        50,
        ge=1,
        le=100,
        description="A replica failing at least this share of its calls in one interval is "
        "ejected (only while at least two replicas each had min_calls calls).",
    )
    min_calls: int = Field(
        10, ge=1, description="A replica with fewer calls in an interval is not judged."
    )
    base_ejection_ms: float = Field(
        5000,
        gt=0,
        description="How long the first ejection lasts; each ejection in a row adds as much "
        "again (gRPC's rule), up to max_ejection_ms. Then the replica is tried again.",
    )
    max_ejection_ms: float = Field(30000, gt=0, description="The longest ejection.")
    max_ejected_percent: int = Field(
        50, ge=0, le=100, description="Never more than this share of replicas ejected at once."
    )


class Retries(_Strict):
    """gRPC's own retries (its retryPolicy) of a backend call that failed UNAVAILABLE.

    UNAVAILABLE means the replica could not be reached, refused the call before running
    it (e.g. its model is unloading), or went away before answering. gRPC retries only
    until the response starts, and models are pure functions of their inputs, so re-running
    such a batch, normally on another replica, is safe; set max_attempts: 1 for a service
    with side effects. Retries stay within the callers' deadline.
    """

    max_attempts: int = Field(
        2, ge=1, le=5, description="Attempts per call, the first included; 1 turns retries off."
    )
    initial_backoff_ms: float = Field(
        20,
        gt=0,
        description="Backoff before the first retry; each retry waits a random time up to "
        "min(initial_backoff_ms * backoff_multiplier^n, max_backoff_ms) (full jitter).",
    )
    max_backoff_ms: float = Field(500, gt=0, description="The longest backoff.")
    backoff_multiplier: float = Field(2.0, ge=1, description="Backoff growth per retry.")
    budget_ratio: float = Field(
        0.1,
        ge=0.001,
        le=1,
        description="Retry budget (gRPC retryThrottling): each success earns this many tokens "
        "and each failure costs one; retries stop while fewer than half of budget_tokens are "
        "left, so retries stay near this fraction of the calls that succeed.",
    )
    budget_tokens: int = Field(
        10, ge=2, le=1000, description="The budget's size: how many failures a burst may absorb."
    )
    buffer_mb: float = Field(
        16,
        gt=0,
        description="gRPC keeps a batch's bytes to resend them; a larger batch is not retried.",
    )


class RemoteBackend(_Backend):
    """A backend reached over gRPC: one address, several replicas, or a DNS name.

    One gRPC channel per backend. gRPC's own resolver, load balancer, outlier ejection
    and retry policy (see coalesce.adapters.channels) spread and retry the calls, in C and off
    the event loop; Coalesce does not balance by itself.
    """

    target: str | None = Field(
        description="host:port, or dns:///name:port for every address the name resolves to "
        "(a Kubernetes headless Service lists each ready replica). Or give `targets`."
    )
    targets: list[Annotated[str, AfterValidator(_check_replica)]] | None = Field(
        None,
        min_length=1,
        description="Several replicas, each ip:port or [ipv6]:port (one address family).",
    )
    load_balancing: Literal["round_robin", "pick_first"] = Field(
        "round_robin",
        description="round_robin: spread calls over every reachable replica; pick_first: "
        "use the first reachable one, the others only when it fails (failover).",
    )
    outlier_detection: OutlierDetection | None = Field(
        default_factory=OutlierDetection,
        description="Eject replicas that keep failing; null turns it off.",
    )
    retries: Retries = Field(default_factory=Retries, description="Retries of UNAVAILABLE calls.")
    tls: BackendTLS | None = Field(None, description="TLS towards the backend; default plaintext.")
    transport: Literal["auto", "native", "grpc"] = Field(
        "auto",
        description="native: Coalesce's own HTTP/2 client (coalesce.http2.client), one "
        "connection to one `target` host:port, cleartext or TLS, with these retries; ~0.3 ms "
        "less per call than gRPC core at light load. grpc: gRPC core's channel (replicas, "
        "dns:/// names, balancing, outlier ejection). auto: native when `target` is an IP "
        "address or localhost, else grpc (a name may resolve to several replicas).",
    )

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        if len({value.startswith("[") for value in values}) > 1:
            raise ValueError("mixes IPv4 and IPv6 addresses; list one family")
        return values

    @model_validator(mode="before")
    @classmethod
    def _targets_stand_in_for_target(cls, data: Any) -> Any:
        """`target` is required unless `targets` is given (so a missing one says so)."""
        if isinstance(data, dict) and data.get("targets") is not None and "target" not in data:
            return {**data, "target": None}
        return data

    @model_validator(mode="after")
    def _one_address(self) -> RemoteBackend:
        if (self.target is None) == (self.targets is None):
            raise ValueError("give either target or targets")
        if self.transport == "native" and self._single_host() is None:
            raise ValueError("transport native takes one host:port `target`")
        return self

    def _single_host(self) -> str | None:
        """The host of a plain host:port `target` (None for replicas, dns:, unix: ...)."""
        if self.target is None or self.target.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
            return None
        return self.target.rpartition(":")[0].strip("[]")

    @property
    def native(self) -> bool:
        """Whether calls go over Coalesce's own HTTP/2 client (see `transport`)."""
        if self.transport != "auto":
            return self.transport == "native"
        host = self._single_host()
        if host == "localhost":
            return True
        try:
            ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return True

    @property
    def address(self) -> str:
        """Where the backend is, for messages."""
        return self.target or ",".join(self.targets or ())


class _PythonModel(_Backend):
    model: str = Field(
        description="'module:factory'; the factory returns a callable taking and returning "
        "dict[str, numpy.ndarray] (or an object with such a __call__; async allowed in-process)."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments to the factory."
    )

    _check_model = field_validator("model")(classmethod(lambda cls, v: _check_import_path(v)))


class LocalBackend(_PythonModel):
    """An in-process Python model."""

    type: Literal["local"]
    threads: int | None = Field(
        None, ge=1, description="Threads running a blocking model; default max_in_flight."
    )
    inline: bool | Literal["auto"] = Field(
        "auto",
        description="auto: a blocking model is called on the event loop while its calls take "
        "under 0.3 ms (a moving average; a thread's hand-off costs more), else in threads. "
        "true: always on the loop; false: always in threads.",
    )


class TritonBackend(RemoteBackend):
    """A model on a Triton Inference Server, over gRPC."""

    type: Literal["triton"]
    model: str = Field(min_length=1, description="The model's name on Triton.")
    version: str = Field("", description="The model version; empty for Triton's choice.")


class GrpcBackend(RemoteBackend):
    """A team's own gRPC model service: Coalesce's batch protocol, or any protos via a codec."""

    type: Literal["grpc"]
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

    @field_validator("codec")
    @classmethod
    def _check_codec(cls, value: str | None) -> str | None:
        return None if value is None else _check_import_path(value)


class PythonBackend(_PythonModel):
    """A Python model that Coalesce runs in worker processes of its own (adapters/python.py);
    `model` is imported in each worker."""

    type: Literal["python"]
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
    requirements: list[str] | str | None = Field(
        None,
        description="What the model needs installed: requirement strings, or a "
        "requirements.txt path. Coalesce builds a virtual environment for them (from "
        "`python`, default its own interpreter; with uv when on PATH, else venv + pip), "
        "cached under `cache_dir` by their digest, and runs the workers in it.",
    )
    code: str | None = Field(
        None, description="A directory put on the workers' sys.path (the model's own code)."
    )
    cache_dir: str | None = Field(
        None,
        description="Where built environments are kept; default $COALESCE_CACHE/runtimes, "
        "else ~/.cache/coalesce/runtimes.",
    )
    build_timeout_s: float = Field(
        1800.0, gt=0, description="Longest one step of building the environment may take."
    )

    _requirements_digest: str = PrivateAttr("")

    @field_validator("requirements")
    @classmethod
    def _check_requirements(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str):
            return _check_file(value)
        if value is not None and not all(line.strip() for line in value):
            raise ValueError("an empty requirement")
        return value

    @field_validator("code")
    @classmethod
    def _check_code(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"no such directory: {value}")
        return value

    def model_post_init(self, context: Any) -> None:
        """A requirements file's contents, as a digest: a reload after it changes rebuilds."""
        if isinstance(self.requirements, str):
            text = _read_file(self.requirements, "requirements")
            self._requirements_digest = hashlib.sha256(text.encode()).hexdigest()

    @model_validator(mode="before")
    @classmethod
    def _one_batch_per_worker(cls, data: Any) -> Any:
        """Unless set, batching.max_in_flight = processes: one batch for each worker."""
        if not isinstance(data, dict):
            return data
        batching = data.get("batching", {})
        processes = data.get("processes", os.cpu_count() or 1)
        unset = isinstance(batching, dict) and "max_in_flight" not in batching
        if unset and isinstance(processes, int) and processes >= 1:
            return {**data, "batching": {**batching, "max_in_flight": processes}}
        return data


class TFServingBackend(RemoteBackend):
    """A model on a TensorFlow Serving server, over its gRPC PredictionService."""

    type: Literal["tfserving"]
    model: str = Field(min_length=1, description="The model's name on TF Serving.")
    signature: str = Field(
        "serving_default", min_length=1, description="The signature each batch calls."
    )
    version: int | None = Field(
        None, ge=1, description="The model version; default the latest TF Serving has."
    )


class CustomBackend(_Backend):
    """A backend implemented by a user's adapter class."""

    type: str = Field(description="'module:Class' of an adapter (see coalesce.core.adapter).")
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


class Tracing(_Strict):
    """OpenTelemetry tracing (needs `pip install coalesce[tracing]`)."""

    exporter: Literal["otlp", "console", "none"] = Field(
        "otlp", description="Where spans go: an OTLP/gRPC collector, stdout, or nowhere."
    )
    endpoint: str = Field("127.0.0.1:4317", description="The OTLP collector's gRPC address.")
    service_name: str = Field("coalesce", description="The `service.name` of the spans.")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces kept; a caller's decision is followed."
    )


class Route(_Strict):
    """Clients asking for `model` are served by `backend`.

    Several routes may share a model name when they are pinned to different
    versions or labels (see coalesce.core.routing for how a request picks one).
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
    auth: RouteAuth | None = Field(
        None, description="Who may call this route; default anyone who reaches the port."
    )
    max_request_bytes: int | None = Field(
        None,
        ge=1,
        description="Largest request to this route (the gRPC message or the HTTP body); "
        "beyond it RESOURCE_EXHAUSTED / 413. max_message_mb still bounds every route.",
    )


def _route_keys(route: Route) -> list[tuple[str, str]]:
    """What a route claims: its model name alone, or each version and label it is pinned to."""
    name = repr(route.model)
    if route.version is None and route.label is None:
        return [(route.model, name)]
    keys = [] if route.version is None else [(route.model, f"{name} version {route.version}")]
    return keys + ([] if route.label is None else [(route.model, f"{name} label {route.label!r}")])


_Rate = tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(ge=0)]]


class Http2(_Strict):
    """What one peer may make Coalesce's own HTTP/2 server spend (coalesce.http2.limits).
    Going over a budget costs that peer its connection (GOAWAY ENHANCE_YOUR_CALM), never
    anyone else's calls. Rates are `[burst, per_second]` token buckets per connection;
    the defaults follow nghttp2's and Envoy's."""

    max_concurrent_streams: int = Field(
        1024, ge=1, description="SETTINGS_MAX_CONCURRENT_STREAMS; streams beyond are refused."
    )
    max_header_list_size: int = Field(
        16384,
        ge=1024,
        description="SETTINGS_MAX_HEADER_LIST_SIZE, enforced while decoding: a bigger header "
        "list (an HPACK bomb) closes the connection. gRPC core's hard metadata limit is the "
        "same 16 KiB.",
    )
    max_continuations: int = Field(
        16, ge=1, description="CONTINUATION frames one header block may use."
    )
    stream_window: int = Field(
        1 << 20, ge=65535, le=(1 << 31) - 1, description="SETTINGS_INITIAL_WINDOW_SIZE (bytes)."
    )
    connection_window: int = Field(
        1 << 20,
        ge=65535,
        le=(1 << 31) - 1,
        description="Bytes one connection may have in flight to us; credited back as they "
        "are consumed.",
    )
    max_buffered_bytes: int = Field(
        128 << 20,
        ge=1 << 20,
        description="Bytes of request bodies still arriving that all connections together "
        "may hold beyond their windows; past it their senders wait (flow control).",
    )
    max_connections: int = Field(
        4096, ge=1, description="Open connections; more are closed as they are accepted."
    )
    backlog: int = Field(4096, ge=1, description="The listening socket's accept queue.")
    preface_timeout_s: float = Field(
        10.0, gt=0, description="Time for a new connection's preface and first SETTINGS."
    )
    settings_ack_timeout_s: float = Field(
        10.0, gt=0, description="Time for the peer to acknowledge our SETTINGS."
    )
    idle_timeout_s: float = Field(
        300.0, gt=0, description="A connection with no stream open this long gets GOAWAY."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time to finish a header block continued in CONTINUATIONs."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a request body may stop arriving before its stream is reset.",
    )
    penalty_half_life_s: float = Field(
        10.0,
        ge=0,
        description="A connection we close for misbehaving (a budget spent, a protocol "
        "error) halves every budget and the stream cap of the next connections from its IP "
        "address (down to 1/128 of each budget, keeping what one well-behaved exchange "
        "needs: 8 SETTINGS, 16 KiB of large header blocks, 2 of the rest; 100 streams) and "
        "holds each, unread, "
        "2^strikes ms (at most 1 s) before it is answered; the penalty halves every "
        "this many seconds. Connections already open keep theirs. So a "
        "peer cannot refill its budgets by reconnecting. 0: off (budgets per connection "
        "only).",
    )
    settings_rate: _Rate = Field(
        (100, 10), description="SETTINGS frames (of at most 32 entries each)."
    )
    ping_rate: _Rate = Field(
        (1000, 100), description="PING frames (each DATA frame we send earns one)."
    )
    reset_rate: _Rate = Field(
        (1000, 33),
        description="Streams the peer resets before their answer (Rapid Reset); each "
        "answer earns one.",
    )
    window_update_rate: _Rate = Field(
        (1000, 100),
        description="WINDOW_UPDATE frames (each stream opened earns one, each DATA frame we "
        "send ten, as Envoy's max_inbound_window_update_frames_per_data_frame_sent).",
    )
    priority_rate: _Rate = Field((1000, 100), description="PRIORITY frames.")
    empty_frame_rate: _Rate = Field(
        (1000, 100),
        description="Frames that carry nothing: empty DATA, unknown types, frames on closed "
        "streams, streams refused.",
    )
    header_bytes_rate: _Rate = Field(
        (64 << 10, 16 << 10),
        description="Bytes of header blocks over 512 bytes (each answer earns 2048): "
        "decoding costs ~0.3 µs a byte of loop time.",
    )


class KafkaSource(_Strict):
    """A Kafka inbox read by a consumer group (librdkafka, through confluent-kafka)."""

    type: Literal["kafka"]
    brokers: list[str] = Field(min_length=1, description="Bootstrap brokers, host:port.")
    topic: str = Field(min_length=1, description="The inbox topic.")
    group: str = Field(
        min_length=1, description="The consumer group: instances in one group share partitions."
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=6_000,
        description="A member silent this long leaves the group (Kafka's floor is 6000).",
    )
    instance_id: str | None = Field(
        None,
        min_length=1,
        description="A stable name for this instance (the pod's name in a StatefulSet): "
        "static group membership (group.instance.id), so a restarted instance takes its "
        "partitions back at once instead of waiting for a rebalance.",
    )
    transactional_id: str | None = Field(
        None,
        min_length=1,
        description="exactly_once: this instance's transactional.id; default "
        "coalesce-<pipeline>-<instance_id, else hostname>, so a restarted instance fences "
        "its predecessor and aborts what it left open.",
    )
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="More librdkafka settings for the consumer and producers (security.protocol, "
        "sasl.*, ssl.*, ...).",
    )

    @property
    def inbox(self) -> str:
        return self.topic


class RedisSource(_Strict):
    """A Redis stream read by a consumer group (XREADGROUP, through redis-py's asyncio
    client). Entries hold the message in field `value` (and optionally `key`); every
    other field is a header."""

    type: Literal["redis"]
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        min_length=1,
        description="redis:// or rediss:// (TLS) URL, with the database and any credentials.",
    )
    stream: str = Field(min_length=1, description="The inbox stream.")
    group: str = Field(
        min_length=1, description="The consumer group: instances in one group share entries."
    )
    consumer: str | None = Field(
        None,
        min_length=1,
        description="This instance's consumer name in the group; default the hostname (the "
        "pod's name). A restarted instance with the same name takes up its own pending entries "
        "at once; set it when several instances share a host.",
    )
    claim_idle_ms: int = Field(
        30_000,
        ge=100,
        description="Entries pending this long on another consumer (a dead instance) are "
        "claimed by this one (XAUTOCLAIM).",
    )

    @property
    def inbox(self) -> str:
        return self.stream


class NatsSource(_Strict):
    """A NATS JetStream stream read by a durable pull consumer (nats-py)."""

    type: Literal["nats"]
    servers: list[str] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        min_length=1,
        description="NATS server URLs (nats:// or tls://).",
    )
    stream: str = Field(min_length=1, description="The JetStream stream holding the inbox.")
    subject: str = Field(min_length=1, description="The inbox subject (wildcards allowed).")
    durable: str = Field(
        min_length=1,
        description="The durable consumer's name: instances with the same one share its messages.",
    )
    ack_wait_s: float = Field(
        30.0,
        gt=0,
        description="A message not acked this long (its instance died) is delivered again.",
    )

    @property
    def inbox(self) -> str:
        return self.subject


class Outbox(_Strict):
    """Where results (or rejected messages) are published, on the source's broker: a
    Kafka topic, a Redis stream, or a NATS subject that a JetStream stream captures."""

    topic: str = Field(min_length=1)


class Pipeline(_Strict):
    """Inference requests from a broker's inbox, batched with the route's other callers,
    results to its outbox (coalesce.pipelines)."""

    source: KafkaSource | RedisSource | NatsSource = Field(discriminator="type")
    format: Literal["kserve-json", "kserve-proto"] = Field(
        "kserve-json",
        description="A message's value: the KServe v2 REST body (JSON, binary data allowed with "
        "an Inference-Header-Content-Length header), or a serialized ModelInferRequest.",
    )
    route: str = Field(min_length=1, description="A routed model, as a gRPC caller names it.")
    sink: Outbox
    dead_letter: Outbox | None = Field(
        None,
        description="Messages that cannot succeed (undecodable, rejected by the model), with "
        "their error in headers; without one they are logged and committed.",
    )
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="exactly_once (Kafka only): results and input offsets commit in one Kafka "
        "transaction. Redis adds results and acks inputs atomically (MULTI/EXEC) either way; "
        "NATS de-duplicates republished results by their Nats-Msg-Id.",
    )
    ordering: Literal["as_ready", "input"] = Field(
        "as_ready",
        description="as_ready: each batch's results are published as soon as it is answered "
        "(inputs are still committed once every result of the fetch is out). input: a "
        "fetch's results are published together, in input order per partition. Under Kafka "
        "exactly_once results go out at the cycle's commit either way.",
    )
    max_in_flight: int = Field(
        10_000, ge=1, description="Most messages between consume and commit."
    )
    max_in_flight_mb: float = Field(
        64,
        gt=0,
        description="Most bytes of message values between consume and commit (a fetch stops "
        "once past it), so a backlog of big messages keeps memory bounded.",
    )

    @model_validator(mode="after")
    def _check_delivery(self) -> Pipeline:
        if self.delivery == "exactly_once" and self.source.type != "kafka":
            raise ConfigError(
                [f"delivery: exactly_once needs a kafka source, not {self.source.type}"]
            )
        return self


class Config(_Strict):
    """A whole Coalesce configuration."""

    listen: str = Field(
        "127.0.0.1:8500",
        description="gRPC front end address, served by Coalesce's own HTTP/2 "
        "(coalesce.http2): unary and streaming calls, TLS, compression, health.",
    )
    admin: str | None = Field(
        "127.0.0.1:9464", description="HTTP admin address (/healthz, /readyz); null disables it."
    )
    http: str | None = Field(
        None,
        description="HTTP/JSON front ends (KServe v2 REST under /v2, TF Serving REST under "
        "/v1), e.g. 127.0.0.1:8501; null (the default) turns them off.",
    )
    grpc_aio_listen: str | None = Field(
        None,
        description="A second gRPC address served by grpc.aio (gRPC core) instead: the same "
        "methods, at about five times the CPU per call. A fallback for a client that our "
        "HTTP/2 does not suit, and a baseline to compare with; null (the default) is off.",
    )
    tls: ServerTLS | None = Field(
        None, description="TLS (and mutual TLS) on the gRPC and HTTP front ends; default off."
    )
    admin_tls: ServerTLS | None = Field(None, description="TLS on the admin port; default off.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for mutating admin calls (POST /reload). Unset, those are "
        "taken only from loopback peers; set, every caller must send it.",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long queued and in-flight requests may finish."
    )
    max_message_mb: float = Field(64, gt=0, description="Largest gRPC message, either way.")
    http2: Http2 = Field(
        default_factory=Http2, description="Limits of Coalesce's own HTTP/2 server."
    )
    tracing: Tracing | None = Field(
        None, description="OpenTelemetry spans per request; null (the default) is off."
    )
    metrics: bool = Field(
        True,
        description="Count every request (requests, rows, latency by route and status) for "
        "/metrics and the dashboard; false only to measure what counting costs.",
    )
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
    pipelines: dict[str, Pipeline] = Field(
        default_factory=dict,
        description="Broker inboxes served by name: requests in, results out (see Pipeline).",
    )

    _check_listen = field_validator("listen")(classmethod(lambda cls, v: _check_address(v)))

    @field_validator("admin", "http", "grpc_aio_listen")
    @classmethod
    def _check_optional_address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @model_validator(mode="after")
    def _check_routes(self) -> Config:
        problems, seen = [], set()
        if self.workers > 1 and self.listen.endswith(":0"):
            problems.append("listen: workers > 1 need a fixed port to share, not port 0")
        if self.http2.max_buffered_bytes < self.max_message_mb * (1 << 20):
            problems.append(
                "http2.max_buffered_bytes: smaller than max_message_mb, so the largest "
                "message could never arrive"
            )
        aio = self.grpc_aio_listen
        if aio and self.workers > 1 and aio.endswith(":0"):
            problems.append("grpc_aio_listen: workers > 1 need a fixed port to share, not port 0")
        for i, route in enumerate(self.routes):
            if route.backend not in self.backends:
                problems.append(f"routes.{i}.backend: unknown backend {route.backend!r}")
            identities = route.auth is not None and route.auth.allowed_client_cns
            if identities and not (self.tls and self.tls.client_ca):
                problems.append(f"routes.{i}.auth.allowed_client_cns: needs tls.client_ca")
            for key in _route_keys(route):
                if key in seen:
                    problems.append(f"routes.{i}.model: {key[1]} is routed twice")
                seen.add(key)
        routed = {route.model for route in self.routes}
        for name, pipeline in self.pipelines.items():
            if pipeline.route not in routed:
                problems.append(f"pipelines.{name}.route: {pipeline.route!r} is not a routed model")
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
        "less_than_equal": f"must be <= {ctx.get('le')}",
    }.get(kind, error["msg"].removeprefix("Value error, "))
    return f"{'.'.join(loc) or '(top)'}: {message}"


def parse(data: Any) -> Config:
    """Validate a loaded YAML document; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(["(top): must be a mapping"])
    if "fast_listen" in data:
        raise ConfigError(
            [
                "fast_listen: gone: `listen` is served by Coalesce's own HTTP/2 now, streaming "
                "and TLS included (grpc_aio_listen adds a grpc.aio listener)"
            ]
        )
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
