"""The `skin-ray` command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from skin_ray import storage
from skin_ray.predictor import Predictor
from skin_ray.preprocess import preprocess_image


def skin_ray_cli(*args: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    return subprocess.run(["skin-ray", *args], capture_output=True, text=True, env=env, timeout=300)


def test_predict_prints_one_line_per_image_and_survives_bad_files(lesion_tree, untrained_bundle, tmp_path):
    good = sorted((lesion_tree / "Cancer").glob("*.jpg"))[:2]
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    missing = tmp_path / "missing.jpg"
    result = skin_ray_cli("predict", *map(str, good), str(text), str(missing), "--model", str(untrained_bundle))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == [*map(str, good), str(text), str(missing)]
    predictor = Predictor.from_bundle(str(untrained_bundle))
    for row, path in zip(rows, good):
        expected = predictor.to_prediction(predictor.predict_arrays(preprocess_image(path.read_bytes())[None])[0])
        assert row["error"] is None
        assert row["label"] == expected.label
        assert row["cancer_probability"] == pytest.approx(expected.cancer_probability, abs=1e-6)
    assert rows[2]["error"].startswith("not_an_image") and rows[2]["label"] is None
    assert rows[3]["error"].startswith("unreadable")


def test_predict_reads_from_s3(lesion_tree, untrained_bundle, bucket):
    path = sorted((lesion_tree / "Non_Cancer").glob("*.jpg"))[0]
    uri = f"s3://{bucket}/one.jpg"
    storage.write_bytes(uri, path.read_bytes())
    result = skin_ray_cli("predict", uri, "--model", str(untrained_bundle))
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["path"] == uri and row["error"] is None


def test_evaluate_prints_metrics_and_writes_plots(ray_session, lesion_tree, untrained_bundle, tmp_path):
    report = tmp_path / "report"
    address = ray_session.get_runtime_context().gcs_address
    result = skin_ray_cli("evaluate", str(lesion_tree), "--model", str(untrained_bundle), "--report", str(report), ray_address=address)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 240 and summary["errors"] == 0
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "threshold", "ece"):
        assert isinstance(summary[key], float), key
    low, high = summary["roc_auc_ci95"]
    assert low <= summary["roc_auc"] <= high
    assert summary["threshold"] == 0.5
    for name in ("roc.png", "confusion.png", "calibration.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cli_rejects_a_batch_that_does_not_split(tmp_path):
    result = skin_ray_cli("train", str(tmp_path), "--output", str(tmp_path / "b"), "--workers", "3", "--batch-size", "32")
    assert result.returncode != 0
    assert "multiple of --workers" in result.stderr
