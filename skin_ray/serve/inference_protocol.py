"""The Open Inference Protocol (KServe v2 REST) for skin-ray's one model: what an inference request holds and how
its answer is written, JSON or with Triton's binary tensor data extension (the JSON object, then each binary
tensor in order; `Inference-Header-Content-Length` gives the JSON's length). No Ray, no TensorFlow: the routes
(skin_ray.serve.routes) call it, the fast tests hold it to the specification's shapes.

Inputs, one per request: `image` (BYTES, [N] or [N, 1]: encoded image files; binary, or base64 strings in JSON)
or `pixels` (UINT8, [N, S, S, 3] at the bundle's input size). Outputs, each [N] unless said: `cancer_probability`
(FP32), `probabilities` (FP32, [N, classes] in `class_names` order), `label` (BYTES), `in_distribution` (BOOL),
`ood_score` (FP32), `uncertain` (BOOL). A tensor has no null: an image the input gate refuses has label "" and
WITHHELD in both probabilities; a bundle without a gate answers in_distribution true and ood_score WITHHELD.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from skin_ray.serve.errors import Refusal
from skin_ray.serve.schemas import InferenceRequest

MODEL_NAME = "skin-ray"
MODEL_PATH = f"/v2/models/{MODEL_NAME}"
INFER_PATH = f"{MODEL_PATH}/infer"
PLATFORM = "tensorflow_keras"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT, PIXEL_INPUT = "image", "pixels"
WITHHELD = -1.0
OUTPUT_TYPES = {
    "cancer_probability": "FP32", "probabilities": "FP32", "label": "BYTES", "in_distribution": "BOOL",
    "ood_score": "FP32", "uncertain": "BOOL",
}


@dataclass(frozen=True)
class Inference:
    """What a request asks: its `id`, its images (encoded `files`, or decoded `pixels`), and the outputs to answer
    with, each (name, as binary data)."""

    id: str | None
    files: list[bytes] | None
    pixels: np.ndarray | None
    outputs: list[tuple[str, bool]]

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.pixels)


def parse_request(body: bytes, header_length: str | None, image_size: int, most: int) -> Inference:
    """The inference a request body asks for; Refusal 400 (413 beyond `most` images) saying what is wrong."""
    json_end = _json_length(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(body[:json_end])
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"]))
        raise Refusal(400, f"not an inference request: {where + ': ' if where else ''}{problem['msg']}") from None
    if len(request.inputs) != 1 or request.inputs[0].name not in (IMAGE_INPUT, PIXEL_INPUT):
        names = ", ".join(repr(tensor.name) for tensor in request.inputs)
        raise Refusal(400, f"send one input, {IMAGE_INPUT!r} (BYTES) or {PIXEL_INPUT!r} (UINT8); got {names}")
    tensor = request.inputs[0]
    binary = _binary_parts(body, json_end, request)
    count = tensor.shape[0] if tensor.shape else 0
    if not 1 <= count <= most:
        raise Refusal(413 if count > most else 400, f"{count} images; send 1 to {most} per request")
    if tensor.name == IMAGE_INPUT:
        files, pixels = _files(tensor, binary, count), None
    else:
        files, pixels = None, _pixels(tensor, binary, count, image_size)
    return Inference(request.id, files, pixels, _outputs(request))


def _json_length(body: bytes, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise Refusal(400, f"{HEADER_LENGTH} must be the JSON's length, 1 to {len(body)} bytes; got {header_length!r}")
    return length


def _binary_parts(body: bytes, json_end: int, request: InferenceRequest) -> bytes | None:
    """The input's binary data, when it comes so; every byte after the JSON must belong to it."""
    (tensor,) = request.inputs
    size = (tensor.parameters or {}).get("binary_data_size")
    rest = len(body) - json_end
    if size is None:
        if rest:
            raise Refusal(400, f"{rest} bytes follow the JSON but no input declares binary_data_size")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size != rest:
        raise Refusal(400, f"binary_data_size {size!r} does not match the {rest} bytes after the JSON")
    if tensor.data is not None:
        raise Refusal(400, f"input {tensor.name!r} has both data and binary_data_size")
    return body[json_end:]


def _files(tensor, binary: bytes | None, count: int) -> list[bytes]:
    if tensor.datatype != "BYTES" or tensor.shape not in ([count], [count, 1]):
        raise Refusal(400, f"{IMAGE_INPUT!r} is BYTES of shape [N] or [N, 1]; got {tensor.datatype} {tensor.shape}")
    if binary is None:
        values = _flat(tensor.data)
        if len(values) != count or not all(isinstance(value, str) for value in values):
            raise Refusal(400, f"{IMAGE_INPUT!r} in JSON holds {count} base64 strings, one per image")
        files = []
        for index, value in enumerate(values):
            try:
                files.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise Refusal(400, f"image {index}: not base64 (JSON carries image bytes as base64)") from None
        return files
    files, offset = [], 0
    while offset < len(binary):  # each element: its length (uint32, little-endian), then its bytes
        if offset + 4 > len(binary):
            raise Refusal(400, f"{IMAGE_INPUT!r}: binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", binary, offset)
        if offset + 4 + length > len(binary):
            raise Refusal(400, f"image {len(files)}: its length says {length} bytes, fewer follow")
        files.append(binary[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if len(files) != count:
        raise Refusal(400, f"{IMAGE_INPUT!r}: shape says {count} images, the binary data holds {len(files)}")
    return files


def _pixels(tensor, binary: bytes | None, count: int, size: int) -> np.ndarray:
    shape = [count, size, size, 3]
    if tensor.datatype != "UINT8" or tensor.shape != shape:
        raise Refusal(400, f"{PIXEL_INPUT!r} is UINT8 of shape {shape} (this model's input size); "
                           f"got {tensor.datatype} {tensor.shape}")
    if binary is not None:
        if len(binary) != np.prod(shape):
            raise Refusal(400, f"{PIXEL_INPUT!r}: {len(binary)} bytes of binary data for {np.prod(shape)} pixels")
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    values = _flat(tensor.data)
    if len(values) != np.prod(shape) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                               for v in values):
        raise Refusal(400, f"{PIXEL_INPUT!r} in JSON holds {np.prod(shape)} integers from 0 to 255")
    return np.array(values, dtype=np.uint8).reshape(shape)


def _flat(data) -> list:
    """A tensor's JSON data, flat or nested, as one row-major list."""
    if data is None:
        raise Refusal(400, "an input without binary_data_size needs `data`")
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    everything_binary = (request.parameters or {}).get("binary_data_output") is True
    if request.outputs is None:
        return [(name, everything_binary) for name in OUTPUT_TYPES]
    unknown = [output.name for output in request.outputs if output.name not in OUTPUT_TYPES]
    if unknown:
        raise Refusal(400, f"no output {', '.join(map(repr, unknown))}; this model has {', '.join(OUTPUT_TYPES)}")
    return [(output.name, (output.parameters or {}).get("binary_data", everything_binary) is True)
            for output in request.outputs]


def output_tensors(records: list[dict], class_names: list[str]) -> dict[str, np.ndarray]:
    """The records of one request as the protocol's output tensors (`WITHHELD` and "" where a record has null)."""
    def number(value) -> float:
        return WITHHELD if value is None else value

    return {
        "cancer_probability": np.array([number(r["cancer_probability"]) for r in records], dtype=np.float32),
        "probabilities": np.array([[number((r["probabilities"] or {}).get(name)) for name in class_names] for r in records],
                                  dtype=np.float32).reshape(len(records), len(class_names)),
        "label": np.array([r["label"] or "" for r in records], dtype=object),
        "in_distribution": np.array([r["in_distribution"] is not False for r in records], dtype=bool),
        "ood_score": np.array([number(r["ood_score"]) for r in records], dtype=np.float32),
        "uncertain": np.array([bool(r["uncertain"]) for r in records], dtype=bool),
    }


def encode_response(inference: Inference, records: list[dict], class_names: list[str], model_version: str
                    ) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON and binary tensors when an output is asked for as binary."""
    tensors = output_tensors(records, class_names)
    outputs, binary = [], []
    for name, as_binary in inference.outputs:
        values = tensors[name]
        output = {"name": name, "shape": list(values.shape), "datatype": OUTPUT_TYPES[name]}
        if as_binary:
            data = _binary_tensor(values)
            output["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            output["data"] = values.reshape(-1).tolist()
        outputs.append(output)
    answer = {"model_name": MODEL_NAME, "model_version": model_version, "outputs": outputs}
    if inference.id is not None:
        answer["id"] = inference.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(binary), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _binary_tensor(values: np.ndarray) -> bytes:
    if values.dtype == object:  # BYTES: each element's length (uint32, little-endian), then its bytes
        return b"".join(struct.pack("<I", len(text.encode())) + text.encode() for text in values.reshape(-1))
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def model_metadata(versions: list[str], image_size: int, class_names: list[str]) -> dict:
    """GET /v2/models/skin-ray: the inputs and outputs above, the versions one may ask for by name."""
    return {
        "name": MODEL_NAME,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXEL_INPUT, "datatype": "UINT8", "shape": [-1, image_size, image_size, 3]},
        ],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": [-1, len(class_names)] if name == "probabilities" else [-1]}
            for name, datatype in OUTPUT_TYPES.items()
        ],
        "parameters": {
            "class_names": ",".join(class_names),
            "withheld": f"an image the input gate refuses: label '' and {WITHHELD:g} in cancer_probability and "
            f"probabilities; without a gate, in_distribution true and ood_score {WITHHELD:g}",
            "inputs": f"one of {IMAGE_INPUT} (encoded files; base64 strings in JSON) or {PIXEL_INPUT}",
        },
    }
