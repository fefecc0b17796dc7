"""The Open Inference Protocol's request parsing and answer encoding (skin_ray.serve.inference_protocol): no Ray.
The service's conformance with the real clients is in test_serve.py."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from skin_ray.serve.errors import Refusal
from skin_ray.serve.inference_protocol import (
    OUTPUT_TYPES,
    WITHHELD,
    encode_response,
    model_metadata,
    output_tensors,
    parse_request,
)
from skin_ray.serve.schemas import InferenceResponse, ModelMetadataResponse

CLASSES = ["Cancer", "Non_Cancer"]
FILES = [b"\xff\xd8first", b"\x89PNGsecond", b""]


def _binary_bytes(files: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(data)) + data for data in files)


def _with_binary(header: dict, binary: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + binary, str(len(text))


def test_images_arrive_as_binary_bytes_or_base64_json_and_parse_alike():
    binary = _binary_bytes(FILES)
    body, length = _with_binary({"id": "42", "inputs": [
        {"name": "image", "shape": [3, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(binary)}}
    ]}, binary)
    from_binary = parse_request(body, length, 96, most=16)
    as_json = json.dumps({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                      "data": [base64.b64encode(data).decode() for data in FILES]}]}).encode()
    from_json = parse_request(as_json, None, 96, most=16)
    assert from_binary.files == from_json.files == FILES
    assert from_binary.id == "42" and from_json.id is None
    assert from_binary.outputs == [(name, False) for name in OUTPUT_TYPES]


def test_pixels_arrive_at_the_bundles_input_size_as_binary_or_nested_json():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    body, length = _with_binary({"inputs": [{"name": "pixels", "shape": [2, 4, 4, 3], "datatype": "UINT8",
                                             "parameters": {"binary_data_size": pixels.nbytes}}]}, pixels.tobytes())
    np.testing.assert_array_equal(parse_request(body, length, 4, most=16).pixels, pixels)
    nested = json.dumps({"inputs": [{"name": "pixels", "shape": [2, 4, 4, 3], "datatype": "UINT8",
                                     "data": pixels.tolist()}]}).encode()
    np.testing.assert_array_equal(parse_request(nested, None, 4, most=16).pixels, pixels)
    with pytest.raises(Refusal, match=r"shape \[2, 5, 5, 3\]"):
        parse_request(nested, None, 5, most=16)


def _request(**changes) -> dict:
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"x").decode()]}
    return {"inputs": [{**tensor, **changes}]}


@pytest.mark.parametrize("body, length, status, reason", [
    (b"{not json", None, 400, "not an inference request"),
    (b"[]", None, 400, "not an inference request"),
    (json.dumps({"inputs": []}).encode(), None, 400, "inputs"),
    (json.dumps(_request(name="input0")).encode(), None, 400, "send one input"),
    (json.dumps(_request(shape=[1, 2])).encode(), None, 400, "shape"),
    (json.dumps(_request(shape=[-1])).encode(), None, 400, "not an inference request"),
    (json.dumps(_request(datatype="FP32")).encode(), None, 400, "BYTES"),
    (json.dumps(_request(data=["%%%"])).encode(), None, 400, "image 0: not base64"),
    (json.dumps(_request(data=[1])).encode(), None, 400, "base64 strings"),
    (json.dumps(_request(data=None)).encode(), None, 400, "needs `data`"),
    (json.dumps(_request(shape=[0], data=[])).encode(), None, 400, "0 images"),
    (json.dumps(_request(shape=[17], data=["eA=="] * 17)).encode(), None, 413, "17 images"),
    (json.dumps({**_request(), "outputs": [{"name": "logits"}]}).encode(), None, 400, "no output 'logits'"),
    (json.dumps(_request()).encode() + b"tail", None, 400, "not an inference request"),
    (json.dumps(_request()).encode() + b"tail", "3", 400, "not an inference request"),
    (json.dumps(_request()).encode() + b"tail", "x", 400, "Inference-Header-Content-Length"),
    (json.dumps(_request()).encode(), "99999", 400, "Inference-Header-Content-Length"),
])
def test_malformed_requests_are_refused_with_a_reason(body, length, status, reason):
    with pytest.raises(Refusal, match=reason) as refused:
        parse_request(body, length, 96, most=16)
    assert refused.value.status == status


@pytest.mark.parametrize("binary, declared, reason", [
    (_binary_bytes([b"abc"])[:-1], None, "fewer follow"),
    (_binary_bytes([b"abc"])[:2], None, "inside an element's length"),
    (_binary_bytes([b"a", b"b"]), None, "holds 2"),
    (_binary_bytes([b"abc"]), 3, "does not match"),
    (_binary_bytes([b"abc"]), True, "does not match"),
])
def test_binary_data_must_add_up(binary, declared, reason):
    size = len(binary) if declared is None else declared
    body, length = _with_binary({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                             "parameters": {"binary_data_size": size}}]}, binary)
    with pytest.raises(Refusal, match=reason):
        parse_request(body, length, 96, most=16)
    trailing, length = _with_binary(_request(), b"extra")
    with pytest.raises(Refusal, match="no input declares binary_data_size"):
        parse_request(trailing, length, 96, most=16)


RECORDS = [
    {"label": "Cancer", "cancer_probability": 0.8, "probabilities": {"Cancer": 0.8, "Non_Cancer": 0.2},
     "in_distribution": True, "ood_score": 40.0, "uncertain": False},
    {"label": None, "cancer_probability": None, "probabilities": None, "in_distribution": False, "ood_score": 600.0,
     "uncertain": None},
    {"label": "Non_Cancer", "cancer_probability": 0.3, "probabilities": {"Cancer": 0.3, "Non_Cancer": 0.7},
     "in_distribution": None, "ood_score": None, "uncertain": True},
]


def test_a_withheld_answer_has_no_null_in_its_tensors():
    tensors = output_tensors(RECORDS, CLASSES)
    assert tensors["label"].tolist() == ["Cancer", "", "Non_Cancer"]
    np.testing.assert_allclose(tensors["probabilities"], [[0.8, 0.2], [WITHHELD, WITHHELD], [0.3, 0.7]])
    np.testing.assert_allclose(tensors["cancer_probability"], [0.8, WITHHELD, 0.3])
    assert tensors["in_distribution"].tolist() == [True, False, True]  # no gate: not refused
    np.testing.assert_allclose(tensors["ood_score"], [40.0, 600.0, WITHHELD])
    assert tensors["uncertain"].tolist() == [False, False, True]


def _decode_binary(body: bytes, length: int, outputs: list[dict]) -> dict[str, list]:
    """The outputs of a binary answer, read as a client reads them."""
    values, offset = {}, length
    for output in outputs:
        size = output["parameters"]["binary_data_size"]
        chunk, offset = body[offset: offset + size], offset + size
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, at)
                items.append(chunk[at + 4: at + 4 + n].decode())
                at += 4 + n
            values[output["name"]] = items
        else:
            dtype = {"FP32": "<f4", "BOOL": "?"}[output["datatype"]]
            values[output["name"]] = np.frombuffer(chunk, dtype=dtype).tolist()
    assert offset == len(body)
    return values


def test_answers_are_json_or_binary_per_output_and_valid_responses():
    asked = {"id": "7", "parameters": {"binary_data_output": True},
             "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": ["eA=="] * 3}],
             "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": False}},
                         {"name": "in_distribution"}]}
    inference = parse_request(json.dumps(asked).encode(), None, 96, most=16)
    body, headers = encode_response(inference, RECORDS, CLASSES, "v1")
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:length])
    InferenceResponse.model_validate(answer)
    assert answer["id"] == "7" and answer["model_name"] == "skin-ray" and answer["model_version"] == "v1"
    assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities", "in_distribution"]
    probabilities = answer["outputs"][1]
    assert probabilities["shape"] == [3, 2] and probabilities["data"] == pytest.approx([0.8, 0.2, -1, -1, 0.3, 0.7])
    binary = _decode_binary(body, length, [o for o in answer["outputs"] if "parameters" in o])
    assert binary == {"label": ["Cancer", "", "Non_Cancer"], "in_distribution": [True, False, True]}
    plain, headers = encode_response(parse_request(json.dumps(_request()).encode(), None, 96, 16), RECORDS[:1], CLASSES, "v1")
    assert headers == {"Content-Type": "application/json"}
    InferenceResponse.model_validate_json(plain)


def test_model_metadata_names_every_input_and_output():
    metadata = ModelMetadataResponse.model_validate(model_metadata(["stable", "canary"], 170, CLASSES))
    assert [tensor.name for tensor in metadata.outputs] == list(OUTPUT_TYPES)
    assert metadata.inputs[1].shape == [-1, 170, 170, 3] and metadata.versions == ["stable", "canary"]
    assert "Cancer,Non_Cancer" == metadata.parameters["class_names"]
