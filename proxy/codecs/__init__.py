"""Wire formats of the serving protocols, as pure conversions (no I/O, no servers).

`wire` loads our .proto messages into a private descriptor pool, `protowire` writes
protobuf fields by hand on hot paths, `kserve` and `tf_tensors` turn KServe v2 and
TensorFlow messages into core tensors and back, `json_tensors` does the same for the
REST bodies. Front ends, adapters and (later) broker pipelines share them.

May import: `coalesce.core`, `coalesce.config`, `coalesce.errors`.
"""
