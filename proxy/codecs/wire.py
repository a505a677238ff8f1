"""Protobuf message classes for the protocols Coalesce serves, from protos/.

The messages live in a private descriptor pool: tritonclient registers its own
copy of the `inference.*` messages in protobuf's default pool, and two
definitions of one symbol in one pool is an error. The wire format is the same.
"""

from collections.abc import Callable
from importlib import resources
from typing import Any

from coalesce.errors import InvalidArgument
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_pool = descriptor_pool.DescriptorPool()
_files = descriptor_pb2.FileDescriptorSet.FromString(
    resources.files(__package__).joinpath("_protos.binpb").read_bytes()
)
for _file in _files.file:
    _pool.Add(_file)


def message(full_name: str) -> type:
    """The message class for a fully qualified protobuf name."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


def parser(message_class: type) -> Callable[[bytes], Any]:
    """A gRPC request deserializer that hands the handler bytes which are no valid message
    (bad protobuf, a string that is not UTF-8) as an InvalidArgument to answer with, where
    grpc itself would answer UNKNOWN, or end a stream OK without answering the request."""
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return InvalidArgument(
                f"the request is not a valid {name} (bad protobuf, or a string not in UTF-8)"
            )

    return parse


KSERVE = "inference.GRPCInferenceService"
ModelInferRequest = message("inference.ModelInferRequest")
ModelInferResponse = message("inference.ModelInferResponse")
ModelStreamInferResponse = message("inference.ModelStreamInferResponse")
ServerLiveRequest = message("inference.ServerLiveRequest")
ServerLiveResponse = message("inference.ServerLiveResponse")
ServerReadyRequest = message("inference.ServerReadyRequest")
ServerReadyResponse = message("inference.ServerReadyResponse")
ModelReadyRequest = message("inference.ModelReadyRequest")
ModelReadyResponse = message("inference.ModelReadyResponse")
ServerMetadataRequest = message("inference.ServerMetadataRequest")
ServerMetadataResponse = message("inference.ServerMetadataResponse")
ModelMetadataRequest = message("inference.ModelMetadataRequest")
ModelMetadataResponse = message("inference.ModelMetadataResponse")
ModelConfigRequest = message("inference.ModelConfigRequest")
ModelConfigResponse = message("inference.ModelConfigResponse")
ModelConfig = message("inference.ModelConfig")
ConfigDataType = _pool.FindEnumTypeByName("inference.DataType")
ModelStatisticsRequest = message("inference.ModelStatisticsRequest")
ModelStatisticsResponse = message("inference.ModelStatisticsResponse")
RepositoryIndexRequest = message("inference.RepositoryIndexRequest")
RepositoryIndexResponse = message("inference.RepositoryIndexResponse")
ShmStatusRequest = message("inference.SystemSharedMemoryStatusRequest")
ShmStatusResponse = message("inference.SystemSharedMemoryStatusResponse")
ShmRegisterRequest = message("inference.SystemSharedMemoryRegisterRequest")
ShmRegisterResponse = message("inference.SystemSharedMemoryRegisterResponse")
ShmUnregisterRequest = message("inference.SystemSharedMemoryUnregisterRequest")
ShmUnregisterResponse = message("inference.SystemSharedMemoryUnregisterResponse")

BATCH = "coalesce.batch.v1.BatchInference"
BatchRequest = message("coalesce.batch.v1.BatchRequest")
BatchResponse = message("coalesce.batch.v1.BatchResponse")
BatchMetadataRequest = message("coalesce.batch.v1.MetadataRequest")
BatchMetadataResponse = message("coalesce.batch.v1.MetadataResponse")

# TF Serving (protos/tensorflow*.proto); Classify, Regress and MultiInference are
# answered UNIMPLEMENTED without messages of their own.
TF_PREDICTION = "tensorflow.serving.PredictionService"
TF_MODEL = "tensorflow.serving.ModelService"
TensorProto = message("tensorflow.TensorProto")
DataType = _pool.FindEnumTypeByName("tensorflow.DataType")
PredictRequest = message("tensorflow.serving.PredictRequest")
PredictResponse = message("tensorflow.serving.PredictResponse")
GetModelMetadataRequest = message("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = message("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap = message("tensorflow.serving.SignatureDefMap")
GetModelStatusRequest = message("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = message("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = message("tensorflow.serving.ModelVersionStatus")
