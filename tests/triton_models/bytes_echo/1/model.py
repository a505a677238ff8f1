"""Test model for TYPE_STRING tensors: each bytes value comes back reversed."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The stub's numpy glue is numpy-1 only: under numpy 2 outputs come back empty.
        if not np.__version__.startswith("1."):
            raise RuntimeError(f"needs numpy 1 in the stub's interpreter, found {np.__version__}")

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            reversed_ = [bytes(value)[::-1] for value in text.flat]
            out = pb_utils.Tensor("out", np.array(reversed_, dtype=np.object_).reshape(text.shape))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
