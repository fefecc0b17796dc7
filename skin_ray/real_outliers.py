"""Real images that are not dermoscopy, which the input gate is fitted against beside the generated kinds
(skin_ray.gate_images): a folder with one sub-folder per kind (everyday photos, clinical skin photos, other medical
images, documents) and, optionally, a SOURCES.tsv naming the repository each file came from (`file` and
`repository` columns), so that the gate's figures can be measured on sources it was not fitted on.

Generated images teach a gate what generated images look like; real ones are what it meets.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

import numpy as np

from skin_ray import storage
from skin_ray.data import READ_FAILURES, read_error
from skin_ray.preprocess import IMAGE_SUFFIXES, InputSpec

logger = logging.getLogger(__name__)

SOURCES_FILE = "SOURCES.tsv"
MAX_IMAGE_BYTES = 32 * 2**20
MAX_SOURCES_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RealOutliers:
    pixels: np.ndarray  # uint8, (n, size, size, 3): the model input but its last step
    kinds: np.ndarray  # each image's kind: its sub-folder's name
    sources: np.ndarray  # the repository it came from (SOURCES.tsv), else its kind


def read_real_outliers(folder: str, spec: InputSpec) -> RealOutliers:
    """Every image below `folder`'s kind sub-folders, decoded by `spec`; a file that does not decode is skipped
    with a warning (the gate is fitted on what it can read)."""
    origin = _sources(folder)
    pixels, kinds, sources = [], [], []
    for kind in storage.list_dirs(folder):
        kind_root = storage.join(folder, kind)
        for path in storage.list_files(kind_root, IMAGE_SUFFIXES):
            relative = f"{kind}/{storage.relative_to(path, kind_root)}"
            try:
                pixels.append(spec.pixels(storage.read_bytes(path, MAX_IMAGE_BYTES)))
            except READ_FAILURES as exc:
                logger.warning("skipping %s: %s", path, read_error(exc))
                continue
            kinds.append(kind)
            sources.append(origin.get(relative, kind))
    if not pixels:
        raise FileNotFoundError(f"no images found in kind sub-folders of {folder}")
    return RealOutliers(np.stack(pixels), np.array(kinds), np.array(sources))


def _sources(folder: str) -> dict[str, str]:
    """SOURCES.tsv's repository of each file (relative path), or nothing where the folder has no such table."""
    uri = storage.join(folder, SOURCES_FILE)
    try:
        text = storage.read_bytes(uri, MAX_SOURCES_BYTES).decode("utf-8")
    except FileNotFoundError:
        return {}
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    if not {"file", "repository"} <= set(rows.fieldnames or ()):
        raise ValueError(f"{uri} needs `file` and `repository` columns; it has {rows.fieldnames}")
    return {row["file"].strip(): row["repository"].strip() for row in rows}
