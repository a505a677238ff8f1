"""TensorFlow Serving's PredictionService and ModelService over gRPC (`grpc`) and its
REST API (`rest`), on Coalesce's own copies of the messages (no TensorFlow needed)."""
