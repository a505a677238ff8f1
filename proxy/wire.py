"""Protobuf message classes for the protocols Coalesce serves, from protos/.

The messages live in a private descriptor pool: tritonclient registers its own
copy of the `inference.*` messages in protobuf's default pool, and two
definitions of one symbol in one pool is an error. The wire format is the same.
"""

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_pool = descriptor_pool.DescriptorPool()
_files = descriptor_pb2.FileDescriptorSet.FromString(
    resources.files(__package__).joinpath("_protos.binpb").read_bytes()
)
for _file in _files.file:
    _pool.Add(_file)


def message(full_name: str) -> type:
    """The message class for a fully qualified protobuf name."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


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
