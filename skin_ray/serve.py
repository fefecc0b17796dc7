"""Online prediction: a Ray Serve application behind Ray's HAProxy ingress, in one of two layouts.

    fused (default):  HAProxy -> Ingress (FastAPI: validate, decode, batch, predict)
    split:            HAProxy -> Ingress (validate, decode, batch) --uint8 batches--> SkinModel (predict)

The fused layout is the fastest on one node: no hop between processes, decoding on threads beside the
forward pass. The split layout scales decoding (Ingress replicas on CPU nodes) apart from the model
(SkinModel replicas, e.g. on GPU nodes) on a cluster. Both batch in the Ingress with `Batcher`, so a batch
is formed where the requests are, and the model receives whole batches. Run it with `skin-ray serve`, or
with Ray's own CLI: `serve run deployments/serve_config.yaml`.
"""

import asyncio
import contextlib
import logging
import math
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import ray
from fastapi import File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

import skin_ray
from skin_ray.api_keys import ApiKeys, RateLimit
from skin_ray.config import ServeSettings
from skin_ray.explain import explanation
from skin_ray.preprocess import ImageDecodeError, decode_pixels, to_model_input

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page.html"


EXACT_BATCH_SIZES = 64  # the batch-size histogram's sum is exact up to this many images per batch


class Overloaded(Exception):
    """More images are decoding or waiting for the model than the replica accepts."""


class ModelUnavailable(Exception):
    """The model replica died with the request and a second one did not answer either."""


class Batcher:
    """Dynamic batching that waits only for images known to be on their way.

    A request announces itself before its image is decoded, so a batch closes as soon as every announced
    image has arrived (or it is full, or `max_wait_s` passed): a lone request never waits, and under load
    the next batch fills while the previous one runs. A timer alone, as in `@serve.batch`, either delays
    lone requests or closes batches while their images are still decoding (measured here: mean batch size
    1.5 at 64 concurrent clients, and a third of the throughput).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], Awaitable[list[dict]]],
        max_batch_size: int,
        max_wait_s: float,
        max_pending: int,
    ):
        self.predict, self.max_batch_size, self.max_wait_s, self.max_pending = predict, max_batch_size, max_wait_s, max_pending
        self.batch_sizes: Counter[int] = Counter()
        self._decoding = 0
        self._ready: list[tuple[np.ndarray, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        # A bucket per size, edges between the integers: Ray exports a histogram's sum as count x bucket
        # midpoint, which is then exact (with edges at 1, 2, 4, ... six batches of one summed to 3). The same
        # edges for every app: a node's metrics agent keeps the first definition of a name it sees.
        self._histogram = metrics.Histogram(
            "skin_ray_batch_size", description="images per forward pass",
            boundaries=[size + 0.5 for size in range(EXACT_BATCH_SIZES + 1)],
        )

    def is_full(self) -> bool:
        """Whether a new image would be refused (`max_pending` images are decoding or waiting)."""
        return self._decoding + len(self._ready) >= self.max_pending

    async def classify(self, decode: Callable[[], Awaitable[np.ndarray]]) -> dict:
        """Decode one image with `decode` and return its answer from the batch it joins."""
        if self.is_full():
            raise Overloaded(f"{self.max_pending} images are already waiting; retry shortly")
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._form_batches())
        self._decoding += 1
        try:
            image = await decode()
        finally:
            self._decoding -= 1
            self._arrived.set()  # one fewer image to wait for, whether it decoded or not
        answer = asyncio.get_running_loop().create_future()
        self._ready.append((image, answer))
        return await answer

    async def _form_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._ready:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self._ready) < self.max_batch_size and self._decoding and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch, self._ready = self._ready[: self.max_batch_size], self._ready[self.max_batch_size :]
            images, answers = zip(*batch, strict=True)
            self.batch_sizes[len(batch)] += 1
            self._histogram.observe(len(batch))
            try:
                results = await self.predict(np.stack(images))
            except Exception as exc:  # every request of the batch gets the failure, the loop goes on
                results = [exc] * len(answers)
            for answer, result in zip(answers, results, strict=True):
                if answer.done():  # its client went away
                    continue
                if isinstance(result, Exception):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)


class LoadedModel:
    """A bundle in this process: uint8 pixel batches in, one answer per image out.

    Forward passes run on one dedicated thread, so the event loop keeps taking requests (and the decode
    threads keep decoding) while the model computes. Explanations (a forward and a gradient pass each) run on
    a thread of their own, so a batch of predictions never queues behind them; they share the cores instead.
    """

    def __init__(self, bundle: str | None):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="skin-ray-model")
        self._explaining = ThreadPoolExecutor(1, thread_name_prefix="skin-ray-explain")
        self.load(bundle)

    def load(self, bundle: str | None) -> None:
        from skin_ray.bundle import read_metadata
        from skin_ray.predictor import Predictor
        from skin_ray.runtime import limit_tensorflow_threads

        running = getattr(self, "predictor", None)
        # Ingress decodes uploads to the size of the bundle it started with (it may not hold the model), so a
        # swap to another size is refused from bundle.json, before a network is loaded.
        if running is not None and (size := read_metadata(bundle).image_size) != running.metadata.image_size:
            raise ValueError(
                f"{bundle} takes {size}-pixel images, the running bundle {running.metadata.image_size}: "
                "deploy the app anew to change the input size"
            )
        limit_tensorflow_threads()
        predictor = Predictor.from_bundle(bundle)
        height, width, channels = predictor.metadata.input_size
        predictor.predict_pixels(np.zeros((1, height, width, channels), np.uint8))  # trace before traffic
        self.predictor = predictor  # swapped in one assignment: requests never see a half-loaded model
        logger.info("serving model %s", predictor.model_version)

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        """The prediction record of each image (skin_ray.record.RECORD_FIELDS)."""
        predictor = self.predictor
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: predictor.records(to_model_input(pixels)))

    async def explain(self, pixels: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """One image's prediction record and its Grad-CAM map (None when the input gate refused it)."""
        predictor = self.predictor
        return await asyncio.get_running_loop().run_in_executor(self._explaining, predictor.explain, to_model_input(pixels[None]))

    async def metadata(self) -> dict:
        """What a caller needs of the bundle's description (PUBLIC_METADATA): not where it was trained from."""
        described = asdict(self.predictor.metadata)
        return {name: described[name] for name in PUBLIC_METADATA}

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {bundle: s3://...}` in the YAML swaps the bundle without downtime; raises ValueError
        for settings it refuses (the running bundle stays)."""
        bundle = _live_settings(user_config).bundle
        if bundle and bundle != self.predictor.bundle.uri:
            self.load(bundle)


# What GET /model shows of bundle.json: the bundle's version, classes, threshold, figures and input; not its
# `training` and `data` sections, which name storage paths, member bundles and the training data's location.
PUBLIC_METADATA = (
    "model_version", "arch", "class_names", "positive_class", "threshold", "target_sensitivity", "metrics",
    "input_size", "preprocessing", "format_version", "created", "package_version", "input_gate", "uncertainty",
)


def _live_settings(user_config: dict) -> ServeSettings:
    """A deployment's `user_config` checked as the settings it names (the same validation as the CLI's flags);
    ValueError naming what was refused."""
    from pydantic import ValidationError

    try:
        return ServeSettings.model_validate(user_config)
    except ValidationError as exc:
        raise ValueError(f"user_config refused: {exc}") from None


def _reconfigure_or_keep(reconfigure: Callable[[dict], None], user_config: dict) -> None:
    """Apply a redeploy's `user_config`, or keep the configuration running and say why in the log (a deployment
    whose reconfigure raises would be restarted, not kept)."""
    try:
        reconfigure(user_config)
    except ValueError as exc:
        logger.error("the running configuration stays: %s", exc)


class _RemoteModel:
    """The SkinModel deployment behind the same awaitables as LoadedModel (split layout).

    A call whose replica dies is made once more (a prediction has no side effects), which Serve routes to
    a live replica or queues until the replacement starts; a second death is ModelUnavailable.
    """

    def __init__(self, handle):
        self.handle = handle

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        return await self._call("predict", pixels)

    async def explain(self, pixels: np.ndarray) -> tuple[dict, np.ndarray | None]:
        return await self._call("explain", pixels)

    async def metadata(self) -> dict:
        return await self._call("metadata")

    async def _call(self, method: str, *args):
        for attempt in range(2):
            try:
                return await getattr(self.handle, method).remote(*args)
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning("SkinModel replica lost during %s (%s); %s", method, type(exc).__name__,
                               "trying once more" if attempt == 0 else "giving up")
        raise ModelUnavailable("the model replica restarted while predicting; retry shortly")


# Fractional CPUs: on a small machine a replica must not hold a whole CPU that training or a Ray Data job
# needs. A SkinModel call carries a whole batch, so a few concurrent calls are enough.
@serve.deployment(max_ongoing_requests=8, max_queued_requests=64, ray_actor_options={"num_cpus": 0.5})
class SkinModel:
    """The split layout's model replica: holds one bundle and predicts the batches Ingress replicas send."""

    def __init__(self, bundle: str | None):
        self.model = LoadedModel(bundle)

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        return await self.model.predict(pixels)

    async def explain(self, pixels: np.ndarray) -> tuple[dict, np.ndarray | None]:
        return await self.model.explain(pixels)

    async def metadata(self) -> dict:
        return await self.model.metadata()

    def reconfigure(self, user_config: dict) -> None:
        _reconfigure_or_keep(self.model.reconfigure, user_config)


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
        description="the input gate's score (Mahalanobis distance); refused above the bundle's threshold"
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


class StatsResponse(BaseModel):
    batch_sizes: dict[str, int] = Field(description="how many batches of each size (images) this replica formed")


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


def _errors(described: dict[int, str]) -> dict:
    """FastAPI's `responses` for `described` statuses, every one answering ErrorResponse."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in sorted(described.items())}


def _uploads(field: str) -> dict:
    """`openapi_extra` saying what each part of multipart `field` is: a file part (it has a filename; a part
    without one is a text field, not a file) holding an image (an undeclared type is taken too)."""
    disposition = {
        "description": "a file part: names a filename", "required": True, "schema": {"type": "string"},
        "example": f'form-data; name="{field}"; filename="lesion.jpg"',
    }
    encoding = {"contentType": "image/*, application/octet-stream", "headers": {"Content-Disposition": disposition}}
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": {field: encoding}}}}}


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A failure nobody foresaw is still the service's fault, not the caller's: JSON 503, retry."""
    logger.exception("unexpected failure answering %s", request.url.path)
    return _error(503, f"internal failure ({type(exc).__name__}); retry shortly")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (a malformed multipart body, an unknown route) in the service's shape."""
    detail = f"malformed request body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
    return _error(exc.status_code, detail)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(sorted({repr(".".join(map(str, error["loc"][1:]))) for error in exc.errors()}))
    detail = f"no file: send the image(s) as file parts (with a filename) of multipart field {fields}"
    return JSONResponse(status_code=422, content={"detail": detail})


class RequestGuard:
    """What every HTTP request passes before the app: refusal while the replica drains, a count of requests
    in flight (what a drain waits for), and bounds on what an upload may hold.

    In order: a body framed two ways or with a coding other than chunked is refused (400: the framing request
    smuggling relies on); without a valid API key (when the service has keys) a route other than OPEN_ROUTES
    gets 401, and a key past its rate limit 429; work the replica has no room for gets 503 before its body is
    read (`busy(method, path)` says why), and a route of `route_limits` past its number of requests in progress.

    An upload is refused with 413 past `max_bytes` (by Content-Length before anything is read, else by
    counting as chunks arrive, so it is never buffered), and cut with 408 when its body has not arrived
    within `timeout_s`. Beyond `max_uploads` bodies in progress, each new upload cuts the slowest (bytes so
    far over age) of those older than GRACE_S that wait for their client, so a client sending a byte a
    second loses its place to any client sending at network speed, and slow senders do not pile up in the
    replica's request slots (`max_ongoing_requests`) that normal clients need. The new upload is admitted
    either way: refusing it would hand the slots to whoever holds them.
    """

    # An upload at network speed is over long before this; a younger one cannot be judged by its rate yet.
    GRACE_S = 0.25

    def __init__(
        self, max_bytes: int, timeout_s: float, max_uploads: int, keys: ApiKeys | None = None,
        rate_limit: RateLimit | None = None, busy: Callable[[str, str], str | None] = lambda method, path: None,
        route_limits: dict[tuple[str, str], tuple[int, str]] | None = None,
    ):
        self.max_bytes, self.timeout_s, self.max_uploads = max_bytes, timeout_s, max_uploads
        self.keys, self.rate_limit, self.busy = keys, rate_limit, busy
        self.route_limits, self._active = route_limits or {}, Counter()  # (method, path) -> (most at once, why)
        self.draining = False
        self.in_flight = 0
        self._uploads: set[_Upload] = set()
        self._idle = asyncio.Event()

    def middleware(self, app):
        """The ASGI app Starlette puts in front of `app` (`FastAPI.add_middleware(guard.middleware)`)."""

        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            if self.draining:
                return await _refuse(send, 503, "the service is shutting down; retry shortly", closing=True)
            self.in_flight += 1
            self._idle.clear()
            try:
                await self._admit(app, scope, receive, send)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self._idle.set()

        return guarded

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to `timeout_s` for those in flight; return how many did not finish."""
        self.draining = True
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.in_flight

    async def _admit(self, app, scope, receive, send):
        headers = scope["headers"]
        lengths = {value.strip() for name, value in headers if name == b"content-length"}
        codings = [c.strip().lower() for name, value in headers if name == b"transfer-encoding" for c in value.split(b",")]
        if problem := _framing_problem(lengths, codings):
            return await _refuse(send, 400, problem, closing=True)
        path = _route_path(scope)
        if self.keys is not None and path not in OPEN_ROUTES and not path.startswith(OPEN_PREFIXES):
            caller = self.keys.name_of(_presented_secret(headers))
            if caller is None:
                return await _refuse(send, 401, "an API key is needed: send Authorization: Bearer KEY or X-API-Key: KEY",
                                     headers={"WWW-Authenticate": "Bearer"})
            if self.rate_limit is not None and (wait_s := self.rate_limit.wait_s(caller)):
                return await _refuse(send, 429, f"key {caller!r} is over its rate limit; retry shortly",
                                     headers={"Retry-After": str(math.ceil(wait_s))})
            scope.setdefault("state", {})["caller"] = caller  # its name, for the log; never the secret
            logger.info("%s %s by API key %r", scope["method"], path, caller)
        if reason := self.busy(scope["method"], path):
            return await _refuse(send, 503, reason, closing=True)  # before its body is read
        limited = self.route_limits.get((scope["method"], path))
        if limited is None:
            return await self._bounded(app, scope, receive, send, lengths, codings)
        limit, reason = limited
        if self._active[path] >= limit:  # counted here, at admission, not once the app has read the body
            return await _refuse(send, 503, reason, closing=True)
        self._active[path] += 1
        try:
            return await self._bounded(app, scope, receive, send, lengths, codings)
        finally:
            self._active[path] -= 1

    async def _bounded(self, app, scope, receive, send, lengths: set[bytes], codings: list[bytes]):
        """Pass the request on with its body bounded by `max_bytes` and `timeout_s`."""
        declared = int(next(iter(lengths))) if lengths else None
        if declared is not None and declared > self.max_bytes:
            return await _refuse(send, 413, f"request body is larger than {self.max_bytes:,} bytes")
        if not codings and not declared:
            return await app(scope, receive, send)  # HTTP/1.1: a request declaring neither has no body
        if len(self._uploads) >= self.max_uploads:
            self._cut_slowest()
        upload = _Upload(asyncio.get_running_loop().time())
        self._uploads.add(upload)
        refused = False

        async def bounded_receive():
            nonlocal refused
            if refused:
                return {"type": "http.disconnect"}
            message, refusal = await upload.receive(receive, self.timeout_s)
            if refusal is None and upload.received > self.max_bytes:
                refusal = (413, f"request body is larger than {self.max_bytes:,} bytes")
            if refusal is not None:
                refused = True
                self._uploads.discard(upload)
                await _refuse(send, *refusal, closing=True)
                return {"type": "http.disconnect"}  # the app stops reading; what it still sends is dropped
            if not message.get("more_body"):
                self._uploads.discard(upload)
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await app(scope, bounded_receive, guarded_send)
        finally:
            self._uploads.discard(upload)

    def _cut_slowest(self) -> None:
        """Cut the slowest upload old enough to judge that waits for its client, if any (one whose body the
        app has not asked for yet is not slow, only not read yet: `received` counts what the app read)."""
        now = asyncio.get_running_loop().time()
        judged = [upload for upload in self._uploads if upload.waiting and now - upload.started >= self.GRACE_S]
        if judged:
            slowest = min(judged, key=lambda upload: upload.received / (now - upload.started))
            slowest.cut.set()
            self._uploads.discard(slowest)


class _Upload:
    """One request body in progress: when it started, how much arrived, whether the app is waiting for the
    client's next bytes, and whether it lost its place."""

    def __init__(self, started: float):
        self.started, self.received, self.waiting, self.cut = started, 0, False, asyncio.Event()

    async def receive(self, receive, timeout_s: float) -> tuple[dict | None, tuple[int, str] | None]:
        """The next message, or why the upload ends here: (408, reason) past its deadline or when cut."""
        left = self.started + timeout_s - asyncio.get_running_loop().time()
        message = asyncio.ensure_future(receive())
        cut = asyncio.ensure_future(self.cut.wait())
        self.waiting = True
        done, _ = await asyncio.wait({message, cut}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        self.waiting = False
        cut.cancel()
        if message not in done or self.cut.is_set():
            message.cancel()
            if self.cut.is_set():
                return None, (408, "upload too slow: other uploads were waiting and this one was the slowest")
            return None, (408, f"upload too slow: the body did not arrive within {timeout_s:g} s")
        received = message.result()
        self.received += len(received.get("body", b""))
        return received, None


RETRY_AFTER_S = 1  # what a 503 tells clients to wait: overload and restarts clear within seconds


def _error(status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"detail": ...}` with `status`; a 503 says when to retry, `closing` ends the connection after it."""
    headers = {**({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}), **(headers or {})}
    if closing:
        headers["Connection"] = "close"
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


async def _refuse(send, status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None) -> None:
    """Answer an ASGI request with `_error` straight from a middleware."""
    await _error(status, detail, closing, headers)({"type": "http"}, None, send)


# What answers without an API key: the page, the health check and the API's documentation, which hold no data.
OPEN_ROUTES = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static-offline-docs/",)  # the documentation pages' scripts and styles


def _document_keys(app: FastAPIOffline, rate_limited: bool) -> None:
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


def _framing_problem(lengths: set[bytes], codings: list[bytes]) -> str | None:
    """Why a request's body framing is refused (RFC 9112 section 6), or None: a proxy and this server could
    read the body's end differently, which is what request smuggling relies on."""
    if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
        return "malformed request: Content-Length must be one number"
    if lengths and codings:
        return "malformed request: both Content-Length and Transfer-Encoding"
    if codings and codings != [b"chunked"]:
        return "malformed request: the only transfer coding accepted is chunked"
    return None


def _route_path(scope) -> str:
    """The request's path below the app's route prefix (Serve mounts an app under `route_prefix`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _presented_secret(headers) -> str:
    """The API key a request presents (`Authorization: Bearer KEY` or `X-API-Key: KEY`), or ""."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                return secret.strip()
    return ""


def _declared_type_error(upload: UploadFile) -> str | None:
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/") and declared != "application/octet-stream":
        return f"{upload.filename or 'the file'} is declared as {declared!r}, not an image type"
    return None


def _response(result: dict) -> JSONResponse:
    """A record as 200, an error dict from Ingress._classify as its status with `detail`."""
    if "status" in result:
        return _error(result["status"], result["error"])
    return JSONResponse(result)


def _node_metrics_url() -> str:
    """Where Ray's metrics agent on this node exports Prometheus text (a port Ray picks at start)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(node for node in ray.nodes() if node["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _read_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# max_ongoing_requests is above max_pending_images so the Batcher's JSON 503 answers overload before
# Serve's own plain-text one would.
@serve.deployment(max_ongoing_requests=512, max_queued_requests=512, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """HTTP front: validation, limits, decoding, batching, the page, health and metadata; in the fused layout
    (no `model_handle`) it also holds the model."""

    def __init__(self, settings: ServeSettings, model_handle=None):
        from skin_ray.bundle import read_metadata

        self.model = LoadedModel(settings.bundle) if model_handle is None else _RemoteModel(model_handle)
        self.image_size = read_metadata(settings.bundle).image_size  # what uploads are decoded to
        self.max_batch_files = settings.max_batch_files
        self.max_pixels = int(settings.max_image_megapixels * 1e6)
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="skin-ray-decode")
        self.batcher = Batcher(
            self.model.predict, settings.max_batch_size, settings.batch_wait_timeout_s, settings.max_pending_images
        )
        self.predictions = metrics.Counter(
            "skin_ray_predictions", description="answers by label (withheld: refused by the input gate) and uncertainty",
            tag_keys=("label", "uncertain"),
        )
        self.decode_errors = metrics.Counter(
            "skin_ray_decode_errors", description="undecodable uploads by reason", tag_keys=("reason",)
        )
        self.guard = RequestGuard(
            int(settings.max_upload_mb * 2**20), settings.upload_timeout_s, settings.max_concurrent_uploads,
            keys=ApiKeys(settings.api_keys) if settings.api_keys else None,
            rate_limit=RateLimit(settings.rate_limit_per_key) if settings.rate_limit_per_key else None,
            busy=self._busy,
            route_limits={("POST", "/explain"): (
                settings.max_concurrent_explanations,
                f"{settings.max_concurrent_explanations} explanations are already being made; retry shortly",
            )},
        )
        self.page_html = PAGE.read_text()
        self.metrics_url = _node_metrics_url()

    def _busy(self, method: str, path: str) -> str | None:
        """Why the replica has no room for this request's images now (the guard then answers 503 before reading
        its body), or None."""
        if method == "POST" and path in ("/predict", "/predict/batch") and self.batcher.is_full():
            return "the model is overloaded; retry shortly"
        return None

    async def drain(self, timeout_s: float) -> int:
        """Answer new requests 503 from now on and wait up to `timeout_s` for those in flight; returns how many
        were still unfinished. `skin-ray serve` calls it before it stops (its app has one Ingress replica)."""
        return await self.guard.drain(timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config` on Ingress changes batching (`max_batch_size`, `batch_wait_timeout_s`) and, in the fused
        layout, swaps the bundle (`bundle: s3://...`), all without downtime; refused settings change nothing."""
        _reconfigure_or_keep(self._reconfigure, user_config)

    def _reconfigure(self, user_config: dict) -> None:
        live = _live_settings(user_config)
        if isinstance(self.model, LoadedModel):
            self.model.reconfigure(user_config)  # first: a refused bundle leaves batching as it was too
        if "max_batch_size" in live.model_fields_set:
            self.batcher.max_batch_size = live.max_batch_size
        if "batch_wait_timeout_s" in live.model_fields_set:
            self.batcher.max_wait_s = live.batch_wait_timeout_s

    async def _classify(self, upload: UploadFile, explain: bool = False) -> dict:
        """One upload -> its prediction record (with an `explanation` when asked: one image, not batched), or
        an error dict with `status` for the caller to map."""
        if (problem := _declared_type_error(upload)) is not None:
            return {"filename": upload.filename, "error": problem, "status": 415}
        data = await upload.read()
        loop = asyncio.get_running_loop()

        def decode() -> Awaitable[np.ndarray]:
            return loop.run_in_executor(self.decoder, decode_pixels, data, self.image_size, self.max_pixels)

        try:
            if explain:  # the guard admits at most max_concurrent_explanations at once
                result, heatmap = await self.model.explain(await decode())
                result["explanation"] = None if heatmap is None else await loop.run_in_executor(
                    self.decoder, explanation, data, heatmap, result["label"]
                )
            else:
                result = await self.batcher.classify(decode)
        except ImageDecodeError as exc:
            self.decode_errors.inc(tags={"reason": exc.reason})
            return {"filename": upload.filename, "error": str(exc), "status": 400}
        except (Overloaded, BackPressureError):
            return {"filename": upload.filename, "error": "the model is overloaded; retry shortly", "status": 503}
        except ModelUnavailable as exc:
            return {"filename": upload.filename, "error": str(exc), "status": 503}
        self.predictions.inc(tags={"label": result["label"] or "withheld", "uncertain": str(bool(result["uncertain"])).lower()})
        return result

    def __serve_build_asgi_app__(self) -> FastAPIOffline:
        """This replica's HTTP app, which Serve asks for after __init__: the routes bound to this instance,
        behind its RequestGuard. Built per replica, so no replica changes an app that others share.
        /docs and /redoc serve their scripts from the package (fastapi-offline), so they work offline."""
        app = FastAPIOffline(
            title="skin-ray",
            version=skin_ray.__version__,
            description="Classifies skin-lesion images as Cancer or Non_Cancer. Not a medical diagnosis.",
        )
        app.add_exception_handler(Exception, _unexpected_error)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)
        app.add_middleware(self.guard.middleware)
        app.post(
            "/predict",
            summary="Classify one image (multipart field `file`)",
            response_model=PredictionResponse,
            responses=_errors(ONE_IMAGE_ERRORS),
            openapi_extra=_uploads("file"),
        )(self.predict)
        app.post(
            "/explain",
            summary="Classify one image and show which parts of it moved the prediction (Grad-CAM; multipart field `file`)",
            response_model=ExplainResponse,
            responses=_errors({
                **ONE_IMAGE_ERRORS,
                503: "max_concurrent_explanations are in progress, the model restarting, or the service shutting down; "
                "retry shortly (Retry-After)",
            }),
            openapi_extra=_uploads("file"),
        )(self.explain)
        files = Annotated[
            list[UploadFile],
            File(description=f"1 to {self.max_batch_files} image files (JPEG, PNG, WebP, BMP, GIF or TIFF), each a file part",
                 json_schema_extra={"minItems": 1, "maxItems": self.max_batch_files, "items": IMAGE_FILE_SCHEMA}),
        ]

        async def predict_batch(files: files) -> JSONResponse:  # a closure: the schema names this replica's limit
            return await self.predict_batch(files)

        app.post(
            "/predict/batch",
            summary="Classify several images (multipart field `files`, repeated)",
            response_model=BatchResponse,
            # No `encoding` here: Schemathesis then sends one file part where the array allows several, and without
            # the filename that makes a part a file. A bad file is an entry of the answer, not a refusal, anyway.
            responses=_errors({
                **UPLOAD_ERRORS, 413: "body larger than max_upload_mb, or more files than max_batch_files",
                503: "overloaded (more images waiting than max_pending_images), or the service is shutting down; retry "
                "shortly (Retry-After)",
            }),
        )(predict_batch)
        app.get(
            "/healthz",
            summary="200 once the model is loaded and answered a warm-up prediction",
            response_model=HealthResponse,
            responses=_errors({503: "the model is not ready, or the service is shutting down"}),
        )(self.healthz)
        app.get("/model", summary="The served bundle's metadata", responses=_errors({503: SHUTTING_DOWN}))(self.model_metadata)
        app.get(
            "/stats", summary="Batch sizes this Ingress replica has formed", response_model=StatsResponse,
            responses=_errors({503: SHUTTING_DOWN}),
        )(self.stats)
        app.get(
            "/metrics",
            response_class=PlainTextResponse,
            summary="Prometheus metrics of this replica's node: ours (ray_skin_ray_*), Serve's (ray_serve_*) and Ray's",
            responses=_errors({503: "Ray's metrics exporter on this node did not answer, or the service is shutting down"}),
        )(self.metrics_text)
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(self.page)
        if self.guard.keys is not None:
            _document_keys(app, rate_limited=self.guard.rate_limit is not None)
        return app

    async def predict(self, file: ImageFile) -> JSONResponse:
        return _response(await self._classify(file))

    async def explain(self, file: ImageFile) -> JSONResponse:
        return _response(await self._classify(file, explain=True))

    async def predict_batch(self, files: list[UploadFile]) -> JSONResponse:
        if len(files) > self.max_batch_files:
            return _error(413, f"{len(files)} files; at most {self.max_batch_files} per request")
        results = await asyncio.gather(*(self._classify(upload) for upload in files))
        entries = [
            {"filename": upload.filename, "error": result["error"]}
            if "status" in result
            else {"filename": upload.filename, **result}
            for upload, result in zip(files, results, strict=True)
        ]
        return JSONResponse({"results": entries})

    async def healthz(self) -> JSONResponse:
        try:
            metadata = await self.model.metadata()
        except Exception as exc:  # the model replica is starting, restarting or gone
            logger.warning("health check: the model did not answer: %r", exc)
            return JSONResponse(status_code=503, content={"detail": f"model not ready: {type(exc).__name__}"})
        return JSONResponse({"status": "ok", "model_version": metadata["model_version"]})

    async def model_metadata(self) -> dict:
        return await self.model.metadata()

    async def stats(self) -> dict:
        return {"batch_sizes": {str(size): count for size, count in sorted(self.batcher.batch_sizes.items())}}

    async def metrics_text(self) -> Response:
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, _read_url, self.metrics_url)
        except OSError as exc:
            return JSONResponse(status_code=503, content={"detail": f"metrics exporter unavailable: {exc}"})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)


def app_builder(args: ServeSettings) -> serve.Application:
    """The application in the chosen layout. Entry point for `serve run` and `serve deploy`
    (`import_path: skin_ray.serve:app_builder`); the YAML's deployment options override the defaults above.

    A replica that Serve stops (a redeploy, a scale-down, a deleted app) finishes its requests for up to
    `drain_timeout_s` first."""
    drained = {"graceful_shutdown_timeout_s": args.drain_timeout_s}
    if args.layout == "split":
        return Ingress.options(**drained).bind(args, SkinModel.options(**drained).bind(args.bundle))
    return Ingress.options(**drained).bind(args)
