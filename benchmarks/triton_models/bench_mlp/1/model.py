"""Benchmark model: the MLP of benchmarks/bench_model.py plus 1 ms per execute().

The sleep stands for a fixed per-call cost (kernel launch, framework overhead) that
batching amortises. ``forward`` is imported from benchmarks/bench_model.py by path:
the python-backend stub ignores PYTHONPATH, so sys.path is extended here instead.
"""

import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # .../benchmarks
from bench_model import forward


class TritonPythonModel:
    def initialize(self, args):
        # The stub's numpy glue is numpy-1 only: under numpy 2 every input reads as zeros.
        if not np.__version__.startswith("1."):
            raise RuntimeError(f"needs numpy 1 in the stub's interpreter, found {np.__version__}")
        forward(np.zeros((1, 64), dtype=np.float32))  # build the weights before serving

    def execute(self, requests):
        time.sleep(0.001)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = pb_utils.Tensor("y", forward(x))
            responses.append(pb_utils.InferenceResponse(output_tensors=[y]))
        return responses
