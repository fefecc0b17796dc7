"""The batch job on a real local Ray: one row per file, bad files included, local and S3, resume, faults."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_ray import storage
from skin_ray.classify import classify, read_results
from skin_ray.config import ClassifySettings
from skin_ray.testing import encode, lesion_image

ROOT = Path(__file__).resolve().parents[1]
BAD = {  # relative path -> expected error reason
    "broken/truncated.jpg": "truncated",
    "broken/empty.JPG": "empty",
    "broken/deeper/text.png": "not_an_image",
    "broken/huge.tif": "too_large",
}


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> Path:
    """Nested folders of generated images in several formats and extension cases, plus broken files."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(11)
    formats = [("JPEG", ".jpg"), ("PNG", ".PNG"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("JPEG", ".Jpeg"), ("TIFF", ".tiff")]
    for i in range(30):
        fmt, suffix = formats[i % len(formats)]
        folder = root / f"clinic_{i % 3}" / f"day_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:03d}{suffix}").write_bytes(encode(lesion_image(("Cancer", "Non_Cancer")[i % 2], rng), fmt))
    (root / "broken" / "deeper").mkdir(parents=True)
    good = encode(lesion_image("Cancer", rng), "JPEG")
    (root / "broken" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "broken" / "empty.JPG").write_bytes(b"")
    (root / "broken" / "deeper" / "text.png").write_text("a text file with an image's name")
    (root / "broken" / "huge.tif").write_bytes(encode(Image.new("RGB", (600, 600)), "TIFF"))  # > max_file_mb below
    (root / "notes.txt").write_text("not an image: not an input either")
    return root


def _image_files(root: Path) -> list[str]:
    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    return sorted(str(p.absolute()) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _config(source, output, bundle, **overrides) -> ClassifySettings:
    settings = dict(bundle=str(bundle), batch_size=8, workers=2, max_file_mb=0.5, rows_per_file=16)
    return ClassifySettings(source=str(source), output=str(output), **{**settings, **overrides})


def _check_rows(results, expected_paths: list[str], reasons: dict[str, str]) -> None:
    assert sorted(results["path"]) == sorted(expected_paths)  # exactly one row per file
    for _, row in results.iterrows():
        reason = reasons.get(row["path"])
        if reason:
            assert row["error"].startswith(reason + ":"), row["error"]
            assert pd.isna(row["label"]) and pd.isna(row["cancer_probability"])
        else:
            assert not isinstance(row["error"], str) or not row["error"], row["error"]
            assert row["label"] in ("Cancer", "Non_Cancer")
            assert 0.0 <= float(row["cancer_probability"]) <= 1.0
        assert row["model_version"] == "untrained-test"
        digest = None if reason == "too_large" else hashlib.sha256(storage.read_bytes(row["path"])).hexdigest()  # refused unread
        assert (row["input_sha256"] if isinstance(row["input_sha256"], str) else None) == digest, row["path"]


def test_local_directory_gives_one_row_per_file(ray_session, mixed_tree, untrained_bundle, tmp_path):
    summary = classify(_config(mixed_tree, tmp_path / "out", untrained_bundle))
    files = _image_files(mixed_tree)
    assert summary["files"] == summary["rows"] == summary["this_run"] == len(files) == 34
    assert summary["errors"] == {"truncated": 1, "empty": 1, "not_an_image": 1, "too_large": 1}
    assert summary["classified"] == 30
    reasons = {str((mixed_tree / relative).absolute()): reason for relative, reason in BAD.items()}
    _check_rows(read_results(str(tmp_path / "out"), "parquet"), files, reasons)
    _check_reads_as_one_table(tmp_path / "out", 34)


def _check_reads_as_one_table(folder: Path, rows: int) -> None:
    """Every reader of a Parquet folder reads the result files as one table: they share one schema, also when
    one file holds errors and another none (whose error columns inference would type `null`)."""
    import duckdb
    import pyarrow.dataset
    import pyarrow.parquet
    import ray

    files = sorted(folder.glob("*.parquet"))
    errors = [pyarrow.parquet.read_table(f, columns=["error"])["error"] for f in files]
    with_errors = [column.null_count < len(column) for column in errors]
    assert any(with_errors) and not all(with_errors), "no file without errors beside one with: nothing was tested"
    schemas = [pyarrow.parquet.read_schema(f) for f in files]
    assert all(schema.equals(schemas[0]) for schema in schemas)
    assert len(pd.read_parquet(folder)) == rows
    assert pyarrow.dataset.dataset(folder).count_rows() == rows
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall() == [(rows,)]
    assert ray.data.read_parquet(str(folder)).count() == rows


def test_a_resume_into_results_of_other_columns_is_refused(untrained_bundle, tmp_path):
    """A folder written by another version (here: `error` typed `null`, no `explanation`) would not read as one
    table with this job's files: --resume refuses it, before Ray starts."""
    import pyarrow
    import pyarrow.parquet

    from skin_ray.classify import check_output

    tmp_path.joinpath("out").mkdir()
    pyarrow.parquet.write_table(pyarrow.table({"path": ["a.jpg"], "error": pyarrow.nulls(1)}), tmp_path / "out" / "old.parquet")
    with pytest.raises(ValueError, match="other columns than this job writes.*error: null"):
        check_output(_config(tmp_path, tmp_path / "out", untrained_bundle, resume=True))


@pytest.mark.parametrize("bundle_fixture", ["untrained_bundle", "small_input_bundle"])  # 170 and 96 pixels
def test_results_agree_with_predict(request, ray_session, mixed_tree, bundle_fixture, tmp_path):
    bundle = request.getfixturevalue(bundle_fixture)
    classify(_config(mixed_tree, tmp_path / "out", bundle, format="jsonl"))
    results = read_results(str(tmp_path / "out"), "jsonl").set_index("path")
    sample = _image_files(mixed_tree)[::5]
    predicted = subprocess.run(["skin-ray", "predict", *sample, "--bundle", str(bundle)], capture_output=True, text=True)
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(rows) == len(sample) and any(row["error"] is None for row in rows), predicted.stderr
    assert predicted.returncode == (1 if any(row["error"] for row in rows) else 0), predicted.stderr
    for row in rows:
        result = results.loc[row["path"]]
        if row["error"] is None:
            assert result["label"] == row["label"]
            assert result["cancer_probability"] == pytest.approx(row["cancer_probability"], abs=1e-6)
        else:
            assert result["error"] == row["error"] and pd.isna(result["label"])


def test_formats_round_trip(ray_session, mixed_tree, untrained_bundle, tmp_path):
    frames = {}
    for fmt in ("parquet", "csv", "jsonl"):
        classify(_config(mixed_tree, tmp_path / fmt, untrained_bundle, format=fmt))
        frames[fmt] = read_results(str(tmp_path / fmt), fmt).sort_values("path").reset_index(drop=True)
    for fmt in ("csv", "jsonl"):
        assert list(frames[fmt]["path"]) == list(frames["parquet"]["path"])
        np.testing.assert_allclose(
            frames[fmt]["cancer_probability"].astype(float), frames["parquet"]["cancer_probability"].astype(float), atol=1e-6
        )
        same_label = frames[fmt]["label"].fillna("") == frames["parquet"]["label"].fillna("")
        assert same_label.all()
    # Nested fields survive: a map in JSON lines, JSON text in CSV (which has no nested types).
    for as_text, as_map in zip(frames["csv"]["probabilities"], frames["jsonl"]["probabilities"], strict=True):
        if isinstance(as_map, dict):
            assert json.loads(as_text) == pytest.approx(as_map, abs=1e-6)
        else:  # an error row: no probabilities
            assert pd.isna(as_text) or as_text == ""


def test_s3_to_s3(ray_session, mixed_tree, untrained_bundle, bucket, tmp_path):
    source = f"s3://{bucket}/incoming"
    storage.upload_dir(str(mixed_tree), source)
    output = f"s3://{bucket}/results/run1"
    summary = classify(_config(source, output, untrained_bundle))
    assert summary["rows"] == summary["files"] == 34
    results = read_results(output, "parquet")
    expected = [f"{source}/{Path(p).relative_to(mixed_tree.absolute()).as_posix()}" for p in _image_files(mixed_tree)]
    reasons = {f"{source}/{relative}": reason for relative, reason in BAD.items()}
    _check_rows(results, expected, reasons)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(summary)


def test_resume_classifies_only_what_is_missing(ray_session, mixed_tree, untrained_bundle, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(mixed_tree, source)
    output = tmp_path / "out"
    first = classify(_config(source, output, untrained_bundle))
    assert first["this_run"] == 34
    rng = np.random.default_rng(12)
    for i in range(5):
        lesion_image("Non_Cancer", rng).save(source / "clinic_0" / f"late_{i}.jpg")
    with pytest.raises(FileExistsError):
        classify(_config(source, output, untrained_bundle))
    second = classify(_config(source, output, untrained_bundle, resume=True))
    assert second["this_run"] == 5
    assert second["rows"] == second["files"] == 39
    paths = read_results(str(output), "parquet")["path"]
    assert paths.is_unique
    again = classify(_config(source, output, untrained_bundle, resume=True))
    assert again["this_run"] == 0 and again["rows"] == 39
    _check_reads_as_one_table(output, 39)  # the resumed run's file holds no error, the first run's do


def _classifier_actors(ray_session) -> list:
    from ray.util.state import list_actors

    alive = list_actors(address=ray_session.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return [a for a in alive if "Classifier" in a.class_name]


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """480 lesion photos in 4 folders: a job that runs for a while (through the 96-pixel bundle: the tests that use
    it are about kills and resumes, not the network)."""
    source = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(13)
    for i in range(480):
        folder = source / f"part_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=200).save(folder / f"{i:04d}.jpg")
    return source


def test_a_killed_classifier_actor_loses_no_rows_and_the_job_says_so(ray_session, many_images, small_input_bundle, tmp_path):
    """SIGKILL of a classifier actor mid-job: Ray Data restarts it and retries its batches, so every file still
    gets its row, and `skin-ray classify` says on stderr which actor died and why."""
    output = tmp_path / "out"
    command = ["skin-ray", "classify", str(many_images), "--output", str(output), "--bundle", str(small_input_bundle),
               "--batch-size", "4", "--workers", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (victims := _classifier_actors(ray_session)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victims, "no classifier actor appeared"
        os.kill(victims[0].pid, signal.SIGKILL)
        assert job.poll() is None, "the job ended before the kill: nothing was tested"
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["rows"] == summary["files"] == 480
    results = read_results(str(output), "parquet")
    assert results["path"].is_unique and results["error"].isna().all()
    restarts = [line for line in stderr.splitlines() if line.startswith("Classifier actor")]
    assert len(restarts) == 1, stderr[-3000:]
    assert victims[0].actor_id[:8] in restarts[0] and "Ray restarted it" in restarts[0] and "no row is lost" in restarts[0]


def test_a_killed_job_keeps_what_it_finished_and_resume_completes_it(ray_session, many_images, small_input_bundle, tmp_path):
    """The driver killed outright (SIGKILL, no clean-up) mid-job: the rows of every interval it finished are on
    disk, although fewer than --rows-per-file, and `--resume` classifies exactly the files that are not."""
    output = tmp_path / "out"
    command = ["skin-ray", "classify", str(many_images), "--output", str(output), "--bundle", str(small_input_bundle),
               "--batch-size", "4", "--flush-interval-s", "0.5"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(output.glob("*.parquet")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    job.kill()
    assert job.wait(timeout=60) == -signal.SIGKILL, "the job ended before the kill: nothing was tested"
    kept = read_results(str(output), "parquet")
    assert 0 < len(kept) < 480 and kept["path"].is_unique
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["this_run"] == 480 - len(kept)
    results = read_results(str(output), "parquet")
    assert len(results) == 480 and results["path"].is_unique


def test_ray_job_submit(ray_context, mixed_tree, untrained_bundle, tmp_path):
    """`ray job submit --working-dir . -- skin-ray classify ...` against the running cluster."""
    output = tmp_path / "job_out"
    command = [
        "ray", "job", "submit", "--address", f"http://{ray_context.dashboard_url}", "--working-dir", str(ROOT), "--",
        "skin-ray", "classify", str(mixed_tree), "--output", str(output), "--bundle", str(untrained_bundle), "--format", "csv",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith('{"files"')][-1])
    assert summary["rows"] == summary["files"] == 34
    assert len(read_results(str(output), "csv")) == 34
