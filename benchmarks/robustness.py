"""How a model holds up on another clinic's photos, simulated on its own validation split.

    python benchmarks/robustness.py [--bundle BUNDLE ...] [--data DIR]

The other clinic's photos are larger, frame the lesion smaller and come from other cameras. No such photos
are used here (nothing is tuned to them): each validation image of the bundle's own split is re-photographed
in three ways and scored through the real path (JPEG bytes -> the bundle's preprocessing -> model):
- wider_field: the dermoscopic crop shrunk to 40% of the short side of a 1600x1200 photo, surrounded by
  its own border colour with a soft edge (larger photo, lesion smaller in the frame);
- camera_colour: another white balance, exposure and tone curve (per-channel gains, then a gamma of 0.8);
- both.
Prints one JSON line per model: ROC AUC per condition with its 95% interval, its ratio to the unchanged
images, the ECE of the unchanged images (as calibrated, and cross-fitted on content-hash halves) and, for
every model after the first trained on the same split, the paired 95% intervals of its AUC minus the first
model's (an interval that excludes 0 is a real difference on these images) and of its ECE minus the first
model's (bootstrap).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from skin_ray import classifier_stats, storage  # noqa: E402
from skin_ray.calibration import content_fold, crossfit_ece  # noqa: E402
from skin_ray.data import discover, split_by_content  # noqa: E402
from skin_ray.predictor import Predictor  # noqa: E402
from skin_ray.preprocess import InputSpec, to_model_input  # noqa: E402
from skin_ray.runtime import init_ray  # noqa: E402
from skin_ray.testing import (
    Locations,  # noqa: E402
    encode,  # noqa: E402
)

PHOTO_SIZE = (1600, 1200)
LESION_FRACTION = 0.4
CAMERA_GAINS = np.array([1.12, 0.97, 0.80])  # a warm white balance
CAMERA_EXPOSURE = 0.85
CAMERA_GAMMA = 0.8


def wider_field(image: Image.Image) -> Image.Image:
    side = int(min(PHOTO_SIZE) * LESION_FRACTION)
    lesion = image.resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    border = np.concatenate([pixels[:8], pixels[-8:], pixels[:, :8].swapaxes(0, 1), pixels[:, -8:].swapaxes(0, 1)])
    photo = Image.new("RGB", PHOTO_SIZE, tuple(int(v) for v in np.median(border.reshape(-1, 3), axis=0)))
    # A soft-edged mask, so the model does not see the pasted square's outline.
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle([side // 10, side // 10, side - side // 10, side - side // 10], fill=255)
    photo.paste(
        lesion, ((PHOTO_SIZE[0] - side) // 2, (PHOTO_SIZE[1] - side) // 2), mask.filter(ImageFilter.GaussianBlur(side / 20))
    )
    return photo


def camera_colour(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    shifted = np.clip(pixels * CAMERA_GAINS * CAMERA_EXPOSURE, 0, 1) ** CAMERA_GAMMA
    return Image.fromarray((shifted * 255).round().astype(np.uint8))


CONDITIONS = {
    "wider_field": wider_field,
    "camera_colour": camera_colour,
    "both": lambda image: wider_field(camera_colour(image)),
}


def score(predictor: Predictor, inputs: list[bytes]) -> np.ndarray:
    images = to_model_input(np.stack([predictor.decode_pixels(data) for data in inputs]))
    return np.concatenate([predictor.cancer_probabilities(images[i : i + 64]) for i in range(0, len(images), 64)])


def rounded(interval: tuple[float, float]) -> list[float]:
    return [round(bound, 3) for bound in interval]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", help="bundle to test (repeatable); default: the shipped one")
    parser.add_argument("--data", default=str(Locations.from_environment().data), help="labelled image tree (SKIN_RAY_DATA)")
    args = parser.parse_args()
    init_ray()
    images = discover(args.data)

    @functools.cache
    def validation_inputs(spec: InputSpec, validation_fraction: float):
        """The split, each condition's JPEG bytes and the images' cross-fitting halves, made once for every
        model trained on that split."""
        split = split_by_content(images, spec, validation_fraction)
        originals = [storage.read_bytes(path) for path in split.validation.paths]
        inputs = {"as_is": originals}
        for name, shift in CONDITIONS.items():
            inputs[name] = [encode(shift(Image.open(io.BytesIO(data)).convert("RGB")), "JPEG", quality=92) for data in originals]
        return split, inputs, np.array([content_fold(hashlib.sha256(data).hexdigest()) for data in originals])

    first_model = first_split = first_scores = None  # later models on the first one's split are paired with it
    for bundle in args.bundle or [None]:
        predictor = Predictor.from_bundle(bundle)
        metadata = predictor.metadata
        split, inputs, folds = validation_inputs(metadata.input_spec, metadata.training["validation_fraction"])
        if split.fingerprint != predictor.metadata.data["fingerprint"]:
            raise SystemExit(f"{args.data} is not the data {predictor.model_version} was trained on")
        y_true = np.array(split.validation.labels) == predictor.metadata.positive_index
        p_cancer = {name: score(predictor, data) for name, data in inputs.items()}
        auc = {name: classifier_stats.roc_auc(y_true, p) for name, p in p_cancer.items()}
        report = {
            "model": predictor.model_version,
            "n": len(y_true),
            "roc_auc": {name: round(value, 4) for name, value in auc.items()},
            "roc_auc_ci95": {name: rounded(classifier_stats.roc_auc_interval(y_true, p)) for name, p in p_cancer.items()},
            "ratio_to_as_is": {name: round(value / auc["as_is"], 3) for name, value in auc.items() if name != "as_is"},
            "ece_as_is": round(classifier_stats.expected_calibration_error(y_true, p_cancer["as_is"]), 4),
            "ece_crossfit_as_is": round(crossfit_ece(y_true.astype(int), classifier_stats.log_odds(p_cancer["as_is"]), folds), 4),
        }
        if first_model is None:
            first_model, first_split, first_scores = predictor.model_version, split, p_cancer
        elif split is first_split:
            report["minus_first_model"] = {
                "model": first_model,
                "roc_auc_difference_ci95": {
                    name: rounded(classifier_stats.roc_auc_difference_interval(y_true, p, first_scores[name]))
                    for name, p in p_cancer.items()
                },
                "ece_difference_ci95_as_is": rounded(
                    classifier_stats.ece_difference_interval(y_true, p_cancer["as_is"], first_scores["as_is"])
                ),
            }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
