"""Generated images for tests: a learnable two-class lesion set and odd or broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def lesion_image(label: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A skin-coloured square with a lesion: Cancer lesions are striped, Non_Cancer ones smooth.

    Colours, positions and radii vary, so only the texture tells the classes apart.
    """
    yy, xx = np.mgrid[0:size, 0:size]
    skin = np.array([200, 160, 140]) + rng.normal(0, 12, 3)
    image = np.ones((size, size, 3)) * skin + rng.normal(0, 6, (size, size, 3))
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.18, 0.32) * size
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    lesion = np.array([110, 70, 50]) + rng.normal(0, 15, 3)
    if label == "Cancer":
        period = rng.uniform(4, 7)
        stripes = (np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) * 2 * np.pi / period) > 0)[..., None]
        image[inside] = np.where(stripes, lesion * 0.45, lesion * 1.25)[inside]
    else:
        image[inside] = lesion
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_lesion_tree(root: Path, per_class: int, seed: int = 0, split_folders: bool = False) -> Path:
    """ROOT/<class>/[Training|Testing/]*.jpg with `per_class` images of each class."""
    rng = np.random.default_rng(seed)
    for label in ("Cancer", "Non_Cancer"):
        for i in range(per_class):
            folder = root / label / (("Training" if i % 4 else "Testing") if split_folders else "")
            folder.mkdir(parents=True, exist_ok=True)
            lesion_image(label, rng).save(folder / f"{label.lower()}_{i:04d}.jpg", quality=92)
    return root


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()
