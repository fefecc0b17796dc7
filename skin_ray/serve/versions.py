"""The model versions one Ingress serves: each a ServedModel (a bundle, its input size, where it runs, its
batcher), and the traffic rule that picks the version answering a request and those shadowing it."""

import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from skin_ray.drift import DriftWindow
from skin_ray.serve.backends import LoadedModel, RemoteModel
from skin_ray.serve.batching import Batcher
from skin_ray.serve.errors import Refusal


@dataclass
class ServedModel:
    """One version: what belongs together to answer with one bundle."""

    name: str
    bundle: str | None  # as configured (None: the shipped model)
    image_size: int  # what uploads for it are decoded to
    class_names: list[str]  # in the order of its probabilities
    backend: LoadedModel | RemoteModel
    batcher: Batcher
    drift: DriftWindow | None  # None: its bundle has no drift reference, or drift_window is 0

    async def classify(self, decode: Callable[[int], Awaitable[np.ndarray]]) -> dict:
        """The prediction record of the image `decode(size)` gives, from the batch it joins."""
        return await self.batcher.classify(lambda: decode(self.image_size))


def _sticky_point(caller: str) -> float:
    """Where in [0, 1) a caller falls, the same in every replica and every process (Python's hash is not)."""
    digest = hashlib.blake2b(caller.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Versions:
    """The served versions (primary first) with the traffic rule in force: replaced as a whole on a redeploy, so
    a request sees one consistent set."""

    def __init__(self, models: dict[str, ServedModel], weights: dict[str, float], shadow: dict[str, float]):
        self.models, self.weights, self.shadow = models, weights, shadow
        self.primary = next(iter(models))

    def answering(self, pinned: str | None, caller: str | None) -> ServedModel:
        """The version that answers: the one `pinned` (X-Model-Version), else one drawn by weight, the same for a
        caller each time (by its name or X-Client-ID; a request of no known caller is drawn at random)."""
        if pinned is not None:
            if pinned not in self.models:
                raise Refusal(404, f"no model version {pinned!r}; this service has {', '.join(self.models)}")
            return self.models[pinned]
        point = _sticky_point(caller) if caller else random.random()
        total = sum(self.weights.values())
        for name, weight in self.weights.items():
            point -= weight / total
            if point < 0:
                return self.models[name]
        return self.models[name]  # float rounding at the very end of the range

    def shadowing(self) -> list[ServedModel]:
        """The versions to be sent a copy of this request: each by the chance of its share."""
        return [self.models[name] for name, share in self.shadow.items() if random.random() * 100 < share]

    def describe(self) -> dict[str, dict]:
        """Each version's share of traffic, for GET /model."""
        return {
            name: {"primary": name == self.primary, "traffic_percent": self.weights.get(name, 0.0),
                   "shadow_percent": self.shadow.get(name, 0.0)}
            for name in self.models
        }

