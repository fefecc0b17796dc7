"""Which images must stay together on one side of a split, across every data root: the images of one lesion (a
metadata table's group column, e.g. HAM10000's `lesion_id`), one photograph kept twice (a table's `duplicate_of`)
and files with equal content. A validation split that parts them flatters the model: it is graded on lesions it
was trained on.

A metadata table is a CSV file with one row per image: a column naming the image's path relative to its data root
(`file`, `relpath` or `path`) and any others (`lesion_id`, `dx`, `sex`, ...), which the bundle's per-group figures
read. Tables are untrusted: bounded in size, read as text, and a row only ever describes an image already found
under its root (nothing named in a table is opened).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

from skin_ray import storage

PATH_COLUMNS = ("file", "relpath", "path")  # the first a table has names each row's image
DUPLICATE_COLUMN = "duplicate_of"  # paths of images that are the same photograph, ";"-separated (`group_images`)
MAX_TABLE_BYTES = 64 * 2**20
MAX_FIELD_CHARS = 1024


@dataclass(frozen=True)
class MetadataTable:
    """One table's rows by image path relative to `root`."""

    root: str
    uri: str
    sha256: str
    rows: dict[str, dict[str, str]]

    def describe(self) -> dict:
        return {"root": self.root, "table": self.uri, "sha256": self.sha256, "rows": len(self.rows)}


def table_argument(argument: str, roots: Sequence[str]) -> tuple[str, str]:
    """`ROOT=TABLE` (the table's paths are relative to ROOT, one of `roots`) or `TABLE` (relative to the one root
    that holds the table file) -> (root, table)."""
    root, separator, table = argument.rpartition("=")
    if separator:
        if root not in roots:
            raise ValueError(f"metadata {argument!r}: {root!r} is not one of the data roots {list(roots)}")
        return root, table
    holders = [root for root in roots if _inside(argument, root)]
    if len(holders) != 1:
        raise ValueError(f"metadata {argument!r}: name its root as ROOT=TABLE (no single data root holds the file)")
    return holders[0], argument


def _inside(path: str, root: str) -> bool:
    if storage.is_s3(root):
        return path.startswith(root.rstrip("/") + "/")
    return os.path.normpath(os.path.abspath(path)).startswith(os.path.normpath(os.path.abspath(root)) + os.sep)


def read_table(root: str, uri: str) -> MetadataTable:
    """The CSV table at `uri`, its rows keyed by their image's path relative to `root`; refused with a reason when
    it is larger than MAX_TABLE_BYTES, not UTF-8 CSV, has no path column, or names one path twice."""
    data = storage.read_bytes(uri, MAX_TABLE_BYTES)
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        columns = reader.fieldnames or []
        path_column = next((name for name in PATH_COLUMNS if name in columns), None)
        if path_column is None:
            raise ValueError(f"it has no column naming each image's path ({' or '.join(PATH_COLUMNS)}); columns: {columns}")
        rows = {}
        for number, row in enumerate(reader, start=2):
            if None in row or any(len(value or "") > MAX_FIELD_CHARS for value in row.values()):
                raise ValueError(f"line {number} has more fields than the header, or a field over {MAX_FIELD_CHARS} characters")
            path = _relative(row.pop(path_column))
            if path in rows:
                raise ValueError(f"line {number} names {path!r} a second time")
            rows[path] = {name: (value or "").strip() for name, value in row.items()}
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise ValueError(f"metadata table {uri}: {exc}") from None
    return MetadataTable(root, uri, hashlib.sha256(data).hexdigest(), rows)


def _relative(path: str) -> str:
    """A table's path as the listing spells it relative to its root: forward slashes, no leading `./`."""
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


class _Components:
    """Union-find over image indices."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(frozen=True)
class Grouping:
    keys: list[str]  # per image, a hex digest shared by every image of its group: what the split's coin is flipped on
    duplicates: dict[int, int]  # image index -> the index of the image it repeats; left out of both sides
    groups: int  # distinct groups among the images kept


def group_images(relative_paths: Sequence[str], roots: Sequence[str], digests: Sequence[str],
                 attributes: Sequence[dict[str, str]], group_column: str) -> Grouping:
    """Join into one group the images that share a content digest, a non-empty `group_column` value, or are named
    in one another's `duplicate_of` (a path relative to a data root, looked up in the roots in the order given:
    the first that holds it). Of one photograph's copies (by `duplicate_of`) one stays, the copy
    that names no other (the original a table's rows point at); the others are left out, so it counts once.

    A group's key is the sha256 of its smallest group value, or without one its smallest content digest: an
    image without metadata keeps the key it had before grouping existed (its own digest), so a single root
    with no table splits exactly as it always did."""
    components, first_with = _Components(len(digests)), {}
    for index, (digest, row) in enumerate(zip(digests, attributes, strict=True)):
        components.join(index, first_with.setdefault(f"sha256:{digest}", index))
        if row.get(group_column):
            components.join(index, first_with.setdefault(f"group:{row[group_column]}", index))
    where = {(root, path): index for index, (root, path) in enumerate(zip(roots, relative_paths, strict=True))}
    photographs, names_another = _Components(len(digests)), set()  # one photograph's copies, by duplicate_of
    for index, row in enumerate(attributes):
        for named in filter(None, (part.strip() for part in row.get(DUPLICATE_COLUMN, "").split(";"))):
            found = (where.get((root, _relative(named))) for root in dict.fromkeys(roots))
            other = next((other for other in found if other is not None and other != index), None)
            if other is not None:
                components.join(index, other)
                photographs.join(index, other)
                names_another.add(index)
    copies = {}
    for index in range(len(digests)):
        copies.setdefault(photographs.find(index), []).append(index)
    duplicates = {}
    for members in (members for members in copies.values() if len(members) > 1):
        # The copy that names no other is the original (skin_isic's, which HAM10000's rows name); it stays.
        kept = next((index for index in members if index not in names_another), members[0])
        duplicates.update({index: kept for index in members if index != kept})
    values, smallest_digest = {}, {}
    for index, (digest, row) in enumerate(zip(digests, attributes, strict=True)):
        root = components.find(index)
        if row.get(group_column):
            values[root] = min(values.get(root, row[group_column]), row[group_column])
        smallest_digest[root] = min(smallest_digest.get(root, digest), digest)
    keys = []
    for index in range(len(digests)):
        root = components.find(index)
        keys.append(hashlib.sha256(values[root].encode()).hexdigest() if root in values else smallest_digest[root])
    kept = {components.find(index) for index in range(len(digests)) if index not in duplicates}
    return Grouping(keys, duplicates, len(kept))
