"""Drift: how far the images a model is sent have moved from those it was validated on.

Each image answered gives a few numbers (its `STATISTICS`): the input gate's `ood_score` and the calibrated
Cancer probability from its prediction record, and cheap statistics of its pixels at the model's input size
(brightness, the red and blue shares of its colour, sharpness) and of its file (megapixels). Each image also
falls in or out of three rates (`RATES`): refused by the input gate, uncertain, labelled Cancer. A bundle
stores these on its validation split (`DriftReference`); the service compares a rolling window of the last
images per version with it (`DriftWindow`), `skin-ray drift` a period of audit lines or classify rows.

A statistic's distance is the two-sample Kolmogorov-Smirnov statistic D (the largest gap between the two
empirical distribution functions, 0 to 1). Chosen over the population stability index because it needs no
bins and its null distribution is known, so the threshold follows from the window's and the reference's sizes
at a chosen false-alarm rate: c(alpha) * sqrt((n + m) / (n m)) with c(alpha) = sqrt(-ln(alpha / 2) / 2)
(PSI's customary 0.1 / 0.25 ignore sample size: a 100-image window of unchanged images reaches them by chance).
A rate's distance is the absolute difference of the window's and the reference's, its threshold the two-sided
two-proportion z-test's at the same alpha. Pure numpy: no TensorFlow, no Ray.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

RECORD_STATISTICS = ("ood_score", "cancer_probability")  # from the prediction record (NaN when it has none)
IMAGE_STATISTICS = ("brightness", "red_share", "blue_share", "sharpness", "megapixels")
STATISTICS = RECORD_STATISTICS + IMAGE_STATISTICS
RATES = ("refused", "uncertain", "cancer")  # refused of the images observed; uncertain and cancer of those accepted
ALPHA = 0.001  # false-alarm rate of one comparison: a window is compared often, and nine ways
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_statistics(pixels: np.ndarray, megapixels: np.ndarray) -> dict[str, np.ndarray]:
    """The `IMAGE_STATISTICS` of a batch of uint8 RGB model inputs (n, s, s, 3) and their files' megapixels:
    brightness (mean luma, 0 to 1), the red and blue shares of all colour, sharpness (log10 of one plus the
    variance of the luma's Laplacian: blur lowers it) and megapixels."""
    values = pixels.astype(np.float32).reshape(len(pixels), -1, 3)
    channels = (np.ones((1, values.shape[1]), np.float32) @ values)[:, 0] / values.shape[1]  # (n, 3): BLAS, not a strided mean
    total = channels.sum(axis=1) + 1e-6
    luma = (values @ LUMA).reshape(pixels.shape[:3])
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:])
    return {
        "brightness": luma.mean(axis=(1, 2)) / 255.0,
        "red_share": channels[:, 0] / total,
        "blue_share": channels[:, 2] / total,
        "sharpness": np.log10(1.0 + laplacian.var(axis=(1, 2))),
        "megapixels": np.asarray(megapixels, dtype=np.float64),
    }


def one_image_statistics(pixels: np.ndarray, megapixels: float) -> dict[str, float]:
    """`image_statistics` of one image (s, s, 3), as plain numbers (what an audit line holds)."""
    return {name: float(values[0]) for name, values in image_statistics(pixels[None], np.array([megapixels])).items()}


@dataclass(frozen=True)
class Observations:
    """Images as columns: each statistic (NaN where an image has none, e.g. the Cancer probability of a refused
    image) and each rate's flag (NaN where it does not apply)."""

    values: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.flags["refused"])

    @classmethod
    def of_arrays(
        cls, ood_score: np.ndarray, cancer_probability: np.ndarray, refused: np.ndarray, uncertain: np.ndarray,
        cancer: np.ndarray, image: dict[str, np.ndarray],
    ) -> Observations:
        """Images judged by the input gate (`refused`), with the model's answer for the others: the Cancer
        probability, label and uncertainty of a refused image do not count."""
        refused = np.asarray(refused, dtype=np.float64)
        accepted = lambda values: np.where(refused == 0, np.asarray(values, dtype=np.float64), np.nan)  # noqa: E731
        return cls(
            values={"ood_score": np.asarray(ood_score, dtype=np.float64), "cancer_probability": accepted(cancer_probability),
                    **{name: np.asarray(image[name], dtype=np.float64) for name in IMAGE_STATISTICS}},
            flags={"refused": refused, "uncertain": accepted(uncertain), "cancer": accepted(cancer)},
        )

    @classmethod
    def of(cls, records: list[dict], image: dict[str, np.ndarray], positive_class: str) -> Observations:
        """Prediction `records` of decoded images (None where a record has no value: no gate, no margin) and
        their `image_statistics`."""
        column = lambda field: np.array([np.nan if r[field] is None else float(r[field]) for r in records])  # noqa: E731
        return cls.of_arrays(
            ood_score=column("ood_score"), cancer_probability=column("cancer_probability"),
            refused=[record["in_distribution"] is False for record in records], uncertain=column("uncertain"),
            cancer=[np.nan if record["label"] is None else record["label"] == positive_class for record in records],
            image=image,
        )

    @classmethod
    def concatenate(cls, parts: list[Observations]) -> Observations:
        return cls(
            values={name: np.concatenate([part.values[name] for part in parts]) for name in STATISTICS},
            flags={name: np.concatenate([part.flags[name] for part in parts]) for name in RATES},
        )


@dataclass(frozen=True)
class DriftReference:
    """A bundle's validation split as drift compares with it: each statistic's values (sorted, without NaN)
    and each rate."""

    samples: dict[str, np.ndarray]
    rates: dict[str, float]
    counts: dict[str, int]  # how many images each rate was measured on

    @classmethod
    def of(cls, observations: Observations) -> DriftReference:
        samples = {name: np.sort(values[~np.isnan(values)]) for name, values in observations.values.items()}
        known = {name: flags[~np.isnan(flags)] for name, flags in observations.flags.items()}
        return cls(samples, {name: float(flags.mean()) if len(flags) else 0.0 for name, flags in known.items()},
                   {name: len(flags) for name, flags in known.items()})

    def arrays(self) -> dict[str, np.ndarray]:
        """What the bundle's drift_reference.npz holds: float64, as windows are compared (a float32 copy of a
        constant differs from it, and KS calls that a total shift)."""
        return {name: values.astype(np.float64) for name, values in self.samples.items()}

    def describe(self) -> dict:
        """bundle.json's `drift_reference`: how drift is measured, and the reference's rates and sizes."""
        return {
            "method": "two-sample Kolmogorov-Smirnov D per statistic, two-proportion z-test per rate, at alpha "
            f"{ALPHA}; reference: the validation split",
            "alpha": ALPHA,
            "images": {name: len(values) for name, values in self.samples.items()},
            "rates": self.rates,
            "rate_images": self.counts,
        }

    @classmethod
    def load(cls, arrays, description: dict) -> DriftReference:
        return cls({name: np.asarray(arrays[name], dtype=np.float64) for name in STATISTICS},
                   dict(description["rates"]), dict(description["rate_images"]))


def ks_distance(window: np.ndarray, reference_sorted: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic of `window` and a sorted, non-empty reference."""
    window = np.sort(window)
    points = np.concatenate([window, reference_sorted])
    gaps = (np.searchsorted(window, points, side="right") / len(window)
            - np.searchsorted(reference_sorted, points, side="right") / len(reference_sorted))
    return float(np.abs(gaps).max())


def ks_threshold(n: int, m: int, alpha: float = ALPHA) -> float:
    """The D beyond which two samples of sizes `n` and `m` differ at false-alarm rate `alpha` (asymptotic)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def rate_threshold(rate: float, n: int, reference_rate: float, m: int, alpha: float = ALPHA) -> float:
    """The difference of two proportions beyond which they differ at `alpha` (two-sided z-test, pooled)."""
    pooled = (rate * n + reference_rate * m) / (n + m)
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    return z * math.sqrt(max(pooled * (1 - pooled), 1.0 / (n + m)) * (1 / n + 1 / m))


def compare(observations: Observations, reference: DriftReference) -> dict[str, dict]:
    """Per statistic and rate with data on both sides: `distance`, `threshold`, `drifted`, `images` (and for a
    rate the window's `rate` and the `reference_rate`)."""
    report = {}
    for name in STATISTICS:
        values = observations.values[name]
        values = values[~np.isnan(values)]
        if len(values) and len(reference.samples[name]):
            distance = ks_distance(values, reference.samples[name])
            threshold = ks_threshold(len(values), len(reference.samples[name]))
            report[name] = {"distance": distance, "threshold": threshold, "drifted": distance > threshold, "images": len(values)}
    for name in RATES:
        flags = observations.flags[name]
        flags = flags[~np.isnan(flags)]
        if len(flags) and reference.counts[name]:
            rate, expected = float(flags.mean()), reference.rates[name]
            threshold = rate_threshold(rate, len(flags), expected, reference.counts[name])
            distance = abs(rate - expected)
            report[name] = {"distance": distance, "threshold": threshold, "drifted": distance > threshold,
                            "images": len(flags), "rate": rate, "reference_rate": expected}
    return report


class DriftWindow:
    """The last `size` images one version answered, compared with its bundle's reference. Requests add to it
    and a publisher compares it from another thread."""

    def __init__(self, reference: DriftReference, size: int, positive_class: str):
        self.reference, self.positive_class = reference, positive_class
        self._images: deque[Observations] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.observed = 0  # images ever added: whether the window changed since it was last compared

    def __len__(self) -> int:
        return len(self._images)

    def observe(self, record: dict, image: dict[str, float]) -> None:
        """Add one image: its prediction record and `image_statistics`."""
        observation = Observations.of([record], {name: np.array([value]) for name, value in image.items()}, self.positive_class)
        with self._lock:
            self._images.append(observation)
            self.observed += 1

    def compare(self) -> dict[str, dict]:
        with self._lock:
            images = list(self._images)
        return compare(Observations.concatenate(images), self.reference) if images else {}
