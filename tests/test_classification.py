"""Triton's classification extension (`class_count` on a requested output): the answer
Coalesce computes is byte for byte the one Triton computes itself, over gRPC and HTTP,
for a model behind Triton and for an in-process one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.conftest import local_backend

LABELS = Path(__file__).parent / "triton_models" / "affine_labeled" / "y_labels.txt"

# distinct values per row, and a tie (row 2) that must go to the lower index
X = np.array([[0.5, 3.0, -1.0, 2.0], [9.0, 1.0, 4.0, 4.5], [1.0, 1.0, 0.0, 1.0]], np.float32)


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    from tests.support.coalesce import Process, free_port

    process = Process(
        {
            "http": f"127.0.0.1:{free_port()}",
            "backends": {
                "local": local_backend("affine"),
                "triton": {"type": "triton", "target": triton.grpc_url, "model": "affine"},
                "local_labeled": {**local_backend("affine"), "labels": {"y": str(LABELS)}},
                "triton_labeled": {
                    "type": "triton",
                    "target": triton.grpc_url,
                    "model": "affine_labeled",
                    "labels": {"y": str(LABELS)},
                },
            },
            "routes": [
                {"model": "local", "backend": "local"},
                {"model": "affine", "backend": "triton"},
                {"model": "local_labeled", "backend": "local_labeled"},
                {"model": "affine_labeled", "backend": "triton_labeled"},
            ],
        },
        tmp_path_factory.mktemp("classification"),
    )
    yield process
    assert process.terminate() == 0


def classify(module, url: str, model: str, count: int) -> np.ndarray:
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        output = module.InferRequestedOutput("y", class_count=count)
        return client.infer(model, [tensor], outputs=[output]).as_numpy("y")
    finally:
        client.close()


@pytest.mark.parametrize("model", ["affine", "local"])
@pytest.mark.parametrize("count", [1, 3, 9])
def test_class_count_answers_as_triton_does(proxy, triton, model, count):
    expected = classify(tc, triton.grpc_url, "affine", count)  # Triton's own answer
    assert expected.shape == (3, min(count, 4)) and expected[0, 0] == b"7.000000:1"
    np.testing.assert_array_equal(classify(tc, proxy.url, model, count), expected)
    np.testing.assert_array_equal(classify(th, proxy.http, model, count), expected)


@pytest.mark.parametrize("model", ["affine_labeled", "local_labeled"])
@pytest.mark.parametrize("count", [2, 4])
def test_labels_are_added_as_triton_adds_its_label_file(proxy, triton, model, count):
    """`labels:` names each index as Triton's label_filename does (an empty line adds
    nothing): the answer is Triton's own for the same model and file."""
    expected = classify(tc, triton.grpc_url, "affine_labeled", count)
    assert expected[0, 0] == b"7.000000:1:one" and expected[1, 0] == b"19.000000:0:zero"
    if count == 4:
        assert b"9.000000:2" in expected[1].tolist(), "index 2 has an empty label: none added"
    np.testing.assert_array_equal(classify(tc, proxy.url, model, count), expected)
    np.testing.assert_array_equal(classify(th, proxy.http, model, count), expected)


@pytest.mark.parametrize("module", [tc, th], ids=["grpc", "http"])
def test_a_bad_class_count_is_invalid_naming_the_output(proxy, module):
    url = proxy.url if module is tc else proxy.http
    with pytest.raises(InferenceServerException, match="output 's': classification must be"):
        client = module.InferenceServerClient(url)
        try:
            tensor = module.InferInput("x", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X)
            output = module.InferRequestedOutput("s")
            if module is tc:
                output._output.parameters["classification"].int64_param = -2
            else:
                output._parameters["classification"] = -2
            client.infer("local", [tensor], outputs=[output])
        finally:
            client.close()
