"""Test model for integer tensors: b = a * 3, int32 in, int64 out."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The stub's numpy glue is numpy-1 only: under numpy 2 every input reads as zeros.
        if not np.__version__.startswith("1."):
            raise RuntimeError(f"needs numpy 1 in the stub's interpreter, found {np.__version__}")

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "a").as_numpy()
            b = a.astype(np.int64) * 3
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("b", b)]))
        return responses
