"""The Open Inference Protocol (KServe v2) as Triton serves it: gRPC unary calls
(`grpc`), the bidirectional ModelStreamInfer stream (`stream`), both on what `calls`
decodes and routes, and the REST/JSON API (`rest`)."""
