"""KServe v2 ModelInferRequest -> InferRequest, and outputs -> ModelInferResponse bytes.

Shared by the unary and the streaming gRPC front ends. Raw contents stay numpy
views of the request bytes; answers are encoded by hand (see protowire).
"""

from __future__ import annotations

from coalesce.core.request import InferRequest, ModelInfo, Tensors
from coalesce.core.tensors import CONTENTS_FIELD, check_shape, from_contents, from_raw, to_raw
from coalesce.errors import InvalidArgument

from . import protowire


def decode(request, deadline: float | None) -> InferRequest:
    """A ModelInferRequest as named arrays; every problem names the tensor."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise InvalidArgument("inputs: the request has no input tensors")
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors: Tensors = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise InvalidArgument(f"tensor '{name}': sent twice")
        shape = check_shape(tensor.shape, name)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"tensor '{name}': both contents and raw_input_contents")
            tensors[name] = from_raw(raw[i], tensor.datatype, shape, name)
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else ()
            tensors[name] = from_contents(values, tensor.datatype, shape, name)
    count = len(tensors[name])
    if len(tensors) > 1 and any(len(a) != count for a in tensors.values()):
        sizes = ", ".join(f"{n}: {len(a)}" for n, a in tensors.items())
        raise InvalidArgument(f"inputs disagree on the batch dimension ({sizes})")
    if count == 0:
        raise InvalidArgument(f"tensor '{next(iter(tensors))}': batch dimension is 0")
    return InferRequest(tensors, count, deadline, request.id, route=request.model_name)


def requested_outputs(request, info: ModelInfo) -> list[str]:
    """Output names asked for, checked against the model's declared outputs when known."""
    names = [o.name for o in request.outputs]
    known = {spec.name for spec in info.outputs}
    for name in names:
        if known and name not in known:
            raise InvalidArgument(
                f"outputs: '{name}' is not an output of model '{request.model_name}' "
                f"(it has {', '.join(sorted(known))})"
            )
    return names


def encode(request, version: str, outputs: Tensors, names: list[str]) -> bytes:
    """A serialized ModelInferResponse (see protowire: no upb objects on the hot path)."""
    head = [protowire.strings((1, request.model_name), (2, version))]
    if request.id:
        head.append(protowire.delimited(3, request.id.encode()))
    raws = []
    for name in names or outputs:
        array = outputs.get(name)
        if array is None:
            raise InvalidArgument(f"outputs: model '{request.model_name}' has no output '{name}'")
        datatype, raw = to_raw(array, name)
        head.append(protowire.output_tensor(5, name, datatype, array.shape))
        raws += (protowire.prefix(6, len(raw)), raw)
    return b"".join(head + raws)
