"""Labelled image trees -> Ray Datasets.

A labelled tree has one folder per class, named after the class, locally or under an `s3://` prefix:

    ROOT/Cancer/*.jpg                    or    ROOT/Cancer/Training/*.jpg, ROOT/Cancer/Testing/*.jpg
    ROOT/Non_Cancer/*.jpg                      ROOT/Non_Cancer/Training/*.jpg, ...

Images are found recursively below each class folder; `subset="Training"` keeps only files inside a
sub-folder of that name. Several roots can be read as one set (`discover_sources`), each with metadata tables
(skin_ray.grouping). The validation split keeps each group together (one lesion, one photograph, equal content;
skin_ray.grouping) and decides each group's side by a digest, so the split never changes between runs; without
tables every image is its own group, decided by its content hash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import ray

from skin_ray import storage
from skin_ray.grouping import group_images, read_table, table_argument
from skin_ray.preprocess import IMAGE_SUFFIXES, ImageDecodeError, InputSpec, image_megapixels, to_model_input

logger = logging.getLogger(__name__)

CLASS_NAMES = ("Cancer", "Non_Cancer")  # output-index order; the bundle records it
POSITIVE_CLASS = "Cancer"


class Origin(NamedTuple):
    """Where an image was found: its data root, its path relative to that root, and its metadata tables' row."""

    root: str
    relative: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class LabelledImages:
    """Image URIs with their class indices into `class_names`, and where each was found."""

    paths: list[str]
    labels: list[int]
    class_names: tuple[str, ...] = CLASS_NAMES
    origins: list[Origin] = field(default_factory=list)  # empty: not recorded
    tables: tuple[dict, ...] = ()  # the metadata tables read (`MetadataTable.describe`)

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
        return LabelledImages([self.paths[i] for i in keep], [self.labels[i] for i in keep], self.class_names,
                              [self.origins[i] for i in keep] if self.origins else [], self.tables)

    def sources(self) -> list[str]:
        """The data root each image was found under ("" where not recorded)."""
        return [origin.root for origin in self.origins] if self.origins else [""] * len(self)

    def attribute(self, name: str) -> list[str]:
        """Each image's value of a metadata column ("" where its tables have none)."""
        return [origin.attributes.get(name, "") for origin in self.origins] if self.origins else [""] * len(self)


def discover(root: str, class_names: tuple[str, ...] = CLASS_NAMES, subset: str | None = None) -> LabelledImages:
    """Find every image below ROOT/<class>/ for each class in `class_names`."""
    found_dirs = storage.list_dirs(root)
    missing = [name for name in class_names if name not in found_dirs]
    if missing:
        raise FileNotFoundError(
            f"{root} must hold one folder per class {list(class_names)}; missing {missing} (found {found_dirs})"
        )
    paths, labels, origins = [], [], []
    for index, name in enumerate(class_names):
        class_root = storage.join(root, name)
        for path in storage.list_files(class_root, IMAGE_SUFFIXES):
            relative_parts = storage.relative_to(path, class_root).split("/")[:-1]
            if subset is None or subset in relative_parts:
                paths.append(path)
                labels.append(index)
                origins.append(Origin(root, "/".join([name, *relative_parts, path.rsplit("/", 1)[-1]]), {}))
    if not paths:
        raise FileNotFoundError(f"no images found below {root}" + (f" in sub-folders named {subset!r}" if subset else ""))
    return LabelledImages(paths, labels, tuple(class_names), origins)


def discover_sources(roots: Sequence[str], metadata: Sequence[str] = (), class_names: tuple[str, ...] = CLASS_NAMES,
                     subset: str | None = None) -> LabelledImages:
    """Every image below each of `roots` (as `discover`), with the rows of the metadata tables (`ROOT=TABLE` or
    `TABLE`, skin_ray.grouping) that name it; a table that names none of its root's images is refused, since it was
    most likely paired with the wrong root."""
    if len(set(roots)) != len(roots):
        raise ValueError(f"a data root is named twice: {list(roots)}")
    tables = [read_table(*table_argument(argument, roots)) for argument in metadata]
    found = [discover(root, class_names, subset) for root in roots]
    paths, labels, origins = [], [], []
    for images in found:
        paths += images.paths
        labels += images.labels
        for origin in images.origins:
            rows = [table.rows.get(origin.relative, {}) for table in tables if table.root == origin.root]
            origins.append(origin._replace(attributes={key: value for row in rows for key, value in row.items()}))
    for table in tables:
        if not any(origin.root == table.root and origin.relative in table.rows for origin in origins):
            raise ValueError(f"metadata table {table.uri} names none of the images below {table.root}")
    return LabelledImages(paths, labels, tuple(class_names), origins, tuple(table.describe() for table in tables))


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
    validation_digests: tuple[str, ...] = ()  # sorted sha256 of the validation images: what it was judged on
    duplicates: dict[str, str] = field(default_factory=dict)  # path -> the path of the photograph it repeats; left out
    provenance: dict = field(default_factory=dict)  # where the images came from and how they were grouped

    def describe(self) -> dict:
        """What a bundle records of its data: where, how it was grouped, how many images on each side."""
        return {**self.provenance, "fingerprint": self.fingerprint, "train": self.train.class_counts(),
                "validation": self.validation.class_counts(), "skipped": len(self.skipped)}


def in_validation(sha256: str, validation_fraction: float) -> bool:
    """The split's rule: the first 8 hex digits of a sha256 are uniform on [0, 2^32), a stable coin flip per
    distinct content, so identical images always land on the same side."""
    return bool(sha256) and int(sha256[:8], 16) / 2**32 < validation_fraction


def split_by_content(images: LabelledImages, spec: InputSpec, validation_fraction: float = 0.2,
                     group_column: str = "lesion_id") -> Split:
    """Hash and check every file in parallel, drop those that cannot become `spec`'s input and the repeated copies
    of one photograph, and split by group (skin_ray.grouping): no group has images on both sides."""
    digests, usable, skipped = _inspect(images, spec)
    origins = images.origins or [Origin("", path, {}) for path in images.paths]
    grouping = group_images([origin.relative for origin in origins], [origin.root for origin in origins], digests,
                            [origin.attributes for origin in origins], group_column)
    repeated = np.zeros(len(images), dtype=bool)
    repeated[list(grouping.duplicates)] = True
    validation = np.array([in_validation(key, validation_fraction) for key in grouping.keys])
    used = usable & ~repeated
    return Split(
        train=images.select(used & ~validation),
        validation=images.select(used & validation),
        fingerprint=hashlib.sha256("\n".join(sorted(digests[used])).encode()).hexdigest(),
        skipped=skipped,
        train_digests=tuple(sorted(set(digests[used & ~validation]))),
        validation_digests=tuple(sorted(set(digests[used & validation]))),
        duplicates={images.paths[index]: images.paths[kept] for index, kept in grouping.duplicates.items()},
        provenance={
            "sources": list(dict.fromkeys(origin.root for origin in origins)),
            "tables": list(images.tables),
            "group_column": group_column if images.tables else "",
            "groups": len({key for key, use in zip(grouping.keys, used, strict=True) if use}),
            "duplicates_left_out": len(grouping.duplicates),
        },
    )


def recorded_split(images: LabelledImages, spec: InputSpec, train_digests: frozenset[str],
                   validation_digests: frozenset[str], provenance: dict) -> Split:
    """The split a bundle recorded by content hash (and its `provenance`), found again in `images`: each image on
    the side its digest was on, one file per content; images on neither (new ones) are left out."""
    digests, usable, skipped = _inspect(images, spec)
    # One file per content: a byte-identical copy of a kept photograph, left out in training, stays out.
    first = np.zeros(len(digests), dtype=bool)
    first[np.unique(digests, return_index=True)[1]] = True
    train = usable & first & np.isin(digests, list(train_digests))
    validation = usable & first & np.isin(digests, list(validation_digests))
    return Split(
        train=images.select(train),
        validation=images.select(validation),
        fingerprint=hashlib.sha256("\n".join(sorted(digests[train | validation])).encode()).hexdigest(),
        skipped=skipped,
        train_digests=tuple(sorted(set(digests[train]))),
        validation_digests=tuple(sorted(set(digests[validation]))),
        provenance=provenance,
    )


def _inspect(images: LabelledImages, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Each file's content digest and whether it becomes `spec`'s input (in parallel), and why not where not."""
    files = ray.data.from_items([{"path": p} for p in images.paths])
    files.set_name("check-images")  # what its progress line is called
    inspected = files.map_batches(_inspect_batch, batch_size=64, fn_kwargs={"spec": spec}).to_pandas()
    inspected = inspected.set_index("path").loc[images.paths]
    usable = (inspected["error"] == "").to_numpy()
    skipped = inspected.loc[~usable, "error"].to_dict()
    for path, reason in skipped.items():
        logger.warning("skipping %s: %s", path, reason)
    return inspected["sha256"].to_numpy().astype(str), usable, skipped


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
