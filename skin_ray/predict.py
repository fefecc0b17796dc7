"""`skin-ray predict` and `skin-ray explain`: the files named on a command line, in this process (no Ray), one
record each in their order. A file that cannot be read has a record with its error; the gate's refusal is an
answer, not a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from skin_ray import storage
from skin_ray.config import ExplainSettings, PredictSettings
from skin_ray.data import READ_FAILURES, load_images, read_error
from skin_ray.overlay import explanation
from skin_ray.predictor import Predictor
from skin_ray.preprocess import IMAGE_SUFFIXES, to_model_input

CHUNK = 32  # files decoded at a time: bounds memory for long argument lists


def image_paths(arguments: list[str]) -> list[str]:
    """Files as given; folders (and s3:// prefixes ending in /) replaced by the images below them."""
    paths = []
    for argument in arguments:
        if Path(argument).is_dir() or (storage.is_s3(argument) and argument.endswith("/")):
            found = storage.list_files(argument, IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) below {argument}")
            paths += found
        else:
            paths.append(argument)
    return paths


def predict_files(settings: PredictSettings) -> Iterator[tuple[dict, bool]]:
    """Each file's prediction record (with its `path`), and whether the file could be read."""
    paths = image_paths(settings.images)
    predictor = Predictor.from_bundle(settings.bundle, settings.runtime)
    for start in range(0, len(paths), CHUNK):
        batch = load_images({"path": np.array(paths[start : start + CHUNK], dtype=object)}, predictor.metadata.input_spec)
        records = predictor.records(batch["image"], batch["error"])
        for path, error, record in zip(batch["path"], batch["error"], records, strict=True):
            yield {"path": path, **record}, not error


def explain_files(settings: ExplainSettings) -> Iterator[tuple[dict, bool]]:
    """Each file's prediction record with its Grad-CAM `explanation` (the overlay written to `settings.output`),
    and whether the file could be read."""
    paths = image_paths(settings.images)
    predictor = Predictor.from_bundle(settings.bundle, settings.runtime)
    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths):
        try:
            data = storage.read_bytes(path)
            record, heatmap = predictor.explain(to_model_input(predictor.decode_pixels(data)[None]))
        except READ_FAILURES as exc:
            yield {"path": path, **predictor.error_record(read_error(exc)), "explanation": None}, False
            continue
        overlay = output / f"{index:04d}-{Path(path).stem}.gradcam.png"  # numbered: names may repeat across folders
        described = None if heatmap is None else explanation(data, heatmap, record["label"], overlay)
        yield {"path": path, **record, "explanation": described}, True
