"""Test model for sequences: `total` is the running sum of `x` per correlation id.

Answers depend on every earlier request of the sequence, in order: a request merged
with another sequence's rows, or sent out of order, gives a wrong total.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.totals = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            sequence = request.correlation_id()
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy()
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            before = 0.0 if start.reshape(-1)[0] else self.totals.get(sequence, 0.0)
            total = before + float(x.sum())
            self.totals[sequence] = total
            out = np.full(x.shape, total, dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("total", out)]))
        return responses
