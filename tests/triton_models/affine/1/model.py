"""Test model: y = 2*x + 1 and s = row sum of x; a request with a NaN gets an error.

One file serves ``affine``, ``affine_nobatch`` and ``slow_affine`` (symlinks): the math
works on any ``[..., 4]`` shape, and the config parameter ``sleep_s`` adds a delay per
execute() for deadline and shutdown tests. It runs inside Triton's python-backend stub.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The stub's numpy glue is numpy-1 only: under numpy 2 every input reads as zeros.
        if not np.__version__.startswith("1."):
            raise RuntimeError(f"needs numpy 1 in the stub's interpreter, found {np.__version__}")
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.sleep_s = float(parameters.get("sleep_s", {}).get("string_value", "0"))

    def execute(self, requests):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
        if np.isnan(x).any():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("x contains NaN"))
        y = pb_utils.Tensor("y", (2 * x + 1).astype(np.float32))
        s = pb_utils.Tensor("s", x.sum(axis=-1, keepdims=True).astype(np.float32))
        return pb_utils.InferenceResponse(output_tensors=[y, s])
