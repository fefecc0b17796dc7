"""The Serve deployments and the application builder: Ingress (HTTP, decoding, batching; the model too in the
fused layout) and, in the split layout, a SkinModel deployment per version."""

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from skin_ray.api_keys import ApiKeys, RateLimit
from skin_ray.config import ServeSettings
from skin_ray.drift import DriftWindow, one_image_statistics
from skin_ray.overlay import explanation
from skin_ray.preprocess import ImageDecodeError, decode_pixels, image_megapixels
from skin_ray.serve import telemetry
from skin_ray.serve.audit import AuditLog, ImageExchange
from skin_ray.serve.backends import LoadedModel, RemoteModel, swap_in_place
from skin_ray.serve.batching import Batcher, ImageBudget, Overloaded
from skin_ray.serve.errors import Refusal
from skin_ray.serve.guard import RequestGuard, RouteCapacity, capacity_key
from skin_ray.serve.inference_protocol import INFER_PATH
from skin_ray.serve.versions import ServedModel, Versions

logger = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parents[1] / "page.html"
DRIFT_PUBLISH_S = 1.0  # how often the drift gauges are recomputed from the windows that changed
# What a redeploy's `user_config` may change in a running Ingress; the rest needs new replicas (new `args`).
LIVE_SETTINGS = frozenset({"bundle", "traffic", "shadow", "max_batch_size", "batch_wait_timeout_s"})


def _live_settings(args: ServeSettings, user_config: dict) -> ServeSettings:
    """The settings `user_config` makes of the deployment's `args`, checked as the CLI's flags are; ValueError
    naming what was refused."""
    if fixed := sorted(set(user_config) - LIVE_SETTINGS - {"model"}):
        raise ValueError(f"user_config cannot change {', '.join(fixed)} in running replicas (change the app's args)")
    try:
        return ServeSettings.model_validate({**args.model_dump(exclude_unset=True), **user_config})
    except ValidationError as exc:
        raise ValueError(f"user_config refused: {exc}") from None


def _apply_or_keep(apply: Callable[[dict], None], user_config: dict) -> None:
    """Apply a redeploy's `user_config`, or keep the configuration running and say why in the log (a deployment
    whose reconfigure raises would be restarted, not kept)."""
    try:
        apply(user_config)
    except ValueError as exc:
        logger.error("the running configuration stays: %s", exc)


def _by_size(batch_sizes: Counter) -> dict[str, int]:
    return {str(size): count for size, count in sorted(batch_sizes.items())}


def model_deployment_name(version: str, primary: bool) -> str:
    """A version's SkinModel deployment: the primary's keeps the name configs for one version use."""
    return "SkinModel" if primary else f"SkinModel-{version}"


# Fractional CPUs: on a small machine a replica must not hold a whole CPU that training or a Ray Data job
# needs. A SkinModel call carries a whole batch, so a few concurrent calls are enough.
@serve.deployment(max_ongoing_requests=8, max_queued_requests=64, ray_actor_options={"num_cpus": 0.5})
class SkinModel:
    """The split layout's model replica: holds one version's bundle and predicts the batches Ingress replicas send."""

    def __init__(self, bundle: str | None, runtime: str):
        self.model = LoadedModel(bundle, runtime)

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        return await self.model.predict(pixels)

    async def explain(self, pixels: np.ndarray) -> tuple[dict, np.ndarray | None]:
        return await self.model.explain(pixels)

    async def metadata(self) -> dict:
        return await self.model.metadata()

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {bundle: s3://...}` swaps this version's bundle for one of the same input size."""
        _apply_or_keep(self._swap, user_config)

    def _swap(self, user_config: dict) -> None:
        bundle = next(iter(_live_settings(ServeSettings(), user_config).versions().values()))
        if bundle and bundle != self.model.uri:
            self.model = swap_in_place(self.model, bundle)


# max_ongoing_requests is above max_pending_images so the guard's JSON 503 answers overload before Serve's own
# plain-text one would.
@serve.deployment(max_ongoing_requests=512, max_queued_requests=512, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    """HTTP front: the guard, decoding, batching and the versions' table; in the fused layout (no `model_handles`)
    it also holds each version's model."""

    def __init__(self, settings: ServeSettings, model_handles: dict | None = None):
        self.args, self.model_handles = settings, model_handles
        self.max_pixels = int(settings.max_image_megapixels * 1e6)
        self.measures_images = settings.audit is not None or settings.drift_window > 0  # 0.14 ms an image
        self.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="skin-ray-decode")
        self.budget = ImageBudget(settings.max_pending_images)
        self.versions = self._versions(settings)
        self.audit = None if settings.audit is None else AuditLog(
            settings.audit, settings.audit_flush_s, int(settings.audit_rotate_mb * 2**20), settings.audit_rotate_s,
            on_dropped=lambda count: telemetry.audit_dropped().inc(count),
        )
        overloaded = RouteCapacity("the model is overloaded; retry shortly", full=self.budget.is_full)
        explaining = settings.max_concurrent_explanations
        self.guard = RequestGuard(
            int(settings.max_upload_mb * 2**20), settings.upload_timeout_s, settings.max_concurrent_uploads,
            keys=ApiKeys(settings.api_keys) if settings.api_keys else None,
            rate_limit=RateLimit(settings.rate_limit_per_key) if settings.rate_limit_per_key else None,
            capacity={
                ("POST", "/predict"): overloaded,
                ("POST", "/predict/batch"): overloaded,
                ("POST", INFER_PATH): overloaded,
                ("POST", "/explain"): RouteCapacity(
                    f"{explaining} explanations are already being made; retry shortly", most=explaining
                ),
            },
            on_refusal=self._refused_before_the_app,
        )
        self.page_html = PAGE.read_text()
        self.metrics_url = telemetry.node_metrics_url()
        published: dict[str, int] = {}
        self.drift_publisher = telemetry.Periodic(
            DRIFT_PUBLISH_S, lambda: telemetry.publish_drift(self._drift_windows(), published), "skin-ray-drift"
        )

    def _drift_windows(self) -> list[tuple[str, DriftWindow]]:
        return [(name, served.drift) for name, served in self.versions.models.items() if served.drift is not None]

    def _versions(self, settings: ServeSettings) -> Versions:
        """The versions `settings` names, reusing those already served from the same bundle; nothing running
        changes unless every new version loads."""
        running = getattr(self, "versions", None)
        models = {}
        for name, bundle in settings.versions().items():
            served = running.models.get(name) if running else None
            models[name] = served if served is not None and served.bundle == bundle else self._serve(name, bundle, settings)
        for served in models.values():
            served.batcher.max_batch_size, served.batcher.max_wait_s = settings.max_batch_size, settings.batch_wait_timeout_s
        return Versions(models, settings.weights(), settings.shadow)

    def _serve(self, name: str, bundle: str | None, settings: ServeSettings) -> ServedModel:
        """A new version: its model loaded here (fused), or its SkinModel deployment's handle (split)."""
        from skin_ray.bundle import read_drift_reference, read_metadata

        if self.model_handles is None:
            backend = LoadedModel(bundle, settings.runtime)
            metadata, reference = backend.predictor.metadata, backend.predictor.bundle.drift
        elif name in self.model_handles and self.args.versions()[name] == bundle:
            backend = RemoteModel(self.model_handles[name])
            metadata, reference = read_metadata(bundle), read_drift_reference(bundle)
        else:  # its SkinModel deployment was made from the app's args
            raise ValueError(f"the split layout serves {name!r} from a SkinModel deployment: change its bundle with the "
                             "app's args, or with that deployment's user_config")
        batcher = Batcher(backend.predict, settings.max_batch_size, settings.batch_wait_timeout_s, self.budget, name)
        drift = None
        if reference is not None and settings.drift_window:
            drift = DriftWindow(reference, settings.drift_window, metadata.positive_class)
        return ServedModel(name, bundle, metadata.image_size, metadata.class_names, backend, batcher, drift)

    def reconfigure(self, user_config: dict) -> None:
        """A redeploy's `user_config` changes the versions (bundles, traffic, shadow) and batching without a
        restart; the requests in progress finish with the versions they started with. A refused one changes
        nothing."""
        _apply_or_keep(self._reconfigure, user_config)

    def _reconfigure(self, user_config: dict) -> None:
        self.versions = self._versions(_live_settings(self.args, user_config))  # one assignment: no mixed state
        logger.info("serving %s", ", ".join(f"{name} {share:g}%" for name, share in self.versions.weights.items()))

    async def drain(self, timeout_s: float) -> int:
        """Answer new requests 503 from now on and wait up to `timeout_s` for those in flight, then write the
        audit lines still queued; returns how many requests were still unfinished. `skin-ray serve` calls it
        before it stops (its app has one Ingress replica)."""
        unfinished = await self.guard.drain(timeout_s)
        if self.audit is not None:
            await asyncio.to_thread(self.audit.flush)
        return unfinished

    def __del__(self):
        """Serve stops a replica (a redeploy, a scale-down, a deleted app) after its drain: the audit lines still
        queued are written."""
        if getattr(self, "drift_publisher", None) is not None:
            self.drift_publisher.stop()
        if getattr(self, "audit", None) is not None:
            self.audit.close()

    def exchange(self, request, route: str) -> ImageExchange:
        """One image's answer through `route`, counted and audited."""
        return ImageExchange(self.audit, request.scope, route)

    def _refused_before_the_app(self, scope: dict, path: str, status: int, detail: str) -> None:
        if capacity_key("POST", path) in self.guard.capacity:  # a route that takes images: its refusal is on the record too
            ImageExchange(self.audit, scope, path).refused(Refusal(status, detail))

    def _decoder(self, data: bytes, image: dict[str, float]) -> Callable[[int], Awaitable[np.ndarray]]:
        """Decodes `data` to a size off the event loop, and puts its `image_statistics` in `image` when the audit
        trail or drift needs them."""

        def decode(size: int) -> np.ndarray:
            pixels = decode_pixels(data, size, self.max_pixels)
            if self.measures_images:
                image.update(one_image_statistics(pixels, image_megapixels(data)))
            return pixels

        loop = asyncio.get_running_loop()
        return lambda size: loop.run_in_executor(self.decoder, decode, size)

    async def classify(self, served: ServedModel, data: bytes) -> tuple[dict, dict[str, float]]:
        """`data`'s prediction record from the version `served`, and the image's statistics; Refusal when there
        is no record."""
        self._check_audit()
        image = {}
        with self._refusals():
            return await served.classify(self._decoder(data, image)), image

    async def classify_pixels(self, served: ServedModel, pixels: np.ndarray) -> tuple[dict, dict[str, float]]:
        """`classify` for an image a caller decoded itself: uint8 pixels at `served`'s input size."""
        self._check_audit()
        image = one_image_statistics(pixels, pixels.shape[0] * pixels.shape[1] / 1e6) if self.measures_images else {}

        async def decoded(size: int) -> np.ndarray:
            return pixels

        with self._refusals():
            return await served.classify(decoded), image

    async def explain(self, served: ServedModel, data: bytes) -> tuple[dict, dict[str, float]]:
        """`classify` with the record's Grad-CAM `explanation` (one image, not batched: the guard admits at most
        max_concurrent_explanations at once)."""
        self._check_audit()
        image = {}
        with self._refusals():
            record, heatmap = await served.backend.explain(await self._decoder(data, image)(served.image_size))
        record["explanation"] = None if heatmap is None else await asyncio.get_running_loop().run_in_executor(
            self.decoder, explanation, data, heatmap, record["label"]
        )
        return record, image

    def _check_audit(self) -> None:
        if self.args.audit_required and self.audit is not None and not self.audit.healthy:
            raise Refusal(503, "the audit trail cannot be written, and answers must be audited; retry shortly")

    @contextlib.contextmanager
    def _refusals(self):
        """What a failure to classify says to the caller: an undecodable image 400, no room 503."""
        try:
            yield
        except ImageDecodeError as exc:
            telemetry.decode_errors().inc(tags={"reason": exc.reason})
            raise Refusal(400, str(exc)) from None
        except (Overloaded, BackPressureError):
            raise Refusal(503, "the model is overloaded; retry shortly") from None

    async def shadow(self, data: bytes, answer: dict, shadows: list[ServedModel]) -> None:
        """Classify `data` again with each of `shadows` (after `answer` was sent) and count how they compare.
        Skipped when the replica is half full, so shadows never make a real request wait for room."""
        for served in shadows:
            if self.budget.held * 2 >= self.budget.most:
                telemetry.shadow_comparisons().inc(tags={"version": served.name, "outcome": "skipped"})
                continue
            try:
                record, _ = await self.classify(served, data)
            except Exception as exc:  # a shadow's failure is counted, never answered
                logger.warning("shadow %s failed: %r", served.name, exc)
                telemetry.shadow_comparisons().inc(tags={"version": served.name, "outcome": "failed"})
                continue
            agree = record["label"] == answer["label"]
            telemetry.shadow_comparisons().inc(tags={"version": served.name, "outcome": "agree" if agree else "disagree"})
            if record["cancer_probability"] is not None and answer["cancer_probability"] is not None:
                difference = abs(record["cancer_probability"] - answer["cancer_probability"])
                telemetry.shadow_probability_difference().observe(difference, tags={"version": served.name})

    async def health(self) -> str:
        """The primary's model version once every version answers; Refusal 503 while one does not."""
        try:
            described = await asyncio.gather(*(served.backend.metadata() for served in self.versions.models.values()))
        except Exception as exc:  # a model replica is starting, restarting or gone
            logger.warning("health check: a model did not answer: %r", exc)
            raise Refusal(503, f"model not ready: {type(exc).__name__}") from None
        return described[0]["model_version"]

    async def describe(self) -> dict:
        """The primary's public metadata, and every version with its share of traffic."""
        versions = self.versions
        described = await asyncio.gather(*(served.backend.metadata() for served in versions.models.values()))
        shares = versions.describe()
        return {
            **described[0],
            "versions": {
                name: {**shares[name], **{key: metadata[key] for key in ("model_version", "input_size", "threshold")}}
                for name, metadata in zip(versions.models, described, strict=True)
            },
        }

    def stats(self) -> dict:
        by_version = {name: served.batcher.batch_sizes for name, served in self.versions.models.items()}
        return {
            "batch_sizes": _by_size(sum(by_version.values(), Counter())),
            "batch_sizes_by_version": {name: _by_size(sizes) for name, sizes in by_version.items()},
        }

    def __serve_build_asgi_app__(self):
        """This replica's HTTP app, which Serve asks for after __init__ (skin_ray.serve.routes)."""
        from skin_ray.serve.routes import http_app

        return http_app(self)


# What a SkinModel replica aims for: an Ingress replica sends a version one batch at a time, so one call in
# progress is a busy model replica, and under load each busy Ingress replica gets a model replica of its own.
MODEL_TARGET_ONGOING_REQUESTS = 1


def _replicas(args: ServeSettings, target_ongoing_requests: float) -> dict:
    """A deployment's replica options: a fixed number, or Serve's autoscaling between min and max replicas."""
    if args.max_replicas == args.min_replicas:
        return {"num_replicas": args.min_replicas}
    return {"autoscaling_config": {
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.autoscaling_window_s,
    }}


def app_builder(args: ServeSettings) -> serve.Application:
    """The application in the chosen layout. Entry point for `serve run` and `serve deploy`
    (`import_path: skin_ray.serve:app_builder`); the YAML's deployment options override the defaults above.

    A replica that Serve stops (a redeploy, a scale-down, a deleted app) finishes its requests for up to
    `drain_timeout_s` first."""
    drained = {"graceful_shutdown_timeout_s": args.drain_timeout_s}
    ingress = Ingress.options(**drained, **_replicas(args, args.target_ongoing_requests))
    if args.layout == "fused":
        return ingress.bind(args)
    model = SkinModel.options(**drained, **_replicas(args, MODEL_TARGET_ONGOING_REQUESTS))
    models = {
        name: model.options(name=model_deployment_name(name, index == 0)).bind(bundle, args.runtime)
        for index, (name, bundle) in enumerate(args.versions().items())
    }
    return ingress.bind(args, models)
