"""Where a bundle's forward passes run: in this process (LoadedModel) or in a SkinModel deployment's replica
(RemoteModel, the split layout). Both take uint8 pixel batches and give one prediction record per image."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import PurePosixPath

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from skin_ray.preprocess import to_model_input
from skin_ray.serve.errors import Refusal

logger = logging.getLogger(__name__)

# What GET /model shows of bundle.json: the bundle's version, classes, threshold, figures, input and the runtime
# it carries; not its `training` and `data` sections, which name storage paths, member bundles and the training
# data's location. `runtime_in_use` adds what this replica runs (`keras-float32` where it fell back).
PUBLIC_METADATA = (
    "model_version", "arch", "class_names", "positive_class", "threshold", "target_sensitivity", "metrics",
    "input_size", "preprocessing", "format_version", "created", "package_version", "input_gate", "uncertainty",
    "drift_reference", "runtime",
)


class LoadedModel:
    """A bundle in this process, loaded and traced once.

    Forward passes run on one dedicated thread, so the event loop keeps taking requests (and the decode
    threads keep decoding) while the model computes. Explanations (a forward and a gradient pass each) run on
    a thread of their own, so a batch of predictions never queues behind them; they share the cores instead.
    """

    def __init__(self, bundle: str | None, runtime: str):
        from skin_ray.predictor import Predictor
        from skin_ray.runtime import limit_tensorflow_threads

        limit_tensorflow_threads()
        self.runtime = runtime  # the setting; `predictor.analyse.runtime` is what runs
        self.predictor = Predictor.from_bundle(bundle, runtime)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="skin-ray-model")
        self._explaining = ThreadPoolExecutor(1, thread_name_prefix="skin-ray-explain")
        height, width, channels = self.predictor.metadata.input_size
        self.predictor.predict_pixels(np.zeros((1, height, width, channels), np.uint8))  # trace before traffic
        logger.info("loaded model %s (%s)", self.predictor.model_version, self.predictor.analyse.runtime)

    @property
    def uri(self) -> str:
        return self.predictor.bundle.uri

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        """The prediction record of each image (skin_ray.record.RECORD_FIELDS)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, lambda: self.predictor.records(to_model_input(pixels))
        )

    async def explain(self, pixels: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """One image's prediction record and its Grad-CAM map (None when the input gate refused it)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._explaining, self.predictor.explain, to_model_input(pixels[None])
        )

    async def metadata(self) -> dict:
        """What a caller needs of the bundle's description (PUBLIC_METADATA): not where it was trained from."""
        described = asdict(self.predictor.metadata)
        public = {name: described[name] for name in PUBLIC_METADATA}
        trees = (described.get("data") or {}).get("sources") or []
        return {**named_trees(public, trees), "runtime_in_use": self.predictor.analyse.runtime}


def named_trees(value, trees: list[str]):
    """`value` with each data tree's location, where per-tree figures are keyed by it, replaced by the tree's name
    ("ham10000"): the figures stay, where the training data lives does not leave the service."""
    if isinstance(value, dict):
        return {(PurePosixPath(key).name if key in trees else key): named_trees(item, trees) for key, item in value.items()}
    if isinstance(value, list):
        return [named_trees(item, trees) for item in value]
    return PurePosixPath(value).name if isinstance(value, str) and value in trees else value


def swap_in_place(running: LoadedModel, bundle: str) -> LoadedModel:
    """`bundle` loaded to replace `running` behind the same decoding: refused (ValueError, from bundle.json, before
    a network is loaded) when it takes another input size, since its callers decode to the running one's."""
    from skin_ray.bundle import read_metadata

    size, running_size = read_metadata(bundle).image_size, running.predictor.metadata.image_size
    if size != running_size:
        raise ValueError(f"{bundle} takes {size}-pixel images, the running bundle {running_size}: "
                         "deploy the app anew to change the input size")
    return LoadedModel(bundle, running.runtime)


class RemoteModel:
    """A SkinModel deployment behind the same awaitables as LoadedModel (the split layout).

    A call whose replica dies is made once more (a prediction has no side effects), which Serve routes to
    a live replica or queues until the replacement starts; a second death is a 503.
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
        raise Refusal(503, "the model replica restarted while predicting; retry shortly")
