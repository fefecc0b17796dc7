"""How well a bundle's input gate keeps out images that are not dermoscopic lesions, and what it costs.

    python benchmarks/ood.py [--bundle BUNDLE] [--data DIR]

Out-of-distribution images, all generated or shipped with a package (skin_ray/testing.py): scikit-image's
sample photographs and crops of them, documents / screenshots / charts drawn with Pillow, noise and flat
colours, and two kinds made from the validation images themselves: heavily blurred (Gaussian, radius 12)
and cropped to skin (a corner of the photo, without the lesion). For each kind: TNR (the share refused) at
the bundle's threshold, which lets 95% of validation images through, and the same for the maximum softmax
probability at its own 95%-TPR threshold (the baseline the gate replaces). In-distribution: the share of the
validation split refused, as is and re-photographed as by another clinic (benchmarks/robustness.py's
conditions). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image, ImageFilter
from robustness import CONDITIONS  # noqa: E402  (this script's folder is on the path)

from skin_ray import storage  # noqa: E402
from skin_ray.config import Locations  # noqa: E402
from skin_ray.data import discover, split_by_content  # noqa: E402
from skin_ray.predictor import Predictor  # noqa: E402
from skin_ray.preprocess import to_model_input  # noqa: E402
from skin_ray.runtime import init_ray  # noqa: E402
from skin_ray.testing import documents, encode, noise_and_flat, sample_photographs  # noqa: E402


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(12))


def skin_only(image: Image.Image) -> Image.Image:
    side = image.size[0] // 4
    return image.crop((0, 0, side, side)).resize(image.size, Image.Resampling.BILINEAR)


def scores(predictor: Predictor, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(gate score, maximum softmax probability) of each image, through JPEG bytes and the one preprocessing."""
    jpegs = [encode(image.convert("RGB"), "JPEG", quality=92) for image in images]
    inputs = to_model_input(np.stack([predictor.decode_pixels(data) for data in jpegs]))
    gate, msp = [], []
    for start in range(0, len(inputs), 64):
        analysis = predictor.analyse(inputs[start : start + 64])
        gate.append(predictor.bundle.gate.scores(analysis.features))
        msp.append(analysis.probabilities.max(axis=1))
    return np.concatenate(gate), np.concatenate(msp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle (default: the shipped one)")
    parser.add_argument("--data", default=str(Locations.from_environment().data), help="labelled image tree (SKIN_RAY_DATA)")
    args = parser.parse_args()
    init_ray()
    predictor = Predictor.from_bundle(args.bundle)
    gate = predictor.bundle.gate
    if gate is None:
        raise SystemExit(f"{predictor.bundle.uri} has no input gate; run `skin-ray fit-safeguards` on it first")
    split = split_by_content(discover(args.data), predictor.metadata.training["validation_fraction"])
    validation = [Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB") for path in split.validation.paths]
    in_gate, in_msp = scores(predictor, validation)
    msp_threshold = float(np.quantile(in_msp, 0.05))  # MSP accepts high confidence: keep the top 95%
    rng = np.random.default_rng(0)
    kinds = {
        "photographs (scikit-image samples and crops)": sample_photographs(rng),
        "documents, screenshots, charts": documents(rng),
        "noise and flat colours": noise_and_flat(rng),
        "validation images, heavily blurred": [blurred(image) for image in validation[:200]],
        "validation images, cropped to skin": [skin_only(image) for image in validation[:200]],
    }
    out_of_distribution = {}
    for kind, images in kinds.items():
        ood_gate, ood_msp = scores(predictor, images)
        out_of_distribution[kind] = {
            "n": len(images),
            "tnr_at_95_tpr": round(float((ood_gate > gate.threshold).mean()), 3),
            "tnr_at_95_tpr_max_softmax": round(float((ood_msp < msp_threshold).mean()), 3),
        }
    in_distribution = {"validation, as is": round(float((in_gate > gate.threshold).mean()), 3)}
    for name, condition in CONDITIONS.items():
        shifted, _ = scores(predictor, [condition(image) for image in validation])
        in_distribution[f"validation, {name}"] = round(float((shifted > gate.threshold).mean()), 3)
    print(json.dumps({
        "model": predictor.model_version, "gate_threshold": gate.threshold, "validation_images": len(validation),
        "out_of_distribution": out_of_distribution, "in_distribution_refused": in_distribution,
    }, indent=1))


if __name__ == "__main__":
    main()
