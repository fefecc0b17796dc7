"""One prediction record everywhere: the same file through predict, /predict, /predict/batch, classify and
evaluate gives the same fields and values; /explain and classify --explain add Grad-CAM overlays."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ray import serve

from skin_ray.classify import classify, read_results
from skin_ray.config import ClassifySettings, EvaluateSettings, ServeSettings
from skin_ray.evaluate import evaluate
from skin_ray.gate_images import documents
from skin_ray.record import OUT_OF_DISTRIBUTION, RECORD_FIELDS
from skin_ray.serve import app_builder
from skin_ray.testing import encode, free_port, lesion_image


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A lesion the guarded bundle accepts (non-square, as photos are) and a page of text it refuses."""
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("records")
    (root / "Cancer").mkdir()
    (root / "Non_Cancer").mkdir()
    lesion = lesion_image("Cancer", rng).resize((160, 120))
    (root / "Cancer" / "lesion.jpg").write_bytes(encode(lesion))
    (root / "Non_Cancer" / "page.jpg").write_bytes(encode(documents(rng, 1)[0]))
    return root


@pytest.fixture(scope="module")
def service(ray_session, guarded_bundle):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(ServeSettings(bundle=str(guarded_bundle))), name="records", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_every_path_gives_the_same_record(service, guarded_bundle, tree, tmp_path):
    files = sorted(tree.rglob("*.jpg"))
    predicted = subprocess.run(
        ["skin-ray", "predict", str(tree), "--bundle", str(guarded_bundle)], capture_output=True, text=True
    )
    paths = {
        "predict": {row.pop("path"): row for row in map(json.loads, predicted.stdout.splitlines())},
        "/predict": {},
        "/predict/batch": {},
    }
    for path in files:
        response = httpx.post(f"{service}/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60)
        assert response.status_code == 200, response.text  # a refused image is an answer, not an error
        paths["/predict"][str(path)] = response.json()
    batch = httpx.post(
        f"{service}/predict/batch", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files], timeout=60
    ).json()["results"]
    for path, entry in zip(files, batch, strict=True):
        assert entry.pop("filename") == path.name
        paths["/predict/batch"][str(path)] = entry
    classify(ClassifySettings(source=str(tree), output=str(tmp_path / "rows"), bundle=str(guarded_bundle), format="jsonl"))
    rows = read_results(str(tmp_path / "rows"), "jsonl")
    assert len(rows) == len(files)  # rows == files, the refused one included
    paths["classify"] = {row.pop("path"): row for row in json.loads(rows.to_json(orient="records"))}
    assert {row.pop("explanation") for row in paths["classify"].values()} == {None}  # a row's column, not the record's
    digests = {path: row.pop("input_sha256") for path, row in paths["classify"].items()}  # so is the input's hash
    assert digests == {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    evaluate(EvaluateSettings(data=str(tree), bundle=str(guarded_bundle), report=str(tmp_path / "report")))
    with open(tmp_path / "report" / "predictions.jsonl") as lines:
        paths["evaluate"] = {row.pop("path"): row for row in map(json.loads, lines) if row.pop("true_label")}

    reference = paths.pop("predict")
    assert set(reference) == {str(p) for p in files}
    refused = reference[str(tree / "Non_Cancer" / "page.jpg")]
    assert refused["error_reason"] == OUT_OF_DISTRIBUTION and refused["label"] is None
    assert reference[str(tree / "Cancer" / "lesion.jpg")]["in_distribution"] is True
    for name, records in paths.items():
        for path, record in reference.items():
            other = records[path]
            assert set(other) == set(RECORD_FIELDS), (name, set(other) ^ set(RECORD_FIELDS))
            different = [field for field in RECORD_FIELDS if not _same(record[field], other[field])]
            assert not different, (name, path, {field: (record[field], other[field]) for field in different})


def test_explain_over_http(service, tree):
    lesion = (tree / "Cancer" / "lesion.jpg").read_bytes()
    response = httpx.post(f"{service}/explain", files={"file": ("lesion.jpg", lesion, "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in ("Cancer", "Non_Cancer") and answer["explanation"]["label"] == answer["label"]
    heatmap = np.array(answer["explanation"]["map"])
    assert heatmap.ndim == 2 and np.isfinite(heatmap).all() and heatmap.min() >= 0
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["explanation"]["overlay_png"])))
    assert overlay.size == (160, 120) and answer["explanation"]["crop_box"] == [20, 0, 140, 120]
    page = (tree / "Non_Cancer" / "page.jpg").read_bytes()
    refused = httpx.post(f"{service}/explain", files={"file": ("page.jpg", page, "image/jpeg")}, timeout=60).json()
    assert refused["error_reason"] == OUT_OF_DISTRIBUTION and refused["explanation"] is None
    broken = httpx.post(f"{service}/explain", files={"file": ("b.jpg", b"not an image", "image/jpeg")}, timeout=60)
    assert broken.status_code == 400 and "not_an_image" in broken.json()["detail"]


def test_classify_writes_an_overlay_per_labelled_image(ray_session, guarded_bundle, tree, tmp_path):
    overlays = tmp_path / "overlays"
    config = ClassifySettings(source=str(tree), output=str(tmp_path / "rows"), bundle=str(guarded_bundle), explain=str(overlays))
    classify(config)
    rows = read_results(str(tmp_path / "rows"), "parquet").set_index("path")
    lesion, page = rows.loc[str(tree / "Cancer" / "lesion.jpg")], rows.loc[str(tree / "Non_Cancer" / "page.jpg")]
    assert Image.open(lesion["explanation"]).size == (160, 120)
    assert pd.isna(page["explanation"]) and sorted(p.name for p in overlays.iterdir()) == [
        lesion["explanation"].rsplit("/", 1)[1]
    ]
