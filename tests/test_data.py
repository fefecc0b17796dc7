"""Data discovery (both layouts, local and S3), the content-hash split, and one preprocessing path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from skin_ray import storage
from skin_ray.data import discover, discover_sources, image_dataset, load_images, recorded_split, split_by_content
from skin_ray.preprocess import IMAGE_SIZE, InputSpec, preprocess_image
from skin_ray.testing import REAL_DATA, encode, lesion_image, needs_real_data, write_lesion_tree

SPEC = InputSpec(IMAGE_SIZE)  # no bundle here: the default network's input


@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory) -> Path:
    return write_lesion_tree(tmp_path_factory.mktemp("flat"), per_class=12, seed=3)


@pytest.fixture(scope="module")
def split_tree(tmp_path_factory) -> Path:
    return write_lesion_tree(tmp_path_factory.mktemp("split"), per_class=12, seed=4, split_folders=True)


def _relative(paths: list[str], root: str) -> list[str]:
    return sorted(p[len(root) :].lstrip("/") for p in paths)


def test_discover_flat_layout(flat_tree):
    images = discover(str(flat_tree))
    assert len(images) == 24
    assert images.class_counts() == {"Cancer": 12, "Non_Cancer": 12}
    for path, label in zip(images.paths, images.labels, strict=True):
        assert Path(path).parent.name == images.class_names[label]


def test_discover_split_layout_and_subset(split_tree):
    everything = discover(str(split_tree))
    training = discover(str(split_tree), subset="Training")
    testing = discover(str(split_tree), subset="Testing")
    assert len(everything) == 24
    assert len(training) == 18 and len(testing) == 6
    assert all("/Training/" in p for p in training.paths)
    assert set(training.paths) | set(testing.paths) == set(everything.paths)


def test_a_root_relative_to_the_working_directory_is_read_as_its_absolute_path(split_tree, monkeypatch):
    """Local roots are listed as absolute paths: each image's path relative to its root (what metadata tables name)
    and the subset folder are the same whichever way the root was given."""
    monkeypatch.chdir(split_tree.parent)
    relative, absolute = discover(split_tree.name, subset="Training"), discover(str(split_tree), subset="Training")
    assert len(relative) == 18
    assert [origin.relative for origin in relative.origins] == [origin.relative for origin in absolute.origins]
    assert all(origin.relative.startswith(("Cancer/Training/", "Non_Cancer/Training/")) for origin in relative.origins)


def test_discover_ignores_non_images_and_needs_both_classes(tmp_path, flat_tree):
    root = tmp_path / "tree"
    shutil.copytree(flat_tree, root)
    (root / "Cancer" / "notes.txt").write_text("not an image")
    assert len(discover(str(root))) == 24
    shutil.rmtree(root / "Non_Cancer")
    with pytest.raises(FileNotFoundError, match="Non_Cancer"):
        discover(str(root))


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_discover_on_s3_matches_local(layout, flat_tree, split_tree, bucket):
    local = flat_tree if layout == "flat" else split_tree
    uri = f"s3://{bucket}/data/{layout}"
    storage.upload_dir(str(local), uri)
    on_s3, on_disk = discover(uri), discover(str(local))
    assert _relative(on_s3.paths, uri) == _relative(on_disk.paths, str(local))
    assert on_s3.class_counts() == on_disk.class_counts()
    if layout == "split":
        assert len(discover(uri, subset="Testing")) == 6


def test_split_is_deterministic_and_keeps_duplicates_together(ray_session, tmp_path, flat_tree):
    root = tmp_path / "tree"
    shutil.copytree(flat_tree, root)
    # Five files duplicated under new names (identical bytes), one of them into a broken copy too.
    for source in sorted((root / "Cancer").glob("*.jpg"))[:5]:
        shutil.copy(source, source.with_name("copy_of_" + source.name))
    (root / "Non_Cancer" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely truncated")
    images = discover(str(root))
    first, second = split_by_content(images, SPEC, 0.3), split_by_content(images, SPEC, 0.3)
    assert first.validation.paths == second.validation.paths
    assert first.fingerprint == second.fingerprint
    assert list(first.skipped) == [str((root / "Non_Cancer" / "broken.jpg").absolute())]
    assert len(first.train) + len(first.validation) == len(images) - 1
    validation = set(first.validation.paths)
    for copy in root.glob("Cancer/copy_of_*.jpg"):
        original = copy.with_name(copy.name.removeprefix("copy_of_"))
        assert (str(copy.absolute()) in validation) == (str(original.absolute()) in validation)
    assert 0 < len(first.validation) < len(images)


def test_two_roots_split_by_lesion_and_the_recorded_split_is_found_again(ray_session, tmp_path, flat_tree):
    """Two roots whose tables name shared lesions and one photograph copied from the first root into the second:
    one group per lesion across roots, the copy left out, and the bundle's record of the split finds the same
    split; a table that names none of its root's images is refused."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(flat_tree, first)
    shutil.copytree(flat_tree, second)
    for path in second.glob("*/*.jpg"):  # new bytes, same lesions: a second photograph of each
        path.write_bytes(path.read_bytes() + b"\0")
    (second / "Cancer" / "copy.jpg").write_bytes((first / "Cancer" / "cancer_0000.jpg").read_bytes())  # the same bytes
    rows = "file,lesion_id,duplicate_of\n" + "".join(
        f"{path.relative_to(second).as_posix()},les_{path.stem},\n" for path in sorted(second.glob("*/*_*.jpg")))
    (second / "metadata.csv").write_text(rows + "Cancer/copy.jpg,,Cancer/cancer_0000.jpg\n")
    (tmp_path / "first.csv").write_text("relpath,lesion_id\n" + "".join(
        f"{path.relative_to(first).as_posix()},les_{path.stem}\n" for path in sorted(first.glob("*/*.jpg"))))
    images = discover_sources([str(first), str(second)],
                              [f"{first}=" + str(tmp_path / "first.csv"), str(second / "metadata.csv")])
    split = split_by_content(images, SPEC, 0.3)
    copy, original = (str(path.absolute()) for path in (second / "Cancer" / "copy.jpg", first / "Cancer" / "cancer_0000.jpg"))
    assert split.duplicates == {copy: original}
    assert len(split.train) + len(split.validation) == 48 and split.provenance["groups"] == 24
    assert 0 < len(split.validation) < 48
    for name in {Path(path).name for path in images.paths} - {"copy.jpg"}:  # both photographs of a lesion together
        assert sum(Path(path).name == name for path in split.validation.paths) in (0, 2), name
    assert split.describe()["sources"] == [str(first), str(second)] and len(split.describe()["tables"]) == 2
    # Found again without the tables (as a bundle does): the copy, the same bytes as the photograph kept, stays out.
    untabled = discover_sources([str(first), str(second)])
    again = recorded_split(untabled, SPEC, frozenset(split.train_digests), frozenset(split.validation_digests),
                           split.provenance)
    assert again.validation.paths == split.validation.paths and again.train.paths == split.train.paths
    assert again.fingerprint == split.fingerprint
    (tmp_path / "elsewhere.csv").write_text("file\nCancer/elsewhere.jpg\n")
    with pytest.raises(ValueError, match="names none of the images"):
        discover_sources([str(first), str(second)], [f"{second}={tmp_path / 'elsewhere.csv'}"])


def test_training_pipeline_and_predict_see_the_same_array(ray_session, flat_tree):
    """The Ray Data training input and `predict`'s reader both equal preprocess_image of the file."""
    images = discover(str(flat_tree))
    rows = image_dataset(images, SPEC).take_all()
    assert len(rows) == len(images)
    paths = np.array([row["path"] for row in rows[:6]], dtype=object)
    predict_input = load_images({"path": paths}, SPEC)["image"]  # what `skin-ray predict` feeds the model
    for row, predicted in zip(rows[:6], predict_input, strict=True):
        reference = preprocess_image(storage.read_bytes(row["path"]), SPEC.size)
        np.testing.assert_array_equal(row["image"], reference)
        np.testing.assert_array_equal(predicted, reference)


@needs_real_data
def test_real_data_split(ray_session):
    images = discover(str(REAL_DATA))
    assert images.class_counts() == {"Cancer": 1197, "Non_Cancer": 1440}
    split = split_by_content(images, SPEC, 0.2)
    assert not split.skipped
    # Cancer/768.jpg and Cancer/769.jpg are the same image: same side of the split.
    validation = {Path(p).relative_to(REAL_DATA).as_posix() for p in split.validation.paths}
    assert ("Cancer/768.jpg" in validation) == ("Cancer/769.jpg" in validation)
    assert 0.17 < len(split.validation) / len(images) < 0.23


@pytest.mark.parametrize("max_bytes", [None, 2**20], ids=["whole", "size-checked"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_file_gone_before_it_is_read_is_a_row_with_an_error(where, max_bytes, tmp_path, request):
    """A file listed and then deleted (S3 answers 404 to the size check, NoSuchKey to the read) becomes an
    `unreadable` row beside the files that were read, not a failed job."""
    missing = f"s3://{request.getfixturevalue('bucket')}/gone.jpg" if where == "s3" else str(tmp_path / "gone.jpg")
    present = tmp_path / "present.jpg"
    present.write_bytes(encode(lesion_image("Cancer", np.random.default_rng(0))))
    batch = load_images({"path": np.array([missing, str(present)], dtype=object)}, SPEC, max_bytes)
    assert batch["error"][0].startswith("unreadable:") and "gone.jpg" in batch["error"][0], batch["error"][0]
    assert batch["error"][1] == "" and batch["image"][1].any()
