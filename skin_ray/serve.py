"""Online prediction: a Ray Serve application of two deployments composed with `.bind()`.

    Ingress (FastAPI)  --decoded arrays-->  SkinModel (@serve.batch)

The ingress validates uploads, enforces limits and decodes images with the one preprocessing function, so
decoding scales with ingress replicas (CPU nodes) and the model replica (a GPU node, on a cluster) only
batches arrays and runs the network. Run it with `skin-ray serve`, or with Ray's own CLI:
`serve run deployments/serve_config.yaml`.
"""

import asyncio
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from starlette.concurrency import run_in_threadpool

from skin_ray.config import ServeSettings
from skin_ray.preprocess import ImageDecodeError, preprocess_image

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page.html"
DEFAULTS = ServeSettings()


# Fractional CPUs: on a small machine a replica must not hold a whole CPU that training or a Ray Data job
# needs. max_ongoing_requests bounds a batch's size, so it must be at least max_batch_size.
@serve.deployment(max_ongoing_requests=64, max_queued_requests=256, ray_actor_options={"num_cpus": 0.5})
class SkinModel:
    """Holds one bundle and predicts batches of preprocessed arrays."""

    def __init__(self, model: str | None, max_batch_size: int, batch_wait_timeout_s: float):
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.batch_size_histogram = metrics.Histogram(
            "skin_ray_batch_size", description="images per model call", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.predictions = metrics.Counter(
            "skin_ray_predictions", description="predictions by label", tag_keys=("label",)
        )
        self._load(model)

    def _load(self, model: str | None) -> None:
        from skin_ray.predictor import Predictor
        from skin_ray.runtime import limit_tensorflow_threads

        limit_tensorflow_threads()
        predictor = Predictor.from_bundle(model)
        height, width, channels = predictor.metadata.input_size
        predictor.predict_arrays(np.zeros((1, height, width, channels), np.float32))  # trace before traffic
        self.predictor = predictor  # swapped in one assignment: requests never see a half-loaded model
        logger.info("serving model %s", predictor.model_version)

    def reconfigure(self, user_config: dict) -> None:
        """Swap the bundle or batching without downtime: `user_config: {model: s3://...}` in the YAML."""
        if "max_batch_size" in user_config:
            self.predict.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.predict.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if user_config.get("model") and user_config["model"] != self.predictor.bundle.uri:
            self._load(user_config["model"])

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        predictor = self.predictor
        # The forward pass runs off the event loop so requests keep arriving (and the next batch forms).
        probabilities = await asyncio.to_thread(predictor.predict_arrays, np.stack(images))
        self.batch_sizes[len(images)] += 1
        self.batch_size_histogram.observe(len(images))
        results = []
        for row in probabilities:
            prediction = predictor.to_prediction(row)
            self.predictions.inc(tags={"label": prediction.label})
            results.append(
                {
                    "label": prediction.label,
                    "cancer_probability": prediction.cancer_probability,
                    "probabilities": prediction.probabilities,
                    "threshold": predictor.metadata.threshold,
                    "model_version": predictor.model_version,
                }
            )
        return results

    def metadata(self) -> dict:
        return asdict(self.predictor.metadata)

    def stats(self) -> dict:
        """What this replica observed: how many batches of each size it ran."""
        return {"batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}


app = FastAPI(
    title="skin-ray",
    description="Classifies skin-lesion images as Cancer or Non_Cancer. Not a medical diagnosis.",
)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    missing = [".".join(map(str, error["loc"][1:])) for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": f"no file: send the image(s) as multipart field {missing}"})


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the limit, judged by Content-Length before anything is read and
    by counting as chunks arrive when the length is not declared, so an oversize upload is never buffered.

    On overflow it answers 413 itself and tells the app the client left, dropping whatever the app still
    sends (FastAPI would turn an exception raised here into a 400)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0
        refused = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes and not refused:
                refused = True
                await self._refuse(send)
            return {"type": "http.disconnect"} if refused else message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send):
        response = JSONResponse(
            status_code=413, content={"detail": f"request body is larger than {self.max_bytes:,} bytes"}
        )
        await response({"type": "http"}, None, send)


def _declared_type_error(upload: UploadFile) -> str | None:
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/") and declared != "application/octet-stream":
        return f"{upload.filename or 'the file'} is declared as {declared!r}, not an image type"
    return None


@serve.deployment(max_ongoing_requests=128, max_queued_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    """HTTP front: validation, limits, decoding (off the batching path), the page, health and metadata."""

    def __init__(self, model_handle, max_upload_mb: float, max_batch_files: int):
        self.model = model_handle
        self.max_batch_files = max_batch_files
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.decode_errors = metrics.Counter(
            "skin_ray_decode_errors", description="undecodable uploads by reason", tag_keys=("reason",)
        )
        app.add_middleware(BodySizeLimit, max_bytes=self.max_upload_bytes)
        self.page = PAGE.read_text()

    async def _classify(self, upload: UploadFile) -> dict:
        """One upload -> a prediction dict, or an error dict with `status` for the caller to map."""
        if (problem := _declared_type_error(upload)) is not None:
            return {"filename": upload.filename, "error": problem, "status": 415}
        data = await upload.read()
        try:
            image = await run_in_threadpool(preprocess_image, data)
        except ImageDecodeError as exc:
            self.decode_errors.inc(tags={"reason": exc.reason})
            return {"filename": upload.filename, "error": str(exc), "status": 400}
        try:
            return await self.model.predict.remote(image)
        except BackPressureError:
            return {"filename": upload.filename, "error": "the model is overloaded; retry shortly", "status": 503}

    @app.post("/predict", summary="Classify one image (multipart field `file`)")
    async def predict(self, file: UploadFile = File(...)) -> JSONResponse:
        result = await self._classify(file)
        if "error" in result:
            return JSONResponse(status_code=result["status"], content={"detail": result["error"]})
        return JSONResponse(result)

    @app.post("/predict/batch", summary="Classify several images (multipart field `files`, repeated)")
    async def predict_batch(self, files: list[UploadFile] = File(...)) -> JSONResponse:
        if len(files) > self.max_batch_files:
            return JSONResponse(
                status_code=413, content={"detail": f"{len(files)} files; at most {self.max_batch_files} per request"}
            )
        results = await asyncio.gather(*(self._classify(upload) for upload in files))
        entries = [
            {"filename": upload.filename, "error": result["error"]}
            if "error" in result
            else {"filename": upload.filename, **result}
            for upload, result in zip(files, results)
        ]
        return JSONResponse({"results": entries})

    @app.get("/healthz", summary="200 once the model is loaded and answered a warm-up prediction")
    async def healthz(self) -> JSONResponse:
        try:
            metadata = await self.model.metadata.remote()
        except Exception as exc:  # the model replica is starting, restarting or gone
            return JSONResponse(status_code=503, content={"detail": f"model not ready: {type(exc).__name__}"})
        return JSONResponse({"status": "ok", "model_version": metadata["model_version"]})

    @app.get("/model", summary="The served bundle's metadata")
    async def model_metadata(self) -> dict:
        return await self.model.metadata.remote()

    @app.get("/stats", summary="Batch sizes observed by a model replica")
    async def stats(self) -> dict:
        return await self.model.stats.remote()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)


def app_builder(args: ServeSettings) -> serve.Application:
    """The application, Ingress bound to SkinModel. Entry point for `serve run` and `serve deploy`
    (`import_path: skin_ray.serve:app_builder`); the YAML's deployment options override the defaults above."""
    model = SkinModel.bind(args.model, args.max_batch_size, args.batch_wait_timeout_s)
    return Ingress.bind(model, args.max_upload_mb, args.max_batch_files)
