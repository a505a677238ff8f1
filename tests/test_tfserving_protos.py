"""Coalesce's own TF Serving .proto files against the official packages' descriptors.

Coalesce speaks TF Serving's wire format through protos/tensorflow*.proto, written
from the published definitions. Two messages are byte-compatible when every field
they share has the same number, type, label and packing: this test loads both
definitions and compares every field, enum value and service method Coalesce
declares with its twin in `tensorflow` / `tensorflow-serving-api`.
"""

from __future__ import annotations

import pytest
from coalesce.codecs import wire
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from tests.support.protos import enums, field_problems, messages, method_problems

pytest.importorskip("tensorflow_serving")
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
)

OFFICIAL = descriptor_pool.Default()
ROOTS = ["tensorflow.TensorProto", "tensorflow.serving.PredictRequest", "tensorflow.error.Code"]
# importing them is what loads the official definitions into OFFICIAL
LOADED = (predict_pb2, get_model_metadata_pb2, get_model_status_pb2, prediction_service_pb2)
LOADED += (model_service_pb2,)


def our_files() -> list[FileDescriptor]:
    pool = wire.message("tensorflow.serving.PredictRequest").DESCRIPTOR.file.pool
    return [pool.FindFileContainingSymbol(name) for name in ROOTS]


OURS = [m for f in our_files() for m in messages(f)]


def test_every_declared_package_matches_the_official_one():
    assert {f.package for f in our_files()} == {
        "tensorflow",
        "tensorflow.serving",
        "tensorflow.error",
    }


@pytest.mark.parametrize("ours", OURS, ids=lambda m: m.full_name)
def test_message_fields_match_the_official_definition(ours):
    assert ours.fields, ours.full_name
    assert field_problems(ours, OFFICIAL.FindMessageTypeByName(ours.full_name)) == []


@pytest.mark.parametrize(
    "ours", [e for f in our_files() for e in enums(f)], ids=lambda e: e.full_name
)
def test_enum_values_match_the_official_definition(ours):
    official = OFFICIAL.FindEnumTypeByName(ours.full_name)
    values = {v.name: v.number for v in ours.values}
    assert values == {v.name: v.number for v in official.values if v.name in values}
    assert len(values) >= len([v for v in official.values if v.number < 100]), (
        f"{ours.full_name} misses values"
    )


@pytest.mark.parametrize(
    "service", ["tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"]
)
def test_service_methods_match_the_official_definition(service):
    ours = wire.message("tensorflow.serving.PredictRequest").DESCRIPTOR.file.pool
    ours = ours.FindServiceByName(service)
    assert method_problems(ours, OFFICIAL.FindServiceByName(service)) == []


def test_a_request_encoded_by_the_official_stubs_decodes_identically():
    """Round trip of a PredictRequest using most of the declared fields."""
    import numpy as np
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version.value = 7
    request.model_spec.signature_name = "sig"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((2, 3), np.float32)))
    request.inputs["h"].CopyFrom(tf.make_tensor_proto(np.ones((2,), np.float16)))
    request.inputs["s"].CopyFrom(tf.make_tensor_proto([b"a", b"bc"]))
    request.output_filter.append("y")
    data = request.SerializeToString()
    ours = wire.PredictRequest.FromString(data)
    assert ours.SerializeToString(deterministic=True) == request.SerializeToString(
        deterministic=True
    )
    assert ours.model_spec.version.value == 7
    assert list(ours.inputs["s"].string_val) == [b"a", b"bc"]
