"""Labelled image trees -> Ray Datasets.

A labelled tree has one folder per class, named after the class, locally or under an `s3://` prefix:

    ROOT/Cancer/*.jpg                    or    ROOT/Cancer/Training/*.jpg, ROOT/Cancer/Testing/*.jpg
    ROOT/Non_Cancer/*.jpg                      ROOT/Non_Cancer/Training/*.jpg, ...

Images are found recursively below each class folder; `subset="Training"` keeps only files inside a
sub-folder of that name. The validation split is decided by each file's content hash, so identical images
(the data set has some) always land on the same side and the split never changes between runs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import ray

from skin_ray import storage
from skin_ray.preprocess import IMAGE_SUFFIXES, ImageDecodeError, InputSpec, image_megapixels, to_model_input

logger = logging.getLogger(__name__)

CLASS_NAMES = ("Cancer", "Non_Cancer")  # output-index order; the bundle records it
POSITIVE_CLASS = "Cancer"


@dataclass(frozen=True)
class LabelledImages:
    """Image URIs with their class indices into `class_names`."""

    paths: list[str]
    labels: list[int]
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def positive_index(self) -> int:
        """The index of POSITIVE_CLASS in `class_names`: what a bundle made from these images records."""
        return self.class_names.index(POSITIVE_CLASS)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist(), strict=True))

    def select(self, mask) -> LabelledImages:
        keep = np.flatnonzero(np.asarray(mask))
        return LabelledImages([self.paths[i] for i in keep], [self.labels[i] for i in keep], self.class_names)


def discover(root: str, class_names: tuple[str, ...] = CLASS_NAMES, subset: str | None = None) -> LabelledImages:
    """Find every image below ROOT/<class>/ for each class in `class_names`."""
    found_dirs = storage.list_dirs(root)
    missing = [name for name in class_names if name not in found_dirs]
    if missing:
        raise FileNotFoundError(
            f"{root} must hold one folder per class {list(class_names)}; missing {missing} (found {found_dirs})"
        )
    paths, labels = [], []
    for index, name in enumerate(class_names):
        class_root = storage.join(root, name)
        for path in storage.list_files(class_root, IMAGE_SUFFIXES):
            relative_parts = path[len(class_root) :].strip("/").split("/")[:-1]
            if subset is None or subset in relative_parts:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise FileNotFoundError(f"no images found below {root}" + (f" in sub-folders named {subset!r}" if subset else ""))
    return LabelledImages(paths, labels, tuple(class_names))


# What reading a file into a model input may raise; `read_error` says which reason each is.
READ_FAILURES = (ImageDecodeError, storage.FileTooLargeError, OSError)


def read_error(exc: Exception) -> str:
    """The `error` ("reason: detail") of a file that could not become a model input, from what reading it raised:
    ImageDecodeError's own reasons, `too_large` or `unreadable`. Every job's records carry these."""
    if isinstance(exc, ImageDecodeError):
        return str(exc)
    return f"{'too_large' if isinstance(exc, storage.FileTooLargeError) else 'unreadable'}: {exc}"


def _inspect_batch(batch: dict[str, np.ndarray], spec: InputSpec) -> dict[str, np.ndarray]:
    """Content hash and decodability of each file (a Ray Data map_batches function)."""
    loaded = load_pixels(batch, spec)
    return {"path": batch["path"], "sha256": loaded["sha256"].astype(str), "error": loaded["error"].astype(str)}


@dataclass(frozen=True)
class Split:
    train: LabelledImages
    validation: LabelledImages
    fingerprint: str  # sha256 over the sorted content hashes of every usable image
    skipped: dict[str, str]  # path -> reason, for files that cannot be decoded
    train_digests: tuple[str, ...] = ()  # sorted sha256 of the training images: what a bundle was trained on


def in_validation(sha256: str, validation_fraction: float) -> bool:
    """The split's rule: the first 8 hex digits of a sha256 are uniform on [0, 2^32), a stable coin flip per
    distinct content, so identical images always land on the same side."""
    return bool(sha256) and int(sha256[:8], 16) / 2**32 < validation_fraction


def split_by_content(images: LabelledImages, spec: InputSpec, validation_fraction: float = 0.2) -> Split:
    """Hash and check every file in parallel, drop those that cannot become `spec`'s input, and split by content
    hash."""
    files = ray.data.from_items([{"path": p} for p in images.paths])
    files.set_name("check-images")  # what its progress line is called
    inspected = files.map_batches(_inspect_batch, batch_size=64, fn_kwargs={"spec": spec}).to_pandas()
    inspected = inspected.set_index("path").loc[images.paths]
    usable = (inspected["error"] == "").to_numpy()
    skipped = inspected.loc[~usable, "error"].to_dict()
    for path, reason in skipped.items():
        logger.warning("skipping %s: %s", path, reason)
    digests = inspected["sha256"].to_numpy()
    validation = np.array([in_validation(d, validation_fraction) for d in digests])
    return Split(
        train=images.select(usable & ~validation),
        validation=images.select(usable & validation),
        fingerprint=hashlib.sha256("\n".join(sorted(digests[usable])).encode()).hexdigest(),
        skipped=skipped,
        train_digests=tuple(sorted(set(digests[usable & ~validation]))),
    )


def load_images(batch: dict[str, np.ndarray], spec: InputSpec, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read and preprocess each path to `spec`'s input (a Ray Data map_batches function).

    A file that cannot become a model input gets a zero image and an `error` of the form "reason: detail"
    (`read_error`); the others get an empty error. `sha256` is the file's content hash (empty when unreadable),
    what a bundle's training split is recorded by.
    """
    decoded = load_pixels(batch, spec, max_bytes)
    pixels = decoded.pop("pixels")
    return {**decoded, "image": to_model_input(pixels)}


def load_pixels(batch: dict[str, np.ndarray], spec: InputSpec, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """`load_images` up to the model input's last step: `pixels`, uint8, a quarter of the float32 bytes; and
    each file's `megapixels` (0 when unreadable), which drift compares."""
    pixels = np.zeros((len(batch["path"]), spec.size, spec.size, 3), dtype=np.uint8)
    megapixels = np.zeros(len(batch["path"]), dtype=np.float64)
    errors, digests = [], []
    for i, path in enumerate(batch["path"]):
        digests.append("")
        try:
            data = storage.read_bytes(path, max_bytes)
            digests[-1] = hashlib.sha256(data).hexdigest()
            pixels[i] = spec.pixels(data)
            megapixels[i] = image_megapixels(data)
            errors.append("")
        except READ_FAILURES as exc:
            errors.append(read_error(exc))
    return {**batch, "pixels": pixels, "megapixels": megapixels, "error": np.array(errors, dtype=object),
            "sha256": np.array(digests, dtype=object)}


def image_dataset(images: LabelledImages, spec: InputSpec) -> ray.data.Dataset:
    """A Ray Dataset of `path`, `label`, `image` (float32, `spec`'s input), `error` columns.

    Decoding is lazy and streams: each pass over the dataset reads and decodes the files again.
    """
    return _paths_and_labels(images).map_batches(load_images, batch_size=32, fn_kwargs={"spec": spec})


def pixel_dataset(
    images: LabelledImages, spec: InputSpec, decode_once: bool = True, shuffle: bool = False, in_order: bool = False
) -> ray.data.Dataset:
    """A Ray Dataset of `path`, `label`, `pixels` (uint8, the model input but its last step) and `sha256`:
    what training and calibration read. Every image must decode (`split_by_content` leaves out those that
    do not).

    `decode_once` decodes every image once into Ray's object store (which spills to disk what memory cannot
    hold: 87 KB an image), so each pass reads pixels without decoding again; otherwise each pass decodes
    the files again. With `shuffle`, each pass visits the images in a new order; `in_order`, in `images`' order
    (Ray Data otherwise yields blocks as they finish).
    """
    paths = _paths_and_labels(images)
    # The dataset's own copy of the DataContext, which what derives from it shares: the process's stays as it is.
    paths.context.execution_options.preserve_order = in_order
    if shuffle and not decode_once:
        paths = paths.random_shuffle()  # paths are cheaper to move than pixels
    pixels = paths.map_batches(load_pixels, batch_size=32, fn_kwargs={"spec": spec}).drop_columns(["error"])
    if not decode_once:
        return pixels
    pixels.set_name("decode-once")  # what its progress line is called
    pixels = pixels.materialize()
    return pixels.random_shuffle() if shuffle else pixels


def _paths_and_labels(images: LabelledImages) -> ray.data.Dataset:
    items = [{"path": p, "label": label} for p, label in zip(images.paths, images.labels, strict=True)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 64)))
