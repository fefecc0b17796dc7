"""The HTTP routes of an Ingress replica: each reads its request, asks the Ingress, and says what it answers."""

import asyncio
from typing import Annotated

import numpy as np
from fastapi import File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.background import BackgroundTask

import skin_ray
from skin_ray.serve import inference_protocol as protocol
from skin_ray.serve.errors import HANDLERS, Refusal, error
from skin_ray.serve.schemas import (
    IMAGE_FILE_SCHEMA,
    ONE_IMAGE_ERRORS,
    SHUTTING_DOWN,
    UPLOAD_ERRORS,
    BatchResponse,
    ExplainResponse,
    HealthResponse,
    ImageFile,
    InferenceResponse,
    LiveResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ModelResponse,
    PredictionResponse,
    ProtocolErrorResponse,
    ReadyResponse,
    ServerMetadataResponse,
    StatsResponse,
    document_keys,
    error_responses,
    file_parts,
)
from skin_ray.serve.versions import ServedModel, Versions

VERSION_HEADER = "X-Model-Version"  # asked for by a caller (pinning), and named in every answer from a version
VERSIONS = (
    f" The version answering is the one named by the request's `{VERSION_HEADER}` header, else one drawn by the "
    "traffic shares, the same for a caller each time (its API key, else its `X-Client-ID` header); the answer's "
    f"`{VERSION_HEADER}` header names it."
)
UNKNOWN_VERSION = {404: f"{VERSION_HEADER} names no version of this service"}


def _answering(versions: Versions, request: Request) -> ServedModel:
    caller = request.scope.get("state", {}).get("caller") or request.headers.get("x-client-id")
    return versions.answering(request.headers.get(VERSION_HEADER.lower()), caller)


async def _image_bytes(upload: UploadFile) -> bytes:
    """The upload's bytes; 415 when it declares a type that is not an image (none, or octet-stream, is taken)."""
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/") and declared != "application/octet-stream":
        raise Refusal(415, f"{upload.filename or 'the file'} is declared as {declared!r}, not an image type")
    return await upload.read()


async def _answer_image(ingress, request: Request, route: str, upload: UploadFile | bytes, work, served=None):
    """One uploaded image (a file part, or bytes already read) through `route`: answered by `served`, else by the
    version the request asks for, with
    `work(served, data)`'s record (and image statistics); counted, audited, refusals too, and watched for drift.
    Returns the version, the bytes and the record."""
    with ingress.exchange(request, route) as exchange:
        exchange.served = served or _answering(ingress.versions, request)
        exchange.data = upload if isinstance(upload, bytes) else await _image_bytes(upload)
        record, image = await work(exchange.served, exchange.data)
        exchange.answered(record, image)
    return exchange.served, exchange.data, record


def http_app(ingress) -> FastAPIOffline:
    """`ingress`'s HTTP app behind its RequestGuard. Built per replica, so no replica changes an app others share;
    /docs and /redoc serve their scripts from the package (fastapi-offline), so they work offline."""
    app = FastAPIOffline(
        title="skin-ray",
        version=skin_ray.__version__,
        description="Classifies skin-lesion images as Cancer or Non_Cancer. Not a medical diagnosis.",
        exception_handlers=HANDLERS,
    )
    app.add_middleware(ingress.guard.middleware)

    @app.post(
        "/predict",
        summary="Classify one image (multipart field `file`)",
        description="A copy may also go to the shadow versions, after the answer; their answers are only counted."
        + VERSIONS,
        response_model=PredictionResponse,
        responses=error_responses({**ONE_IMAGE_ERRORS, **UNKNOWN_VERSION}),
        openapi_extra=file_parts("file"),
    )
    async def predict(request: Request, file: ImageFile) -> JSONResponse:
        served, data, record = await _answer_image(ingress, request, "/predict", file, ingress.classify)
        shadows = ingress.versions.shadowing()
        return JSONResponse(
            record, headers={VERSION_HEADER: served.name},
            background=BackgroundTask(ingress.shadow, data, record, shadows) if shadows else None,
        )

    @app.post(
        "/explain",
        summary="Classify one image and show which parts of it moved the prediction (Grad-CAM; multipart field `file`)",
        description=VERSIONS.strip(),
        response_model=ExplainResponse,
        responses=error_responses({
            **ONE_IMAGE_ERRORS, **UNKNOWN_VERSION,
            503: "max_concurrent_explanations are in progress, the model restarting, or the service shutting down; "
            "retry shortly (Retry-After)",
        }),
        openapi_extra=file_parts("file"),
    )
    async def explain(request: Request, file: ImageFile) -> JSONResponse:
        served, _, record = await _answer_image(ingress, request, "/explain", file, ingress.explain)
        return JSONResponse(record, headers={VERSION_HEADER: served.name})

    most = ingress.args.max_batch_files
    files = Annotated[  # the schema names this replica's limit
        list[UploadFile],
        File(description=f"1 to {most} image files (JPEG, PNG, WebP, BMP, GIF or TIFF), each a file part",
             json_schema_extra={"minItems": 1, "maxItems": most, "items": IMAGE_FILE_SCHEMA}),
    ]

    @app.post(
        "/predict/batch",
        summary="Classify several images (multipart field `files`, repeated)",
        description="Every file of a request is answered by one version." + VERSIONS,
        response_model=BatchResponse,
        # No `encoding` here: Schemathesis then sends one file part where the array allows several, and without
        # the filename that makes a part a file. A bad file is an entry of the answer, not a refusal, anyway.
        responses=error_responses({
            **UPLOAD_ERRORS, **UNKNOWN_VERSION, 413: "body larger than max_upload_mb, or more files than max_batch_files",
            503: "overloaded (more images waiting than max_pending_images), or the service is shutting down; retry "
            "shortly (Retry-After)",
        }),
    )
    async def predict_batch(request: Request, files: files) -> JSONResponse:
        with ingress.exchange(request, "/predict/batch"):  # a request refused whole is on the record too
            if len(files) > most:
                raise Refusal(413, f"{len(files)} files; at most {most} per request")
            served = _answering(ingress.versions, request)

        async def entry(upload: UploadFile) -> dict:
            try:
                _, _, record = await _answer_image(ingress, request, "/predict/batch", upload, ingress.classify, served)
            except Refusal as refusal:
                return {"filename": upload.filename, "error": refusal.detail}
            return {"filename": upload.filename, **record}

        results = await asyncio.gather(*(entry(upload) for upload in files))
        return JSONResponse({"results": results}, headers={VERSION_HEADER: served.name})

    @app.get(
        "/healthz",
        summary="200 once every version's model is loaded and answered a warm-up prediction",
        response_model=HealthResponse,
        responses=error_responses({503: "a model is not ready, or the service is shutting down"}),
    )
    async def healthz() -> dict:
        return {"status": "ok", "model_version": await ingress.health()}

    @app.get(
        "/model",
        summary="The primary version's bundle metadata, and every version with its share of traffic",
        response_model=ModelResponse,
        responses=error_responses({503: SHUTTING_DOWN}),
    )
    async def model() -> dict:
        return await ingress.describe()

    @app.get(
        "/stats", summary="Batch sizes this Ingress replica has formed", response_model=StatsResponse,
        responses=error_responses({503: SHUTTING_DOWN}),
    )
    async def stats() -> dict:
        return ingress.stats()

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus metrics of this replica's node: ours (ray_skin_ray_*), Serve's (ray_serve_*) and Ray's",
        responses=error_responses({503: "Ray's metrics exporter on this node did not answer, or the service is shutting down"}),
    )
    async def metrics() -> Response:
        from skin_ray.serve.telemetry import read_node_metrics

        try:
            text = await asyncio.get_running_loop().run_in_executor(None, read_node_metrics, ingress.metrics_url)
        except OSError as exc:
            return error(503, f"metrics exporter unavailable: {exc}")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(ingress.page_html)

    add_protocol_routes(app, ingress)
    if ingress.guard.keys is not None:
        document_keys(app, rate_limited=ingress.guard.rate_limit is not None)
    return app


def _protocol_errors(described: dict[int, str]) -> dict:
    return {status: {"model": ProtocolErrorResponse, "description": text} for status, text in sorted(described.items())}


def add_protocol_routes(app: FastAPIOffline, ingress) -> None:
    """The Open Inference Protocol's REST routes (skin_ray.serve.inference_protocol) on the same versions,
    batchers, limits, keys and audit trail as /predict. Without /versions/NAME a request follows the traffic rule,
    with it the version is pinned."""
    tags = ["Open Inference Protocol"]
    # 422 is FastAPI's for a path or query parameter it cannot read: documented because it says so for any route
    # with parameters, never sent by these (their parameters are text).
    unknown = {404: "no such model, or no such version", 422: "a parameter that cannot be read"}
    model_paths = (protocol.MODEL_PATH.replace(protocol.MODEL_NAME, "{model}"),
                   protocol.MODEL_PATH.replace(protocol.MODEL_NAME, "{model}") + "/versions/{version}")

    def chosen(request: Request, model: str, version: str | None) -> ServedModel:
        if model != protocol.MODEL_NAME:
            raise Refusal(404, f"no model {model!r}; this server has {protocol.MODEL_NAME!r}")
        versions = ingress.versions
        if version is None:
            return _answering(versions, request)
        return versions.answering(version, None)

    @app.get("/v2", tags=tags, summary="Server metadata", response_model=ServerMetadataResponse,
             responses=_protocol_errors({503: SHUTTING_DOWN}))
    async def server_metadata() -> dict:
        return {"name": protocol.MODEL_NAME, "version": skin_ray.__version__, "extensions": protocol.EXTENSIONS}

    @app.get("/v2/health/live", tags=tags, summary="200 while the service answers", response_model=LiveResponse,
             responses=_protocol_errors({503: SHUTTING_DOWN}))
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=tags, summary="200 once every version's model answers", response_model=ReadyResponse,
             responses=_protocol_errors({503: "a model is not ready, or the service is shutting down"}))
    async def ready() -> dict:
        await ingress.health()
        return {"ready": True}

    for path in model_paths:
        @app.get(path, tags=tags, summary="Model metadata: inputs, outputs, versions", response_model=ModelMetadataResponse,
                 responses=_protocol_errors({**unknown, 503: SHUTTING_DOWN}))
        async def model_metadata(request: Request, model: str, version: str | None = None) -> dict:
            served = chosen(request, model, version)
            return protocol.model_metadata(list(ingress.versions.models), served.image_size, served.class_names)

        @app.get(path + "/ready", tags=tags, summary="200 once the model answers", response_model=ModelReadyResponse,
                 responses=_protocol_errors({**unknown, 503: "the model is not ready, or the service is shutting down"}))
        async def model_ready(request: Request, model: str, version: str | None = None) -> dict:
            served = chosen(request, model, version)
            try:
                await served.backend.metadata()
            except Exception as exc:  # a model replica starting, restarting or gone
                raise Refusal(503, f"model not ready: {type(exc).__name__}") from None
            return {"name": protocol.MODEL_NAME, "ready": True}

        @app.post(
            path + "/infer", tags=tags, summary="Classify images: input `image` (BYTES) or `pixels` (UINT8)",
            description="JSON, or JSON and binary tensors (Inference-Header-Content-Length). One undecodable image "
            "fails the request with 400 naming its index: the protocol has no per-image error (/predict/batch has).",
            response_model=InferenceResponse,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "description": "an inference request: inputs (one), "
                                                 "outputs (optional), id (optional)"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                        "description": "the JSON request, then its binary tensors"}},
            }}},
            responses=_protocol_errors({**unknown, 400: "not a valid inference request, or an image that cannot be decoded",
                                        413: "body larger than max_upload_mb, or more images than max_batch_files",
                                        503: "overloaded, or the service is shutting down; retry shortly (Retry-After)"}),
        )
        async def infer(request: Request, model: str, version: str | None = None) -> Response:
            route = protocol.INFER_PATH
            with ingress.exchange(request, route):  # a request refused whole is on the record too
                served = chosen(request, model, version)
                inference = protocol.parse_request(
                    await request.body(), request.headers.get(protocol.HEADER_LENGTH), served.image_size,
                    ingress.args.max_batch_files,
                )
            if inference.files is not None:
                images, work = inference.files, ingress.classify
            else:
                images = [pixels.tobytes() for pixels in inference.pixels]
                shape = inference.pixels.shape[1:]

                async def work(served: ServedModel, data: bytes):
                    return await ingress.classify_pixels(served, np.frombuffer(data, np.uint8).reshape(shape))

            answers = await asyncio.gather(
                *(_answer_image(ingress, request, route, data, work, served) for data in images), return_exceptions=True
            )
            for index, answer in enumerate(answers):
                if isinstance(answer, Refusal):
                    raise Refusal(answer.status, f"image {index}: {answer.detail}")
                if isinstance(answer, BaseException):
                    raise answer
            records = [record for _, _, record in answers]
            body, headers = protocol.encode_response(inference, records, served.class_names, records[0]["model_version"])
            return Response(body, headers={**headers, VERSION_HEADER: served.name})
