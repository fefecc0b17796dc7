"""What a prediction needs before a clinician can rely on it: an input gate and an uncertainty flag.

Both are fitted on a bundle's own content-hash split when the bundle is made, recorded in the bundle, and
applied to every prediction by `Predictor.records`:

- **Input gate**: whether an image is dermoscopy at all. It weighs several signals, each cheap given the
  forward pass the prediction makes anyway:
  - at each depth of the network (every stage's output, pooled to its mean and standard deviation per channel),
    the Mahalanobis distance to the nearer class mean with one shrunk covariance shared by the classes (Lee et
    al., 2018): early depths see texture and scale (a clinical photo's skin is not a dermatoscope's), the last
    what the classifier sees;
  - image evidence (`IMAGE_EVIDENCE`): colour saturation, grey pixels, the dermatoscope's dark rim, skin-tone
    cover, flat synthetic regions, edges, white, contrast, shading and a darker middle (the lesion a dermatoscope
    frames), and how far they stray from the range of dermoscopy.
  A logistic head (`GateHead`) weighs them, fitted to tell the training split's images (as is, zoomed out as
  in training, re-photographed, as another device gives them: skin_ray.gate_images) from images that are not
  dermoscopy, generated and, when given, real ones (outlier exposure; Hendrycks et al., 2019). The Mahalanobis
  distances of the training images come from the other half of the split (cross-fitted), as a new image's would.
  Its score is the head's log-odds of "not dermoscopy"; the threshold keeps `GATE_TPR` of the validation images,
  past it the label is withheld. Softmax confidence would not do: the model is confident on photos of cats
  (Pacheco et al., 2020).
- **Uncertainty**: a prediction is uncertain when its calibrated log-odds lie within `margin` of the
  decision threshold's, or when an ensemble's members disagree on the label. The margin is the smallest
  for which the validation predictions left certain reach `CERTAIN_ACCURACY`. It needs nothing but the
  calibrated probability, so a single network gets it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from skin_ray import classifier_stats

GATE_TPR = 0.95  # share of in-distribution (validation) images the gate must let through
CERTAIN_ACCURACY = 0.95  # accuracy the predictions not flagged uncertain must reach on validation
SHRINKAGE = 0.1  # of each covariance towards its mean variance: ~6,000 views estimate up to 1,024 dimensions poorly
HEAD_L2 = 10.0  # ridge penalty of the head on standardised signals: a few strong weights, not many fitted ones
EVIDENCE_RANGE = (0.005, 0.995)  # quantiles of the training images' evidence: the range dermoscopy stays in
IMAGE_EVIDENCE = (
    "saturation", "grey_share", "dark_rim", "skin_share", "flat_share", "edge_share", "white_share", "detail",
    "contrast", "shading", "darker_middle",
)


def image_evidence(images):
    """(n, len(IMAGE_EVIDENCE)) statistics of model-input images ((n, s, s, 3) in [0, 1]).

    In Keras operations, so the prediction path computes them inside the network's traced forward pass, and on
    the image halved (2x2 means): reductions across the three channels cost more than the rest together."""
    from keras import ops

    images = ops.average_pool(images, 2, 2)
    size = images.shape[1]
    share = lambda condition: ops.mean(ops.cast(condition, "float32"), axis=(1, 2))  # noqa: E731
    brightest, darkest = ops.max(images, axis=-1), ops.min(images, axis=-1)
    saturation = (brightest - darkest) / (brightest + 1e-3)
    yy, xx = (np.mgrid[0:size, 0:size] / (size - 1) - 0.5) ** 2
    radius = xx + yy  # squared, from the centre
    rim, ring, middle = (radius > 0.25), (radius > 0.09) & (radius <= 0.25), radius <= 0.09  # outside the circle; inside
    mean_in = lambda values, area: ops.sum(values * area.astype(np.float32), axis=(1, 2)) / area.sum()  # noqa: E731
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    skin = (red > green) & (green > blue) & (red - blue > 0.06) & (red > 0.2)  # a wide hue band, any skin tone
    whole = brightest[:, : size - size % 5, : size - size % 5]  # whole blocks of 5 (10 pixels of the input)
    blocks = ops.reshape(whole, (-1, size // 5, 5, size // 5, 5))
    laplacian = ops.abs(4 * brightest[:, 1:-1, 1:-1] - brightest[:, :-2, 1:-1] - brightest[:, 2:, 1:-1]
                        - brightest[:, 1:-1, :-2] - brightest[:, 1:-1, 2:])
    fifths = ops.mean(ops.reshape(whole, (-1, 5, size // 5, 5, size // 5)), axis=(2, 4))
    return ops.stack([
        ops.mean(saturation, axis=(1, 2)),
        share(saturation < 0.08),
        mean_in(brightest, rim) - mean_in(brightest, middle),
        share(skin),
        share(ops.std(blocks, axis=(2, 4)) < 0.004),  # blocks of 10x10 pixels varying by about a grey level
        share(laplacian > 0.25),
        share(darkest > 0.92),
        ops.mean(laplacian, axis=(1, 2)),
        ops.std(brightest, axis=(1, 2)),
        ops.std(fifths[:, 1:4, 1:4], axis=(1, 2)),  # uneven light across the middle: a body's curve, a lamp
        mean_in(brightest, ring) - mean_in(brightest, middle),  # a lesion in the middle, as a dermatoscope frames it
    ], axis=1)


@dataclass(frozen=True)
class GateInputs:
    """What the input gate looks at for a batch of images: pooled features at each depth of the network (one
    (n, d_k) array per depth) and `image_evidence`."""

    depths: tuple[np.ndarray, ...]
    evidence: np.ndarray

    def __len__(self) -> int:
        return len(self.evidence)

    def take(self, rows) -> GateInputs:
        return GateInputs(tuple(depth[rows] for depth in self.depths), self.evidence[rows])

    @staticmethod
    def concatenate(parts: list[GateInputs]) -> GateInputs:
        depths = tuple(np.concatenate(arrays) for arrays in zip(*(part.depths for part in parts), strict=True))
        return GateInputs(depths, np.concatenate([part.evidence for part in parts]))


@dataclass(frozen=True)
class ClassDistance:
    """Squared Mahalanobis distance to the nearer class mean, with one covariance shared by the classes."""

    means: np.ndarray  # (classes, features)
    precision: np.ndarray  # (features, features), the inverse of the shared covariance

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> ClassDistance:
        features = features.astype(np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        residuals = features - means[np.searchsorted(classes, labels)]
        covariance = residuals.T @ residuals / max(1, len(features) - len(classes))
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        # float32 halves the bundle's share; thresholds are set with what is stored.
        return cls(means.astype(np.float32), np.linalg.inv(covariance).astype(np.float32))

    @functools.cached_property
    def _precision64(self) -> np.ndarray:
        """The stored precision widened once, not on every batch (the widest is 1,024 x 1,024)."""
        return self.precision.astype(np.float64)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        classes, width = self.means.shape
        centred = (features[:, None, :].astype(np.float64) - self.means[None]).reshape(-1, width)
        return ((centred @ self._precision64) * centred).sum(axis=1).reshape(-1, classes).min(axis=1)


@dataclass(frozen=True)
class GateHead:
    """A logistic regression on standardised signals; `__call__` gives the log-odds of "not dermoscopy"."""

    centre: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # one per signal, then the intercept

    @classmethod
    def fit(cls, inside: np.ndarray, outside: np.ndarray, outside_kinds: np.ndarray, iterations: int = 50) -> GateHead:
        """Newton's method on the ridge-penalised log-loss, both sides weighted to count equally, and within the
        outside each kind (`outside_kinds`) alike: 300 everyday photos must not drown 60 flat colours."""
        signals = np.concatenate([inside, outside]).astype(np.float64)
        target = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        _, kind_index, kind_sizes = np.unique(outside_kinds, return_inverse=True, return_counts=True)
        per_kind = 1.0 / (len(kind_sizes) * kind_sizes[kind_index])  # sums to 1 over the outside
        weight = np.r_[np.full(len(inside), len(target) / (2 * len(inside))), per_kind * len(target) / 2]
        centre, scale = signals.mean(axis=0), signals.std(axis=0) + 1e-9
        design = np.c_[(signals - centre) / scale, np.ones(len(signals))]
        penalty = HEAD_L2 * np.diag(np.r_[np.ones(design.shape[1] - 1), 0.0])  # the intercept goes free
        coefficients = np.zeros(design.shape[1])
        for _ in range(iterations):
            p = classifier_stats.sigmoid(design @ coefficients)
            hessian = design.T @ (design * (weight * p * (1 - p))[:, None]) + penalty
            step = np.linalg.solve(hessian, design.T @ (weight * (p - target)) + penalty @ coefficients)
            coefficients -= step
            if np.abs(step).max() < 1e-9:
                break
        return cls(centre, scale, coefficients)

    def __call__(self, signals: np.ndarray) -> np.ndarray:
        return (signals - self.centre) / self.scale @ self.weights[:-1] + self.weights[-1]


@dataclass(frozen=True)
class InputGate:
    depths: tuple[ClassDistance, ...]
    evidence_range: np.ndarray  # (3, len(IMAGE_EVIDENCE)): low, high, spread (the interquartile range)
    head: GateHead
    threshold: float  # largest accepted score

    def scores(self, inputs: GateInputs) -> np.ndarray:
        return self.head(_signals(self.depths, self.evidence_range, inputs))

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"evidence_range": self.evidence_range, "head_centre": self.head.centre, "head_scale": self.head.scale,
                  "head_weights": self.head.weights}
        for index, depth in enumerate(self.depths):
            arrays[f"depth{index}_means"], arrays[f"depth{index}_precision"] = depth.means, depth.precision
        return arrays

    @classmethod
    def from_arrays(cls, arrays, threshold: float) -> InputGate:
        count = sum(1 for name in arrays if name.endswith("_precision"))
        depths = tuple(ClassDistance(arrays[f"depth{i}_means"], arrays[f"depth{i}_precision"]) for i in range(count))
        head = GateHead(arrays["head_centre"], arrays["head_scale"], arrays["head_weights"])
        return cls(depths, arrays["evidence_range"], head, threshold)


GENERATED = "generated"  # the source of the outliers skin_ray.gate_images draws


def fit_input_gate(
    dermoscopy: GateInputs, labels: np.ndarray, groups: np.ndarray, outliers: GateInputs, kinds: np.ndarray,
    validation: GateInputs, sources: np.ndarray | None = None,
) -> tuple[InputGate, dict[str, dict]]:
    """The gate from the training split's views (`dermoscopy`, with class `labels`; views of one image share
    its `groups` entry), images that are not dermoscopy (`outliers`, of `kinds`, from `sources`: GENERATED or where
    a real one came from), and the validation split (the threshold); and per kind of outlier, its count, the share
    refused and the share refused by a gate fitted without that kind (leave one kind out: how the gate does on a
    kind it never saw). A kind of real images also gets the share refused by gates each fitted without one of its
    sources (leave one source out: how it does on images from somewhere else), with 95% intervals."""
    depths = tuple(ClassDistance.fit(features, labels) for features in dermoscopy.depths)
    spread = np.subtract(*np.quantile(dermoscopy.evidence, [0.75, 0.25], axis=0)) + 1e-3
    evidence_range = np.stack([*np.quantile(dermoscopy.evidence, EVIDENCE_RANGE, axis=0), spread])
    # Each half of the training images measured by distances fitted on the other half, as new images are.
    half = np.isin(groups, np.unique(groups)[::2])
    inside = np.empty((len(dermoscopy), len(depths) + 1 + dermoscopy.evidence.shape[1]))
    for rows in (half, ~half):
        other = dermoscopy.take(~rows)
        fold = tuple(ClassDistance.fit(features, labels[~rows]) for features in other.depths)
        inside[rows] = _signals(fold, evidence_range, dermoscopy.take(rows))
    outside, accepted = _signals(depths, evidence_range, outliers), _signals(depths, evidence_range, validation)
    real = np.zeros(len(kinds), dtype=bool) if sources is None else sources != GENERATED
    # Real outliers show the head kinds far only in the features; generated ones alone need the stand-ins. Beside
    # real ones they cost another clinic's dermoscopy (Derm7pt) 15 points of acceptance: the head then weighs
    # the distances beyond what the real outliers ask for.
    beyond = inside[:0] if real.any() else _beyond_one_distance(inside, len(depths) + 1)
    beyond_kinds = np.full(len(beyond), "beyond one distance")

    def head_and_threshold(fitted_on: np.ndarray) -> tuple[GateHead, float]:
        head = GateHead.fit(inside, np.concatenate([outside[fitted_on], beyond]), np.r_[kinds[fitted_on], beyond_kinds])
        return head, float(np.quantile(head(accepted), GATE_TPR))

    head, threshold = head_and_threshold(np.ones(len(outside), dtype=bool))
    figures = {}
    for kind in np.unique(kinds):
        own = kinds == kind
        left_out, left_out_threshold = head_and_threshold(~own)
        figures[str(kind)] = {
            "n": int(own.sum()),
            "refused": float(np.mean(head(outside[own]) > threshold)),
            "refused_left_out": float(np.mean(left_out(outside[own]) > left_out_threshold)),
        }
    refused_elsewhere = np.zeros(len(kinds), dtype=bool)
    for source in np.unique(sources[real]) if real.any() else ():
        own = sources == source
        left_out, left_out_threshold = head_and_threshold(~own)
        refused_elsewhere[own] = left_out(outside[own]) > left_out_threshold
    for kind in np.unique(kinds[real]):
        own = kinds == kind
        refused = int(np.sum(head(outside[own]) > threshold))
        figures[str(kind)].update(
            refused_ci95=classifier_stats.wilson_interval(refused, int(own.sum())),
            sources=int(len(np.unique(sources[own]))),
            refused_left_out_source=float(refused_elsewhere[own].mean()),
            refused_left_out_source_ci95=classifier_stats.wilson_interval(int(refused_elsewhere[own].sum()), int(own.sum())),
        )
    return InputGate(depths, evidence_range, head, threshold), figures


def _signals(depths: tuple[ClassDistance, ...], evidence_range: np.ndarray, inputs: GateInputs) -> np.ndarray:
    """What the gate's head weighs: the log distance at each depth, how far the evidence strays out of its range
    (in spreads, summed over the statistics), and the evidence itself."""
    low, high, spread = evidence_range
    outside = (np.maximum(low - inputs.evidence, 0) + np.maximum(inputs.evidence - high, 0)) / spread
    distances = [np.log(distance(features) + 1e-9) for distance, features in zip(depths, inputs.depths, strict=True)]
    return np.column_stack([*distances, np.log1p(outside.sum(axis=1)), inputs.evidence])


def _beyond_one_distance(inside: np.ndarray, distances: int, per_signal: int = 100) -> np.ndarray:
    """Dermoscopy's signals with one distance (of the first `distances` columns) moved past the largest seen on
    dermoscopy: outliers of no kind, which keep the head weighing every distance (fitted only on kinds that show
    in the evidence, it would learn to ignore the distances, and let a kind far only in features through)."""
    rng = np.random.default_rng(0)
    moved = []
    for column in range(distances):
        rows = inside[rng.choice(len(inside), min(per_signal, len(inside)), replace=False)].copy()
        spread = np.subtract(*np.quantile(inside[:, column], [0.75, 0.25]))
        rows[:, column] = inside[:, column].max() + rng.uniform(0.5, 3.0, len(rows)) * spread
        moved.append(rows)
    return np.concatenate(moved)


def uncertainty_margin(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float, members_disagree: np.ndarray) -> float:
    """The smallest log-odds margin around the threshold leaving certain predictions CERTAIN_ACCURACY accurate."""
    distance = distance_to_threshold(p_cancer, threshold)
    correct = (p_cancer >= threshold) == (y_true == 1)
    for margin in np.unique(np.concatenate([[0.0], distance])):
        certain = (distance >= margin) & ~members_disagree
        if certain.any() and correct[certain].mean() >= CERTAIN_ACCURACY:
            return classifier_stats.below(margin, distance)  # a cut between two cases, not at one
    return float(distance.max())


def is_uncertain(p_cancer: np.ndarray, threshold: float, margin: float, members_disagree: np.ndarray) -> np.ndarray:
    return (distance_to_threshold(p_cancer, threshold) < margin) | members_disagree


def distance_to_threshold(p_cancer: np.ndarray, threshold: float) -> np.ndarray:
    """What the uncertainty margin is measured on: each calibrated log-odds' distance to the threshold's."""
    return np.abs(classifier_stats.log_odds(p_cancer) - classifier_stats.log_odds(threshold))


def members_disagree(member_cancer: np.ndarray | None, threshold: float, count: int) -> np.ndarray:
    """Whether an ensemble's members (columns of `member_cancer`) call different labels; all False for a
    single network (None)."""
    if member_cancer is None:
        return np.zeros(count, dtype=bool)
    calls = member_cancer >= threshold
    return calls.any(axis=1) & ~calls.all(axis=1)


def describe(
    gate: InputGate, outlier_figures: dict[str, dict], margin: float, y_true: np.ndarray, p_cancer: np.ndarray,
    threshold: float, disagree: np.ndarray,
) -> tuple[dict, dict]:
    """bundle.json's `input_gate` and `uncertainty`: what was fitted, how, and its figures (validation; per kind
    of image that is not dermoscopy, from `fit_input_gate`)."""
    flagged = is_uncertain(p_cancer, threshold, margin, disagree)
    correct = (p_cancer >= threshold) == (y_true == 1)
    input_gate = {
        "method": "logistic head on the Mahalanobis distance at each depth of the network (stage outputs pooled to "
        f"channel means and deviations, shared covariance shrunk by {SHRINKAGE}) and on image evidence "
        f"({', '.join(IMAGE_EVIDENCE)}); fitted on the training split as is, zoomed out, re-photographed and as another "
        "device gives it, against images that are not dermoscopy, generated (skin_ray.gate_images) and, where given, "
        "real (skin_ray.real_outliers), each kind weighted alike",
        "threshold": gate.threshold,
        "validation_tpr": GATE_TPR,
        "not_dermoscopy": outlier_figures,
    }
    uncertainty = {
        "method": "calibrated log-odds within `margin` of the threshold's, or ensemble members calling different labels",
        "margin": margin,
        "validation": {
            "flagged": float(flagged.mean()),
            "certain_accuracy": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "certain_accuracy_target": CERTAIN_ACCURACY,
            "accuracy": float(correct.mean()),
            "members_disagree": float(disagree.mean()),
        },
    }
    return input_gate, uncertainty
