"""The grouping a split keeps together (skin_ray.grouping): lesions across roots, duplicate photographs, equal
content; the metadata tables it reads, refused with a reason when malformed; and, where the real tables are
here, no lesion or duplicate of HAM10000 and skin_isic on both sides; and the subgroups validation figures are
broken down by."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from skin_ray import grouping
from skin_ray.data import LabelledImages, Origin, in_validation
from skin_ray.finalize import breakdown_groups
from skin_ray.grouping import group_images, read_table, table_argument
from skin_ray.testing import LOCATIONS

ROOTS = ("data/isic", "data/ham")


def _planted(seed: int, images: int = 400):
    """Images in two roots with planted lesions (some spanning both roots), copies named by `duplicate_of` and
    byte-identical files: (relative paths, roots, digests, attributes, each image's lesion)."""
    rng = np.random.default_rng(seed)
    lesions = rng.integers(0, images // 3, images)
    roots = [ROOTS[i % 2] for i in range(images)]
    relative = [f"{('Cancer', 'Non_Cancer')[i % 3 == 0]}/{i}.jpg" for i in range(images)]
    digests = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(images)]
    attributes = [{"lesion_id": f"les_{lesions[i]}"} if rng.random() < 0.8 else {} for i in range(images)]
    for i in rng.choice(images, 20, replace=False):  # identical bytes under another name
        digests[i] = digests[(i + 7) % images]
    for i in [i for i in range(images) if roots[i] == ROOTS[1]][:30]:  # ham copies of an isic photograph
        original = (i + 1) % images
        attributes[i] = {**attributes[i], "duplicate_of": relative[original]}
    return relative, roots, digests, attributes


@pytest.mark.parametrize("seed", range(5))
def test_no_lesion_photograph_or_content_is_on_both_sides(seed):
    relative, roots, digests, attributes = _planted(seed)
    grouped = group_images(relative, roots, digests, attributes, "lesion_id")
    side = {i: in_validation(key, 0.3) for i, key in enumerate(grouped.keys) if i not in grouped.duplicates}
    assert 0.15 < np.mean(list(side.values())) < 0.45
    for i, j in ((i, j) for i in side for j in side if i < j):
        same_lesion = attributes[i].get("lesion_id") and attributes[i].get("lesion_id") == attributes[j].get("lesion_id")
        if same_lesion or digests[i] == digests[j]:
            assert side[i] == side[j], (i, j)
    for copy, original in grouped.duplicates.items():
        assert grouped.keys[copy] == grouped.keys[original] and original not in grouped.duplicates
        assert "duplicate_of" in attributes[copy]


def test_one_root_without_tables_splits_by_content_as_before():
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(50)]
    digests[3] = digests[4]
    grouped = group_images([f"Cancer/{i}.jpg" for i in range(50)], ["r"] * 50, digests, [{}] * 50, "lesion_id")
    assert grouped.keys == digests and not grouped.duplicates and grouped.groups == 49


def test_copies_naming_each_other_leave_one_behind():
    relative, roots = ["a.jpg", "b.jpg", "c.jpg"], ["r"] * 3
    attributes = [{"duplicate_of": "b.jpg"}, {"duplicate_of": "a.jpg;c.jpg"}, {}]
    grouped = group_images(relative, roots, ["1", "2", "3"], attributes, "lesion_id")
    assert grouped.duplicates == {0: 2, 1: 2} and len(set(grouped.keys)) == 1 and grouped.groups == 1


def _write(path: Path, rows: list[list[str]]) -> str:
    with open(path, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    return str(path)


def test_a_table_maps_relative_paths_and_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    good = read_table("root", _write(tmp_path / "good.csv", [["file", "lesion_id"], ["./Cancer\\1.jpg", "les_1"]]))
    assert good.rows == {"Cancer/1.jpg": {"lesion_id": "les_1"}} and len(good.sha256) == 64
    for rows, reason in (
        ([["name", "lesion_id"], ["a.jpg", "x"]], "no column naming each image's path"),
        ([["file", "lesion_id"], ["a.jpg", "x", "surplus"]], "line 2 has more fields"),
        ([["file"], ["a.jpg"], ["a.jpg"]], "line 3 names 'a.jpg' a second time"),
        ([["file", "note"], ["a.jpg", "x" * 2000]], "over 1024 characters"),
    ):
        with pytest.raises(ValueError, match=reason):
            read_table("root", _write(tmp_path / "bad.csv", rows))
    (tmp_path / "latin.csv").write_bytes("file\n\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv"):
        read_table("root", str(tmp_path / "latin.csv"))
    monkeypatch.setattr(grouping, "MAX_TABLE_BYTES", 10)
    with pytest.raises(ValueError, match="more than the 10 allowed"):
        read_table("root", str(tmp_path / "good.csv"))


def test_a_table_is_paired_with_the_root_it_names_or_lies_in(tmp_path):
    roots = [str(tmp_path / "isic"), str(tmp_path / "ham")]
    assert table_argument(f"{roots[0]}=elsewhere.csv", roots) == (roots[0], "elsewhere.csv")
    assert table_argument(f"{roots[1]}/metadata.csv", roots) == (roots[1], f"{roots[1]}/metadata.csv")
    assert table_argument("s3://b/ham/metadata.csv", ["s3://b/ham", "s3://b/hamster"]) == ("s3://b/ham", "s3://b/ham/metadata.csv")
    with pytest.raises(ValueError, match="is not one of the data roots"):
        table_argument(f"{tmp_path}/other=t.csv", roots)
    with pytest.raises(ValueError, match="name its root as ROOT=TABLE"):
        table_argument(str(tmp_path / "t.csv"), roots)


HAM = LOCATIONS.data.parent / "ham10000"


@pytest.mark.skipif(not (HAM / "metadata.csv").is_file() or not LOCATIONS.data.is_dir(), reason="needs ../shared/datasets")
def test_the_real_tables_keep_every_lesion_and_photograph_on_one_side():
    """skin_isic and HAM10000 as `skin-ray train` reads them with both tables: no HAM lesion_id and no photograph
    (duplicate_of, equal bytes) on both sides; each of HAM10000's copies of a skin_isic photograph left out."""
    isic, ham = str(LOCATIONS.data), str(HAM)
    tables = [read_table(ham, str(HAM / "metadata.csv")), read_table(isic, str(HAM / "lesions_skin_isic.csv"))]
    relative, roots = [], []
    for root in (isic, ham):
        for path in sorted(Path(root).glob("*/*.jpg")):
            relative.append(path.relative_to(root).as_posix())
            roots.append(root)
    digests = [hashlib.sha256(Path(root, path).read_bytes()).hexdigest() for root, path in zip(roots, relative, strict=True)]
    attributes = [next((table.rows[path] for table in tables if table.root == root and path in table.rows), {})
                  for root, path in zip(roots, relative, strict=True)]
    grouped = group_images(relative, roots, digests, attributes, "lesion_id")
    assert len(grouped.duplicates) == 1880  # HAM10000's README: 1,880 of its images reproduce skin_isic ones
    kept = [i for i in range(len(relative)) if i not in grouped.duplicates]
    sides: dict[str, set[bool]] = {}
    for i in kept:
        validation = in_validation(grouped.keys[i], 0.2)
        for name in (f"lesion {attributes[i].get('lesion_id')}" if attributes[i].get("lesion_id") else None,
                     f"content {digests[i]}"):
            if name:
                sides.setdefault(name, set()).add(validation)
    assert all(len(side) == 1 for side in sides.values())
    for copy, original in grouped.duplicates.items():
        assert roots[copy] == ham and roots[original] == isic
    share = np.mean([in_validation(grouped.keys[i], 0.2) for i in kept])
    assert 0.17 < share < 0.23


def test_validation_figures_are_broken_down_by_tree_diagnosis_sex_age_band_and_site():
    """What bundle.json's `validation_by` (and the model card) groups images by: the tables' values as they are,
    ages in bands of twenty years, and "" where a table gives nothing (an image of a tree without tables)."""
    rows = [
        ("data/ham", {"dx": "mel", "sex": "female", "age": "45.0", "localization": "back"}),
        ("data/ham", {"dx": "nv", "sex": "male", "age": "60", "localization": "face"}),
        ("data/ham", {"dx": "nv", "sex": "", "age": "unknown", "localization": "back"}),
        ("data/isic", {}),
    ]
    images = LabelledImages(
        [f"{root}/{i}.jpg" for i, (root, _) in enumerate(rows)], [0, 1, 1, 0],
        origins=[Origin(root, f"{i}.jpg", attributes) for i, (root, attributes) in enumerate(rows)],
    )
    assert breakdown_groups(images) == {
        "source": ["data/ham", "data/ham", "data/ham", "data/isic"],
        "diagnosis": ["mel", "nv", "nv", ""],
        "sex": ["female", "male", "", ""],
        "age_band": ["40-59", "60-79", "", ""],
        "site": ["back", "face", "back", ""],
    }
