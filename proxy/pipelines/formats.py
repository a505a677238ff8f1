"""A broker message's value as an inference request, and a result as a message's value.

The formats are the front ends' own bodies, so a pipeline's caller builds its message
exactly as it would an HTTP or gRPC call: `kserve-json` is the KServe v2 REST body
(JSON, with binary data after it when the message carries an
Inference-Header-Content-Length header), `kserve-proto` a serialized ModelInferRequest.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from coalesce.codecs import kserve, wire
from coalesce.codecs.json_tensors import parse
from coalesce.core.request import InferRequest, ModelInfo, Tensors
from coalesce.errors import InvalidArgument
from coalesce.frontends.kserve import rest

HEADER_LENGTH = rest.HEADER_LENGTH


class Decoded(NamedTuple):
    request: InferRequest | None
    """None for a row of a Known layout: its tensors stay in its message until its
    chunk's are joined (Known.join), and its answer is encoded with the chunk's."""
    answer: Any  # what encode() needs besides the outputs (wanted outputs, the message)
    id: str
    rows: int
    known: kserve.Known | rest.Known | None = None
    raws: list | None = None  # a row's raw inputs (taken out of its message), or data lists


def layout(kind: str) -> kserve.Layout | rest.Layout:
    """What a pipeline remembers of its messages' layout, for decode's short path."""
    return kserve.Layout() if kind == "kserve-proto" else rest.Layout()


def _header_length(headers: list[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == HEADER_LENGTH.lower():
            return value.decode("latin-1")
    return None


def decode(
    kind: str,
    value: bytes,
    headers: list[tuple[str, bytes]],
    model: str,
    info: ModelInfo,
    layout: kserve.Layout | rest.Layout | None = None,
) -> Decoded:
    """The request in a message; InvalidArgument naming the field when it is not one."""
    if kind == "kserve-json":
        length = _header_length(headers)
        header, blobs = rest.split_body(value, length)
        document = parse(header, "message value")
        known = None if layout is None or length is not None else layout.known
        if known is not None and (datas := known.take(document)) is not None:
            request_id = document.get("id", "")
            return Decoded(None, known.answer, request_id, known.rows, known, datas)
        request = rest.decode(document, blobs)
        names = rest.requested_outputs(document, info, model)
        if layout is not None and length is None:
            layout.learn(document, request, names)
        return Decoded(request, names, request.id, request.rows)
    known = None if layout is None else layout.known
    if known is not None and (taken := known.take_value(value, info)) is not None:
        request_id, raws = taken
        named = kserve.Named(known.skeleton.model_name, request_id)
        return Decoded(None, (named, *known.answer), request_id, known.rows, known, raws)
    message = wire.ModelInferRequest()
    try:
        message.ParseFromString(value)
    except Exception:  # protobuf's DecodeError, and whatever a hostile value provokes
        raise InvalidArgument("message value: not a serialized ModelInferRequest") from None
    if known is not None and (raws := known.take(message, info)) is not None:
        return Decoded(None, (message, *known.answer), message.id, known.rows, known, raws)
    request = kserve.decode(message, None)
    classes = None
    if message.outputs:
        if kserve.output_placements(message):
            raise InvalidArgument("outputs: shared memory is not served to pipelines")
        classes = kserve.requested_classes(message, info)
    names = kserve.requested_outputs(message, info)
    if layout is not None:
        layout.learn(message, request, info, names, classes)
    return Decoded(request, (message, names, classes), request.id, request.rows)


def encode(
    kind: str, model: str, version: str, decoded: Decoded, outputs: Tensors
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The answer's bytes, and the headers it needs (binary data after a JSON header)."""
    if kind == "kserve-json":
        body, length = rest.encode(model, version, decoded.id, outputs, decoded.answer)
        return body, [] if length is None else [(HEADER_LENGTH, str(length).encode())]
    message, names, classes = decoded.answer
    if classes:
        outputs = dict(outputs)
        for name, (count, labels) in classes.items():
            if name in outputs:
                outputs[name] = kserve.classify(outputs[name], count, name, labels)
    return kserve.encode(message, version, outputs, names), []


def encode_rows(
    kind: str, model: str, version: str, chunk: list[Decoded], outputs: Tensors
) -> list[bytes] | None:
    """The answers of a chunk whose messages are alike (one Known layout's rows, or
    JSON bodies of as many rows asking for the same outputs) from its batch's outputs
    at once, or None where each must be encoded alone."""
    first = chunk[0]
    if kind == "kserve-json":
        if any(d.rows != first.rows or d.answer != first.answer for d in chunk):
            return None
        ids = [d.id for d in chunk]
        return rest.encode_rows(model, version, ids, first.rows, outputs, first.answer)
    known = first.known
    if known is None or known.answer[1]:  # classifications are per row
        return None
    model = known.skeleton.model_name
    return kserve.encode_rows(
        model, [d.id for d in chunk], known.rows, version, outputs, known.answer[0]
    )
