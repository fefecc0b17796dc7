"""The `skin-ray` command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

import skin_ray
from skin_ray import storage
from skin_ray.bundle import GATE_FILE, METADATA_FILE, TRAIN_DIGESTS_FILE, VALIDATION_DIGESTS_FILE
from skin_ray.data import in_validation
from skin_ray.predictor import Predictor
from skin_ray.preprocess import preprocess_image
from skin_ray.testing import encode, free_port, skin_ray_cli

pytestmark = pytest.mark.ray  # every test here runs `skin-ray` (TensorFlow, and Ray for most) in a subprocess

# Where no Ray listens: a command that started or joined Ray before its own checks would fail on this
# address instead of giving its one-line reason.
NO_RAY = "127.0.0.1:1"
# What the default (quiet) output must not contain: Ray's, Ray Data's and TensorFlow's own logs.
NOISE = ("oneDNN", "absl::", "Token authentication", " INFO ", "RayTrainWorker", "Traceback")


def assert_quiet(stderr: str) -> None:
    assert not [word for word in NOISE if word in stderr], stderr


def test_predict_prints_one_line_per_image_and_survives_bad_files(lesion_tree, untrained_bundle, tmp_path):
    good = sorted((lesion_tree / "Cancer").glob("*.jpg"))[:2]
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    missing = tmp_path / "missing.jpg"
    result = skin_ray_cli("predict", *map(str, good), str(text), str(missing), "--bundle", str(untrained_bundle))
    assert result.returncode == 1, result.stderr  # some files could not be classified
    assert result.stderr == "skin-ray predict: 2 of 4 files could not be classified\n"
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [*map(str, good), str(text), str(missing)]
    predictor = Predictor.from_bundle(str(untrained_bundle))
    for row, path in zip(rows[: len(good)], good, strict=True):
        image = preprocess_image(path.read_bytes(), predictor.metadata.image_size)
        expected = predictor.to_prediction(predictor.predict_arrays(image[None])[0])
        assert row["error"] is None
        assert row["label"] == expected.label
        assert row["cancer_probability"] == pytest.approx(expected.cancer_probability, abs=1e-6)
    assert rows[2]["error"].startswith("not_an_image") and rows[2]["label"] is None
    assert rows[3]["error"].startswith("unreadable")


def test_predict_searches_folders_and_prints_nothing_else(lesion_tree, untrained_bundle, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(lesion_tree / "Cancer", folder / "nested")
    (folder / "notes.txt").write_text("not an image suffix: not searched")
    result = skin_ray_cli("predict", str(folder), "--bundle", str(untrained_bundle))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in (folder / "nested").glob("*.jpg"))
    assert all(row["error"] is None for row in rows)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = skin_ray_cli("predict", str(empty), "--bundle", str(untrained_bundle))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("skin-ray predict: error: no image files") and result.stderr.count("\n") == 1


def test_version_and_help_show_what_a_new_user_needs():
    result = skin_ray_cli("--version")
    assert result.stdout.strip() == f"skin-ray {skin_ray.__version__}"
    result = skin_ray_cli("classify", "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for shown in ("--batch-size BATCH_SIZE images per model call (default: 32)", "(default: parquet)", "--verbose"):
        assert shown in help_text
    assert "(default: 8000)" in " ".join(skin_ray_cli("serve", "--help").stdout.split())


def test_classify_reports_progress_on_stderr_and_its_summary_alone_on_stdout(
    ray_session, lesion_tree, untrained_bundle, tmp_path
):
    address = ray_session.get_runtime_context().gcs_address
    result = skin_ray_cli(
        "classify", str(lesion_tree), "--output", str(tmp_path / "out"), "--bundle", str(untrained_bundle), ray_address=address,
        RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL="1",  # Ray Data's report interval when not on a terminal (10 s)
    )
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stderr)
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["rows"] == 240
    progress = [
        line
        for line in result.stderr.splitlines()
        if re.fullmatch(r"classify: ([\d,]+ rows( of [\d,]+)?, [\d.]+/s(, about .* left)?|finished in [\d.]+ s)", line)
    ]
    assert progress, result.stderr


def test_classify_refuses_a_used_output_before_starting_ray(lesion_tree, tmp_path):
    output = tmp_path / "results"
    output.mkdir()
    (output / "earlier.parquet").write_bytes(b"")
    result = skin_ray_cli("classify", str(lesion_tree), "--output", str(output), ray_address=NO_RAY)
    assert result.returncode == 2
    assert result.stderr.startswith("skin-ray classify: error:") and "--resume" in result.stderr
    assert result.stderr.count("\n") == 1


def test_serve_on_a_port_in_use_says_so_before_starting_ray():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = skin_ray_cli("serve", "--port", str(port), ray_address=NO_RAY)
    assert result.returncode == 2
    assert (
        result.stderr
        == f"skin-ray serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "stop what uses it or pass --port\n"
    )


def test_predict_reads_from_s3(lesion_tree, untrained_bundle, bucket):
    path = sorted((lesion_tree / "Non_Cancer").glob("*.jpg"))[0]
    uri = f"s3://{bucket}/one.jpg"
    storage.write_bytes(uri, path.read_bytes())
    result = skin_ray_cli("predict", uri, "--bundle", str(untrained_bundle))
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["path"] == uri and row["error"] is None


def test_evaluate_prints_metrics_and_writes_plots(ray_session, lesion_tree, untrained_bundle, tmp_path):
    report = tmp_path / "report"
    address = ray_session.get_runtime_context().gcs_address
    result = skin_ray_cli(
        "evaluate", str(lesion_tree), "--bundle", str(untrained_bundle), "--report", str(report), ray_address=address
    )
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stderr)
    (line,) = result.stdout.splitlines()  # stdout holds the result alone
    summary = json.loads(line)
    assert json.loads((report / "summary.json").read_text()) == summary
    assert summary["n"] == 240 and summary["errors"] == 0 and summary["seen_in_training"] == 0
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "ece"):
        assert isinstance(summary[key], float), key
    low, high = summary["roc_auc_ci95"]
    assert low <= summary["roc_auc"] <= high
    assert summary["threshold"] == 0.5
    for name in ("roc.png", "confusion.png", "calibration.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _two_roots_with_lesion_tables(lesion_tree, local, uri) -> tuple[list[str], dict[str, str]]:
    """The lesion tree as two data roots, the first half of each class on disk and the rest under `uri` (S3), each
    with a metadata table; the i-th image of a class in one root and in the other show one lesion. Returns the
    `train` arguments for them and each image's lesion by content digest."""
    lesion_of, rows = {}, {local: [["file", "lesion_id"]], uri: [["relpath", "lesion_id"]]}
    for label in ("Cancer", "Non_Cancer"):
        files = sorted((lesion_tree / label).glob("*.jpg"))
        half = len(files) // 2
        for i, path in enumerate(files):
            root, lesion = (local, uri)[i >= half], f"les_{label}_{i % half}"
            relative = f"{label}/{path.name}"
            rows[root].append([relative, lesion])
            lesion_of[hashlib.sha256(path.read_bytes()).hexdigest()] = lesion
            storage.write_bytes(storage.join(root, relative), path.read_bytes())
    tables = {local: f"{local}-lesions.csv", uri: storage.join(uri, "lesions.csv")}  # the first beside its root
    for root, table in tables.items():
        storage.write_bytes(table, "".join(",".join(row) + "\n" for row in rows[root]).encode())
    return [local, uri, "--metadata", f"{local}={tables[local]}", "--metadata", tables[uri]], lesion_of


def test_train_prints_one_clean_line_per_epoch(ray_session, lesion_tree, tmp_path, bucket):
    """Train from two roots, one on disk and one on S3, grouped by their lesion tables; then optimize and
    fit-safeguards find the bundle's recorded split in both roots again."""
    address = ray_session.get_runtime_context().gcs_address
    data, lesion_of = _two_roots_with_lesion_tables(lesion_tree, str(tmp_path / "local"), f"s3://{bucket}/lesions")
    result = skin_ray_cli(
        "train", *data, "--output", str(tmp_path / "bundle"), "--epochs", "2", "--workers", "1",
        "--storage-path", str(tmp_path / "runs"), "--input-size", "96", ray_address=address,
    )
    assert result.returncode == 0, result.stderr
    described = json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["data"]
    assert described["sources"] == data[:2] and [table["rows"] for table in described["tables"]] == [120, 120]
    assert described["group_column"] == "lesion_id" and described["groups"] == 120
    sides = {}
    for name, side in ((TRAIN_DIGESTS_FILE, "train"), (VALIDATION_DIGESTS_FILE, "validation")):
        for digest in (tmp_path / "bundle" / name).read_text().split():
            sides.setdefault(lesion_of[digest], set()).add(side)
    assert len(sides) == 120 and all(len(side) == 1 for side in sides.values())  # no lesion on both sides
    assert_quiet(result.stderr)
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[:2] for line in epochs] == [["epoch", "1/2"], ["epoch", "2/2"]], result.stderr
    assert "left" in epochs[0] and "left" not in epochs[1]
    assert "\x1b[" not in "".join(epochs) and "pid=" not in result.stderr
    (summary,) = result.stdout.splitlines()  # stdout holds the result alone
    assert json.loads(summary)["bundle"] == str(tmp_path / "bundle")
    assert (tmp_path / "bundle" / TRAIN_DIGESTS_FILE).read_text().count("\n") == sum(
        json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["data"]["train"].values()
    )

    # optimize gives it the faster runtime, checked against its network on its own validation split.
    result = skin_ray_cli("optimize", str(tmp_path / "bundle"), ray_address=address)
    assert result.returncode == 0, result.stderr
    runtime = json.loads(result.stdout)["runtime"]
    assert runtime["validation"]["labels_differ"] == 0 and runtime["validation"]["n"] == sum(
        json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["data"]["validation"].values()
    )
    assert json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["runtime"] == runtime
    assert (tmp_path / "bundle" / runtime["file"]).is_file()

    # fit-safeguards gives a bundle made before safeguards existed its own, fitted also against a folder of
    # "real" outliers from two repositories, leaving the model file as it is, and drops the runtime validated
    # against the safeguards it replaces.
    model_bytes = (tmp_path / "bundle" / "model.keras").read_bytes()
    older = {**json.loads((tmp_path / "bundle" / METADATA_FILE).read_text()), "input_gate": None, "uncertainty": None}
    (tmp_path / "bundle" / METADATA_FILE).write_text(json.dumps(older))
    (tmp_path / "bundle" / GATE_FILE).unlink()
    outliers = _real_outlier_folder(tmp_path / "outliers")
    result = skin_ray_cli("fit-safeguards", str(tmp_path / "bundle"), "--outliers", str(outliers), ray_address=address)
    assert result.returncode == 0, result.stderr
    refitted = json.loads(result.stdout)
    assert refitted["input_gate"]["validation_tpr"] == 0.95 and refitted["uncertainty"]["margin"] >= 0
    real = refitted["input_gate"]["not_dermoscopy"]["stripes (real)"]
    assert real["n"] == 12 and real["sources"] == 2 and 0 <= real["refused_left_out_source"] <= 1
    assert (tmp_path / "bundle" / GATE_FILE).is_file() and (tmp_path / "bundle" / "model.keras").read_bytes() == model_bytes
    assert json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["input_gate"] == refitted["input_gate"]
    assert json.loads((tmp_path / "bundle" / METADATA_FILE).read_text())["runtime"] is None
    assert "`skin-ray optimize` validates it again" in result.stderr


def _real_outlier_folder(folder):
    """A kind sub-folder of striped pictures (not dermoscopy) from two repositories, as not_dermoscopy/ holds."""
    (folder / "stripes").mkdir(parents=True)
    rows = ["file\trepository"]
    for i in range(12):
        stripes = np.zeros((80, 120, 3), np.uint8)
        stripes[:, (np.arange(120) // (3 + i)) % 2 == 0] = (40 * (i % 5), 200, 255 - 15 * i)
        (folder / "stripes" / f"stripes_{i}.jpg").write_bytes(encode(Image.fromarray(stripes)))
        rows.append(f"stripes/stripes_{i}.jpg\towner/{'charts' if i % 2 else 'plots'}")
    (folder / "SOURCES.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_train_cli_rejects_a_batch_that_does_not_split(tmp_path):
    result = skin_ray_cli("train", str(tmp_path), "--output", str(tmp_path / "b"), "--workers", "3", "--batch-size", "32")
    assert result.returncode != 0
    assert "multiple of --workers" in result.stderr


@pytest.fixture(scope="module")
def bundle_trained_on_lesion_tree(untrained_bundle, lesion_tree, tmp_path_factory):
    """The untrained bundle, recorded as trained on the training side of a 0.3 content-hash split of the tree."""
    bundle = tmp_path_factory.mktemp("recorded") / "bundle"
    shutil.copytree(untrained_bundle, bundle)
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["training"] = {"validation_fraction": 0.3}
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in lesion_tree.rglob("*.jpg")]
    trained_on = sorted(d for d in digests if not in_validation(d, 0.3))
    (bundle / TRAIN_DIGESTS_FILE).write_text("".join(f"{d}\n" for d in trained_on))
    return bundle, len(trained_on)


def test_evaluate_warns_about_images_the_bundle_was_trained_on(ray_session, lesion_tree, bundle_trained_on_lesion_tree):
    bundle, trained_on = bundle_trained_on_lesion_tree
    address = ray_session.get_runtime_context().gcs_address
    result = skin_ray_cli("evaluate", str(lesion_tree), "--bundle", str(bundle), ray_address=address)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < trained_on < 240 and summary["seen_in_training"] == trained_on
    assert f"{trained_on} of the 240 images scored were in untrained-test's training split" in result.stderr
    assert "--split validation" in result.stderr

    result = skin_ray_cli("evaluate", str(lesion_tree), "--bundle", str(bundle), "--split", "validation", ray_address=address)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 240 - trained_on and summary["not_in_validation"] == trained_on
    assert summary["seen_in_training"] == 0 and "training split" not in result.stderr


def test_evaluate_validation_split_needs_a_bundle_that_records_it(ray_session, lesion_tree, untrained_bundle):
    address = ray_session.get_runtime_context().gcs_address
    result = skin_ray_cli(
        "evaluate", str(lesion_tree), "--bundle", str(untrained_bundle), "--split", "validation", ray_address=address
    )
    assert result.returncode == 2
    error = result.stderr.splitlines()[-1]  # after "connected to the running Ray cluster"
    assert error.startswith("skin-ray evaluate: error:") and "does not record its validation split" in error


def test_validation_rows_score_each_recorded_content_once():
    """`evaluate --split validation` scores a recorded validation image once, however many trees hold a
    byte-identical copy (the split holds one file per content), and never an unreadable or training image."""
    from skin_ray.evaluate import validation_rows

    scored = set()
    readable = np.array([True, True, True, False, True])
    first = validation_rows(["a", "b", "a", "c", "t"], readable, frozenset("abc"), 0.2, scored)
    assert first.tolist() == [True, True, False, False, False] and scored == {"a", "b"}
    later = validation_rows(["b", "c"], np.array([True, True]), frozenset("abc"), 0.2, scored)  # a later batch
    assert later.tolist() == [False, True]
