"""How well a bundle's input gate keeps out images that are not dermoscopy, how much dermoscopy it lets through,
and what it costs; before (the previous gate) and after (the bundle's).

    python benchmarks/ood.py [--bundle BUNDLE] [--data DIR]

Refused, per kind, with its 95% interval (Wilson), on images the gate was not fitted on:
- every kind of `skin_ray.gate_images.NOT_DERMOSCOPY`, generated from another seed than the fit's;
- kinds no gate is fitted on (`skin_ray.testing.never_fitted_kinds`: microscopy and retina, faces), and the
  validation images heavily blurred or cropped to a corner of skin;
- leave one kind out: each kind of the fit refused by a gate fitted without it (`fit_input_gate`'s figures).
Accepted: the validation split as is, and re-photographed as by another clinic (benchmarks/robustness.py's
conditions, which the gate's fit does not use). "Before" is the previous gate, re-fitted here: the Mahalanobis
distance of the classifier's input to the nearer class mean, fitted on the training split and its zoomed-out
views, its threshold keeping 95% of validation. Cost: the analysis (forward pass, pooled stages, image evidence)
against the network's forward pass alone, alternating, and the gate's scoring, per image. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time

import numpy as np
import tensorflow as tf
from PIL import Image, ImageFilter
from robustness import CONDITIONS  # noqa: E402  (this script's folder is on the path)

from skin_ray import storage  # noqa: E402
from skin_ray.finalize import bundle_split, safeguard_inputs, split_pixel_datasets  # noqa: E402
from skin_ray.gate_images import NOT_DERMOSCOPY, images_of, model_pixels  # noqa: E402
from skin_ray.predictor import Predictor  # noqa: E402
from skin_ray.preprocess import to_model_input  # noqa: E402
from skin_ray.runtime import init_ray  # noqa: E402
from skin_ray.safeguards import GATE_TPR, ClassDistance, GateInputs, fit_input_gate  # noqa: E402
from skin_ray.testing import never_fitted_kinds  # noqa: E402


def wilson(share: float, n: int) -> list[float]:
    """The 95% Wilson score interval of a share of n."""
    z = 1.96
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def figure(share: float, n: int) -> dict:
    return {"n": n, "share": round(share, 3), "ci95": wilson(share, n)}


def figure_of(flags: np.ndarray) -> dict:
    return figure(float(np.mean(flags)), len(flags))


class PreviousGate:
    """The gate before this one: one Mahalanobis distance on the classifier's input (the last stage's channel means)."""

    def __init__(self, dermoscopy: GateInputs, labels: np.ndarray, groups: np.ndarray, validation: GateInputs, members: int):
        # Each image's views come in order: as is, zoomed out, re-photographed (new with this gate).
        occurrence, counts = np.zeros(len(groups), dtype=int), {}
        for row, group in enumerate(groups):
            occurrence[row] = counts.get(group, 0)
            counts[group] = occurrence[row] + 1
        original_and_zoomed = occurrence < 2
        self.members = members
        self.distance = ClassDistance.fit(self.features(dermoscopy)[original_and_zoomed], labels[original_and_zoomed])
        self.threshold = float(np.quantile(self.scores(validation), GATE_TPR))

    def features(self, inputs: GateInputs) -> np.ndarray:
        last = inputs.depths[-1]  # each member's [channel means, channel deviations]
        blocks = np.split(last, self.members, axis=1)
        return np.concatenate([block[:, : block.shape[1] // 2] for block in blocks], axis=1)

    def scores(self, inputs: GateInputs) -> np.ndarray:
        return self.distance(self.features(inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle (default: the shipped one)")
    parser.add_argument("--data", nargs="+", help="the bundle's labelled image trees, if they moved since it was trained")
    args = parser.parse_args()
    init_ray()
    predictor = Predictor.from_bundle(args.bundle)
    gate, metadata, model = predictor.bundle.gate, predictor.metadata, predictor.bundle.model
    if gate is None:
        raise SystemExit(f"{predictor.bundle.uri} has no input gate; run `skin-ray fit-safeguards` on it first")
    split = bundle_split(predictor.bundle, args.data)
    inputs = safeguard_inputs(model, metadata.positive_index, *split_pixel_datasets(split, metadata.input_spec))
    members = max(1, sum(layer.name.startswith("member_") for layer in model.layers))
    before = PreviousGate(inputs.dermoscopy, inputs.train_labels, inputs.groups, inputs.validation, members)
    _, fit_figures = fit_input_gate(
        inputs.dermoscopy, inputs.train_labels, inputs.groups, inputs.outliers, inputs.kinds, inputs.validation
    )

    def gate_inputs(images: list[Image.Image]) -> GateInputs:
        pixels = to_model_input(model_pixels(images, metadata.image_size))
        return GateInputs.concatenate([predictor.analyse(pixels[i : i + 64]).gate_inputs for i in range(0, len(pixels), 64)])

    validation = [Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB") for path in split.validation.paths]
    rng = np.random.default_rng(7)
    lesions = model_pixels(validation[:64], metadata.image_size)
    kinds = {kind: images_of(kind, 7, lesions) for kind in NOT_DERMOSCOPY}
    kinds.update(never_fitted_kinds(rng))
    kinds["validation images, heavily blurred"] = [image.filter(ImageFilter.GaussianBlur(12)) for image in validation[:200]]
    side = validation[0].size[0] // 4
    kinds["validation images, cropped to skin"] = [image.crop((0, 0, side, side)) for image in validation[:200]]
    refused = {}
    for kind, images in kinds.items():
        seen = gate_inputs(images)
        refused[kind] = {
            "after": figure_of(gate.scores(seen) > gate.threshold), "before": figure_of(before.scores(seen) > before.threshold)
        }
        if kind in fit_figures:
            refused[kind]["after, left out of the fit"] = figure(fit_figures[kind]["refused_left_out"], fit_figures[kind]["n"])
    accepted = {}
    for name, condition in {"as is": None, **CONDITIONS}.items():
        seen = inputs.validation if condition is None else gate_inputs([condition(image) for image in validation])
        accepted[f"validation, {name}"] = {
            "after": figure_of(gate.scores(seen) <= gate.threshold), "before": figure_of(before.scores(seen) <= before.threshold)
        }
    print(json.dumps({
        "model": predictor.model_version, "gate_threshold": gate.threshold, "refused": refused, "accepted": accepted,
        "cost_ms_per_image": cost(predictor, to_model_input(lesions)),
    }, indent=1))


def cost(predictor: Predictor, images: np.ndarray, rounds: int = 5) -> dict:
    """Milliseconds per image, batches of 64: the analysis every prediction makes against the network's forward pass
    alone (alternating, the medians of `rounds`), and scoring the gate on the analysis."""
    model = predictor.bundle.model
    signature = [tf.TensorSpec([None, *images.shape[1:]], tf.float32)]
    forward = tf.function(lambda x: model(x, training=False), input_signature=signature)
    batch = tf.convert_to_tensor(images)
    forward(batch), predictor.analyse(images)
    timings = {"forward pass": [], "analysis": [], "gate scoring": []}
    for _ in range(rounds):
        start = time.perf_counter()
        forward(batch).numpy()
        timings["forward pass"].append(time.perf_counter() - start)
        start = time.perf_counter()
        analysis = predictor.analyse(images)
        timings["analysis"].append(time.perf_counter() - start)
        start = time.perf_counter()
        predictor.bundle.gate.scores(analysis.gate_inputs)
        timings["gate scoring"].append(time.perf_counter() - start)
    per_image = {name: 1000 * float(np.median(values)) / len(images) for name, values in timings.items()}
    per_image["added by the gate"] = per_image["analysis"] - per_image["forward pass"] + per_image["gate scoring"]
    return {name: round(value, 3) for name, value in per_image.items()}


if __name__ == "__main__":
    main()
