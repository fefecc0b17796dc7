"""The HTTP routes of an Ingress replica: each reads its request, asks the Ingress, and says what it answers."""

import asyncio
from typing import Annotated

from fastapi import File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.background import BackgroundTask

import skin_ray
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
    ModelResponse,
    PredictionResponse,
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


async def _answer_image(ingress, request: Request, route: str, upload: UploadFile, work, served=None):
    """One uploaded image through `route`: answered by `served`, else by the version the request asks for, with
    `work(served, data)`'s record (and image statistics); counted, audited, refusals too, and watched for drift.
    Returns the version, the bytes and the record."""
    with ingress.exchange(request, route) as exchange:
        exchange.served = served or _answering(ingress.versions, request)
        exchange.data = await _image_bytes(upload)
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

    if ingress.guard.keys is not None:
        document_keys(app, rate_limited=ingress.guard.rate_limit is not None)
    return app
