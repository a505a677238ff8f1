"""Coalesce's own KServe v2 / Triton .proto files against tritonclient's descriptors.

protos/kserve_v2.proto and protos/kserve_model_config.proto are written from the
published protocol; this checks every field, enum value and method Coalesce
declares against its twin in tritonclient (grpc_service.proto, model_config.proto),
so that Triton's clients and perf_analyzer read our messages as Triton's own.
"""

from __future__ import annotations

import pytest
from coalesce.codecs import wire
from google.protobuf import descriptor_pool
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.support.protos import enums, field_problems, messages, method_problems

OFFICIAL = descriptor_pool.Default()
LOADED = (service_pb2, model_config_pb2)  # importing them loads the official definitions
OUR_POOL = wire.ModelInferRequest.DESCRIPTOR.file.pool
OUR_FILES = [
    OUR_POOL.FindFileContainingSymbol(name)
    for name in ("inference.ModelInferRequest", "inference.ModelConfig")
]
OURS = [m for f in OUR_FILES for m in messages(f)]


def test_both_files_are_in_the_inference_package():
    assert {f.package for f in OUR_FILES} == {"inference"}
    assert len(OURS) > 30


@pytest.mark.parametrize("ours", OURS, ids=lambda m: m.full_name)
def test_message_fields_match_tritonclients(ours):
    assert field_problems(ours, OFFICIAL.FindMessageTypeByName(ours.full_name)) == []


@pytest.mark.parametrize(
    "ours", [e for f in OUR_FILES for e in enums(f)], ids=lambda e: e.full_name
)
def test_enum_values_match_tritonclients(ours):
    official = OFFICIAL.FindEnumTypeByName(ours.full_name)
    values = {v.name: v.number for v in ours.values}
    assert values == {v.name: v.number for v in official.values if v.name in values}


def test_service_methods_match_tritonclients():
    ours = OUR_POOL.FindServiceByName(wire.KSERVE)
    assert method_problems(ours, OFFICIAL.FindServiceByName(wire.KSERVE)) == []


def test_the_comparison_catches_a_wrong_field_number():
    """The check can fail: a message with one field renumbered is reported."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    OUR_POOL.FindFileContainingSymbol("inference.ModelConfig").CopyToProto(proto)
    proto.name = "broken.proto"  # in a pool of its own
    for message in proto.message_type:
        if message.name == "ModelConfig":
            next(f for f in message.field if f.name == "max_batch_size").number = 3
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    broken = pool.FindMessageTypeByName("inference.ModelConfig")
    official = OFFICIAL.FindMessageTypeByName("inference.ModelConfig")
    problems = field_problems(broken, official)
    assert any("max_batch_size" in p for p in problems), problems


def test_a_config_encoded_by_tritonclient_decodes_identically():
    """A Triton config with fields we do not declare survives our parse and re-encode."""
    config = model_config_pb2.ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=8)
    config.input.add(name="x", data_type=model_config_pb2.TYPE_FP32, dims=[4])
    config.output.add(name="y", data_type=model_config_pb2.TYPE_FP32, dims=[2])
    config.dynamic_batching.preferred_batch_size.append(4)
    config.instance_group.add(count=2, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    config.version_policy.latest.num_versions = 1
    data = config.SerializeToString()
    ours = wire.ModelConfig.FromString(data)
    assert ours.max_batch_size == 8 and list(ours.input[0].dims) == [4]
    back = model_config_pb2.ModelConfig.FromString(ours.SerializeToString())
    assert back == config
