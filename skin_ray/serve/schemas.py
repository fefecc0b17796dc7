"""What the service answers, as pydantic models and OpenAPI fragments: the document at /openapi.json says each
route's statuses and bodies, and the Schemathesis test holds the service to it."""

from typing import Annotated, Literal

from fastapi import File, UploadFile
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from skin_ray.serve.guard import OPEN_ROUTES


class PredictionResponse(BaseModel):
    """The prediction record, the same in every path (skin_ray.record.RECORD_FIELDS)."""

    label: str | None = Field(
        description="Cancer or Non_Cancer, decided by the bundle's threshold (not the larger probability); null "
        "when the input gate refused the image"
    )
    cancer_probability: float | None = Field(description="calibrated probability of Cancer; null when refused")
    probabilities: dict[str, float] | None = Field(description="every class's probability; null when refused")
    threshold: float = Field(description="Cancer probability at or above which the label is Cancer")
    in_distribution: bool | None = Field(
        description="false: not like the dermoscopic images the model was trained on, so no label; null: the "
        "bundle has no input gate"
    )
    ood_score: float | None = Field(
        description="the input gate's score (log-odds that the image is not dermoscopy); refused above the bundle's threshold"
    )
    uncertain: bool | None = Field(
        description="true: close to the threshold or the ensemble's members disagree; a specialist should look"
    )
    member_probabilities: list[float] | None = Field(
        description="each ensemble member's Cancer probability; null for one network"
    )
    error: str | None = Field(description="why there is no label (out_of_distribution), else null")
    error_reason: str | None = Field(description="`out_of_distribution` or null")
    model_version: str


class Explanation(BaseModel):
    label: str = Field(description="the label the map explains")
    map: list[list[float]] = Field(description="the Grad-CAM map over the model's input (the photo's centre square), rows first")
    crop_box: list[int] = Field(description="left, top, right, bottom of that square in the photo's pixels")
    overlay_png: str = Field(description="the photo with the map laid over that square, PNG, base64")


class ExplainResponse(PredictionResponse):
    explanation: Explanation | None = Field(description="null when the input gate refused the image")


class FilePrediction(PredictionResponse):
    filename: str | None


class FileError(BaseModel):
    filename: str | None
    error: str = Field(description="why this file was not classified; the other files were")


class BatchResponse(BaseModel):
    results: list[FilePrediction | FileError] = Field(description="one per uploaded file, in order")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model_version: str


class VersionShare(BaseModel):
    primary: bool
    traffic_percent: float = Field(description="share of requests this version answers")
    shadow_percent: float = Field(description="share of /predict requests this version is sent a copy of, never answering")
    model_version: str
    input_size: list[int]
    threshold: float


class ModelResponse(BaseModel, extra="allow"):
    """The primary version's bundle.json, less its storage paths, and every version with its share of traffic."""

    model_version: str
    class_names: list[str]
    input_size: list[int]
    threshold: float
    runtime_in_use: str = Field(
        description="what runs the network: keras-float32 (the reference) or the bundle's validated runtime"
    )
    versions: dict[str, VersionShare]


class StatsResponse(BaseModel):
    batch_sizes: dict[str, int] = Field(description="how many batches of each size (images) this replica formed")
    batch_sizes_by_version: dict[str, dict[str, int]] = Field(description="the same for each version")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in a sentence")


# What each route can answer besides 200, with why. The RequestGuard answers any route 503 while the replica
# drains, and 408 or 413 for a body too slow or too large; FastAPI a 400 for a malformed multipart body.
SHUTTING_DOWN = "the service is shutting down; retry shortly (Retry-After)"
UPLOAD_ERRORS = {
    400: "malformed multipart body",
    408: "the body did not arrive within upload_timeout_s, or was cut for a faster upload",
    413: "request body larger than max_upload_mb",
    422: "no file part (with a filename) in the multipart field",
    503: SHUTTING_DOWN,
}
ONE_IMAGE_ERRORS = {
    **UPLOAD_ERRORS,
    400: "not a decodable image (the reason: empty, truncated, corrupt, not_an_image, too_many_pixels), or a "
    "malformed multipart body",
    415: "declared content type is not an image",
    503: "overloaded (more images waiting than max_pending_images), the model restarting, or the service shutting "
    "down; retry shortly (Retry-After)",
}
# `format: binary` besides 3.1's contentMediaType: what tools written for OpenAPI 3.0 recognise a file part by.
IMAGE_FILE_SCHEMA = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream", "minLength": 1}
ImageFile = Annotated[
    UploadFile, File(description="an image file (JPEG, PNG, WebP, BMP, GIF or TIFF)", json_schema_extra=IMAGE_FILE_SCHEMA)
]


def error_responses(described: dict[int, str]) -> dict:
    """FastAPI's `responses` for `described` statuses, every one answering ErrorResponse."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in sorted(described.items())}


def file_parts(field: str) -> dict:
    """`openapi_extra` saying what each part of multipart `field` is: a file part (it has a filename; a part
    without one is a text field, not a file) holding an image (an undeclared type is taken too)."""
    disposition = {
        "description": "a file part: names a filename", "required": True, "schema": {"type": "string"},
        "example": f'form-data; name="{field}"; filename="lesion.jpg"',
    }
    encoding = {"contentType": "image/*, application/octet-stream", "headers": {"Content-Disposition": disposition}}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": {field: encoding}}}}}


def document_keys(app: FastAPIOffline, rate_limited: bool) -> None:
    """Say in `app`'s OpenAPI document how a caller presents a key, and that a route without one answers 401
    (and 429 past the key's rate limit), so /docs offers to send a key and generated clients know."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key as a bearer token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            refusals = {"401": {"description": "no valid API key", **error}}
            if rate_limited:
                refusals["429"] = {"description": "the key is over its rate limit (Retry-After)", **error}
            for path, operations in schema["paths"].items():
                if path not in OPEN_ROUTES:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKey": []}]
                        operation["responses"].update(refusals)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi




# The Open Inference Protocol (KServe v2 REST), as its specification's text defines the shapes
# (kserve/open-inference-protocol, specification/protocol/inference_rest.md). A parameter is a string, number or
# boolean; a tensor's `data` is a JSON array, flat or nested, row-major.
Parameters = dict[str, str | int | float | bool]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = Field(None, description="skin-ray's: class order, what a withheld answer holds")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: Parameters | None = None
    data: list | None = None  # absent when the tensor comes as binary data (binary_data_size)


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list | None = None  # absent when the tensor follows the JSON as binary data


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ProtocolErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in a sentence")
