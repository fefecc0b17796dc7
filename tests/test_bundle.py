"""The model bundle: round trip on disk and S3, refusal of foreign bundles, Keras safe mode."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import pytest

from skin_ray import classifier_stats
from skin_ray.bundle import DEFAULT_BUNDLE, METADATA_FILE, MODEL_FILE, BundleError, load_bundle, read_metadata, save_bundle
from skin_ray.data import image_dataset
from skin_ray.finalize import bundle_split
from skin_ray.model import make_model
from skin_ray.onnx_analysis import RUNTIME
from skin_ray.optimize import beyond_bounds, compare_decisions
from skin_ray.predictor import Decisions, Predictor
from skin_ray.preprocess import preprocessing_id
from skin_ray.testing import encode, lesion_image, needs_training_data, shipped_trees, threshold_miss_rates


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((4, 170, 170, 3), dtype=np.float32)


def test_round_trip_local(untrained_bundle, tmp_path, images):
    original = load_bundle(str(untrained_bundle))
    save_bundle(original.model, original.metadata, str(tmp_path / "copy"))
    copy = load_bundle(str(tmp_path / "copy"))
    assert asdict(copy.metadata) == asdict(original.metadata)
    np.testing.assert_array_equal(Predictor(copy).predict_arrays(images), Predictor(original).predict_arrays(images))


def test_round_trip_s3(untrained_bundle, bucket, images):
    original = load_bundle(str(untrained_bundle))
    uri = f"s3://{bucket}/models/v1"
    save_bundle(original.model, original.metadata, uri)
    copy = load_bundle(uri)
    assert copy.uri == uri
    assert asdict(copy.metadata) == asdict(original.metadata)
    assert read_metadata(uri) == original.metadata
    with pytest.raises(BundleError, match="not a model bundle"):
        read_metadata(f"s3://{bucket}/models/none")
    np.testing.assert_array_equal(Predictor(copy).predict_arrays(images), Predictor(original).predict_arrays(images))


def test_a_bundle_from_s3_writes_nothing_outside_its_folder(untrained_bundle, bucket, tmp_path, monkeypatch):
    """Keys that whoever can write under a bundle prefix might add (`..` segments, an empty segment before an
    absolute path, a Python file) are never fetched: loading copies the files a bundle has, by name, into its
    own temporary folder; a name that would land outside the folder is refused before anything is written."""
    import tempfile

    import boto3

    from skin_ray import storage

    uri = f"s3://{bucket}/models/v1"
    original = load_bundle(str(untrained_bundle))
    save_bundle(original.model, original.metadata, uri)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where load_bundle's temporary folder is made
    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url())
    absolute = str(tmp_path / "absolute.py").lstrip("/")
    hostile = ["models/v1/../../escaped.py", f"models/v1//{absolute}", "models/v1/extra/sitecustomize.py"]
    for key in hostile:
        s3.put_object(Bucket=bucket, Key=key, Body=b"raise SystemExit('ran code from a bundle prefix')")
    assert {f"s3://{bucket}/{key}" for key in hostile} <= set(storage.list_files(uri))  # a listing shows them all
    bundle = load_bundle(uri)
    assert bundle.metadata.model_version == "untrained-test"
    written = {path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()}
    assert not any(path.suffix == ".py" for path in written), written
    with pytest.raises(ValueError, match="would land outside"):
        storage.download_files(uri, ("../../escaped.py",), str(tmp_path / "target"))
    assert not (tmp_path / "target").exists() and not (tmp_path.parent / "escaped.py").exists()


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    metadata = json.loads((target / METADATA_FILE).read_text())
    (target / METADATA_FILE).write_text(json.dumps({**metadata, **changes}))
    return target


def test_refuses_another_preprocessing_or_format(untrained_bundle, tmp_path):
    with pytest.raises(BundleError, match="preprocessing"):
        load_bundle(str(_edited_copy(untrained_bundle, tmp_path / "a", preprocessing="opencv-bgr-170")))
    with pytest.raises(BundleError, match="format"):
        load_bundle(str(_edited_copy(untrained_bundle, tmp_path / "b", format_version=99)))
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(str(tmp_path))


def test_a_bundle_carries_its_input_size(small_input_bundle, tmp_path):
    bundle = load_bundle(str(small_input_bundle))
    assert bundle.metadata.image_size == 96 and bundle.metadata.preprocessing == preprocessing_id(96)
    assert read_metadata(str(small_input_bundle)) == bundle.metadata
    photo = encode(lesion_image("Cancer", np.random.default_rng(0), size=300), "JPEG")
    assert Predictor(bundle).decode_pixels(photo).shape == (96, 96, 3)
    # A description that disagrees with its network, or a recipe id that names another size, is refused.
    claims_170 = {"input_size": [170, 170, 3], "preprocessing": preprocessing_id(170)}
    with pytest.raises(BundleError, match=r"takes \(96, 96, 3\) inputs"):
        load_bundle(str(_edited_copy(small_input_bundle, tmp_path / "a", **claims_170)))
    with pytest.raises(BundleError, match="preprocessing"):
        read_metadata(str(_edited_copy(small_input_bundle, tmp_path / "b", preprocessing=preprocessing_id(170))))


def test_safe_mode_refuses_code_in_a_bundle(untrained_bundle, tmp_path):
    target = _edited_copy(untrained_bundle, tmp_path / "evil")
    inputs = keras.Input((170, 170, 3))
    evil = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 0 + 1)(inputs))
    evil.save(target / MODEL_FILE)
    with pytest.raises(ValueError, match="(?i)safe"):
        load_bundle(str(target))


def test_label_uses_the_threshold_not_argmax(untrained_bundle, tmp_path):
    predictor = Predictor.from_bundle(str(_edited_copy(untrained_bundle, tmp_path / "t", threshold=0.2)))
    assert predictor.to_prediction(np.array([0.3, 0.7])).label == "Cancer"
    assert predictor.to_prediction(np.array([0.1, 0.9])).label == "Non_Cancer"


def test_class_order_comes_from_the_bundle(untrained_bundle, tmp_path):
    flipped = _edited_copy(untrained_bundle, tmp_path / "f", class_names=["Non_Cancer", "Cancer"])
    prediction = Predictor.from_bundle(str(flipped)).to_prediction(np.array([0.8, 0.2]))
    assert prediction.cancer_probability == pytest.approx(0.2)
    assert prediction.probabilities == {"Non_Cancer": pytest.approx(0.8), "Cancer": pytest.approx(0.2)}


def test_shipped_default_bundle_holds_its_recorded_quality():
    """The repository's model: one `default` network trained on skin_isic and HAM10000 with the validation split
    grouped by lesion across both, small enough to ship, calibrated, and sensitive enough overall and within each
    data tree (HAM10000 alone included); the model card (docs/model-card.md) has its figures."""
    bundle = load_bundle()
    meta = bundle.metadata
    assert meta.arch == "default" and meta.class_names == ["Cancer", "Non_Cancer"]
    assert [Path(tree).name for tree in meta.data["sources"]] == ["skin_isic", "ham10000"]
    assert meta.data["group_column"] == "lesion_id"
    # One digest per content: two byte-identical validation files (a lesion's copies) share one.
    assert 2000 < len(bundle.validation_digests) <= meta.metrics["validation"]["n"]
    assert sum(f.stat().st_size for f in Path(DEFAULT_BUNDLE).iterdir()) < 20 * 2**20
    assert bundle.model.count_params() == make_model("default").count_params()
    validation = meta.metrics["validation"]
    assert validation["ece"] <= 0.03 and validation["ece_crossfit"] <= 0.03
    assert validation["sensitivity"] >= meta.target_sensitivity
    by_tree = meta.metrics["validation_by"]["source"]
    assert len(by_tree) == 2 and all(tree["sensitivity"] >= meta.target_sensitivity for tree in by_tree.values())


@pytest.fixture(scope="module")
def shipped_validation(ray_session):
    """The shipped bundle's Cancer probabilities on its validation split, re-derived from the real data by its Keras
    network, and the decisions of both that network and the runtime the bundle carries."""
    predictor = Predictor.from_bundle(runtime="float32")
    runtime = Predictor(predictor.bundle)
    assert runtime.analyse.runtime == RUNTIME
    split = bundle_split(predictor.bundle, shipped_trees(predictor.metadata))
    assert predictor.bundle.train_digests == frozenset(split.train_digests)  # what evaluate's overlap check reads
    y_true, decisions = [], {predictor: [], runtime: []}
    for batch in image_dataset(split.validation, predictor.metadata.input_spec).iter_batches(batch_size=128):
        y_true.append(batch["label"] == predictor.metadata.positive_index)
        for which, decided in decisions.items():
            decided.append(which.decide(which.analyse(batch["image"])))
    reference, by_runtime = (Decisions.concatenate(decided) for decided in decisions.values())
    return predictor, np.concatenate(y_true), reference, by_runtime


@needs_training_data
def test_shipped_bundle_reproduces_its_validation_metrics(shipped_validation):
    """Re-score the validation split: the recorded figures hold."""
    predictor, y_true, reference, _ = shipped_validation
    p_cancer = reference.p_cancer
    recorded = predictor.metadata.metrics["validation"]
    summary = classifier_stats.summary(y_true, p_cancer, predictor.metadata.threshold)
    assert summary["n"] == recorded["n"]
    for name in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"):
        assert summary[name] == pytest.approx(recorded[name], abs=1e-4), name


@needs_training_data
def test_shipped_runtime_stays_within_its_recorded_bounds_on_the_validation_split(shipped_validation):
    """The runtime the shipped bundle carries, run here, against its Keras network: within the bounds it was accepted
    on, and as close as recorded (another CPU's kernels may round differently: a tenth of the bound's slack)."""
    predictor, y_true, reference, by_runtime = shipped_validation
    recorded = predictor.metadata.runtime
    figures = compare_decisions(y_true, reference, by_runtime)
    assert beyond_bounds(figures, recorded["bounds"]) == [], figures
    slack = 0.1 * recorded["bounds"]["max_abs_dp"]
    assert figures["max_abs_dp"] <= recorded["validation"]["max_abs_dp"] + slack, (figures, recorded["validation"])


@needs_training_data
def test_threshold_rule_keeps_its_sensitivity_on_unseen_halves_of_the_real_validation_split(shipped_validation):
    """Chosen on a random half of the shipped model's validation scores and checked on the other half, the
    lower-bound rule's threshold falls short of the target sensitivity far less often than the exact fit's."""
    _, y_true, reference, _ = shipped_validation
    p_cancer = reference.p_cancer
    rates = threshold_miss_rates(y_true, p_cancer, 0.9, trials=400)
    assert rates["exact_fit"] > 0.3 and rates["lower_bound"] < rates["exact_fit"] / 3, rates


def _model_card_tables():
    """docs/model_card_tables.py, the script that writes the model card's tables (a script, not a module)."""
    path = Path(__file__).parents[1] / "docs" / "model_card_tables.py"
    spec = importlib.util.spec_from_file_location("model_card_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_model_card_holds_the_shipped_bundles_figures_and_flags_subgroups_below_the_promise():
    """docs/model-card.md's tables and README's gate table are what their script makes of the shipped bundle.json
    (after shipping another bundle, `python docs/model_card_tables.py --write`); a subgroup whose sensitivity is
    below the promise is flagged."""
    cards = _model_card_tables()
    assert cards.tables() in cards.CARD.read_text()
    meta = read_metadata()
    assert "\n".join(cards.real_gate_table(meta)) in cards.README.read_text()
    assert {"source", "diagnosis", "sex", "age_band", "site"} <= set(meta.metrics["validation_by"])
    figures = {"n": 40, "cancers": 10, "sensitivity": 0.8, "sensitivity_ci95": [0.49, 0.94], "specificity": 0.9,
               "specificity_ci95": [0.77, 0.96], "roc_auc": 0.9}
    low, high = cards.subgroup_table("sex", "Sex", {"low": figures, "high": {**figures, "sensitivity": 0.9}}, 0.9)[2:]
    assert "below the 0.9 promise" in low and "below" not in high
