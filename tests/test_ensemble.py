"""`skin-ray ensemble`: one bundle averaging the logits of bundles trained on the same split."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import ray

from skin_ray import classifier_stats
from skin_ray.bundle import BundleMetadata, save_bundle
from skin_ray.config import EnsembleSettings
from skin_ray.data import discover, image_dataset, split_by_content
from skin_ray.ensemble import build_ensemble, make_ensemble
from skin_ray.model import make_model
from skin_ray.predictor import Predictor
from skin_ray.preprocess import InputSpec
from skin_ray.testing import skin_ray_cli

MEMBERS_INPUT = InputSpec(96)  # small inputs: the tests are about the ensemble's mechanics, not its networks


@pytest.fixture(scope="module")
def lesion_split(lesion_tree):
    """The split members trained on `lesion_tree` record, and the ensemble re-derives."""
    return split_by_content(discover(str(lesion_tree)), MEMBERS_INPUT, 0.2)


def _member(path: Path, arch: str, seed: int, data: Path, fingerprint: str) -> str:
    """A bundle around a freshly initialised `arch` network, recorded as trained on `data`'s split."""
    keras.utils.set_random_seed(seed)
    metadata = BundleMetadata(
        model_version=f"{arch}-{seed}", arch=arch, class_names=["Cancer", "Non_Cancer"], positive_class="Cancer",
        threshold=0.5, target_sensitivity=0.9, metrics={"validation": {"roc_auc": 0.5}},
        training={"validation_fraction": 0.2, "subset": None}, data={"source": str(data), "fingerprint": fingerprint},
        input_size=[MEMBERS_INPUT.size, MEMBERS_INPUT.size, 3], preprocessing=MEMBERS_INPUT.preprocessing,
    )
    save_bundle(make_model(arch, MEMBERS_INPUT.size), metadata, str(path))
    return str(path)


def test_members_of_different_input_sizes_are_refused():
    with pytest.raises(ValueError, match="inputs of different sizes"):
        make_ensemble([make_model("plain"), make_model("plain", 96)])


def test_ensemble_output_is_the_softmax_of_the_mean_member_logit():
    keras.utils.set_random_seed(3)
    members = [make_model("seed"), make_model("plain")]
    images = np.random.default_rng(0).random((4, 170, 170, 3), dtype=np.float32)
    p_members = [member(images).numpy()[:, 0] for member in members]
    p_ensemble = make_ensemble(members)(images).numpy()[:, 0]
    expected = classifier_stats.sigmoid(np.mean([classifier_stats.log_odds(p) for p in p_members], axis=0))
    np.testing.assert_allclose(p_ensemble, expected, rtol=1e-4)
    assert not np.allclose(p_members[0], p_members[1], rtol=1e-2)  # two different opinions were averaged


def test_cli_writes_a_calibrated_bundle_of_its_members(ray_session, lesion_tree, lesion_split, tmp_path):
    fingerprint = lesion_split.fingerprint
    members = [
        _member(tmp_path / name, arch, seed, lesion_tree, fingerprint)
        for name, arch, seed in (("a", "seed", 1), ("b", "default", 2))
    ]
    result = skin_ray_cli(
        "ensemble", *members, "--output", str(tmp_path / "ensemble"), "--target-sensitivity", "0.8",
        ray_address=ray.get_runtime_context().gcs_address,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.splitlines()[-1])

    ensemble = Predictor.from_bundle(str(tmp_path / "ensemble"))  # Keras safe mode loads the nested members
    meta = ensemble.metadata
    assert meta.arch == "ensemble" and meta.model_version == printed["model_version"]
    assert [member["model_version"] for member in meta.training["members"]] == ["seed-1", "default-2"]
    assert meta.data["fingerprint"] == fingerprint and meta.target_sensitivity == 0.8
    # Its probabilities are the members' mean log-odds through the recorded Platt calibration...
    rows = image_dataset(lesion_split.validation, meta.input_spec).take_all()
    images = np.stack([row["image"] for row in rows])
    mean_log_odds = np.mean(
        [classifier_stats.log_odds(Predictor.from_bundle(m).cancer_probabilities(images)) for m in members], axis=0
    )
    platt = meta.metrics["calibration"]
    p_cancer = ensemble.cancer_probabilities(images)
    calibrated = classifier_stats.sigmoid(platt["platt_scale"] * mean_log_odds + platt["platt_offset"])
    np.testing.assert_allclose(p_cancer, calibrated, rtol=1e-3)
    # ...and its recorded figures are what it scores on the validation split, at the target sensitivity.
    y_true = np.array([row["label"] == 0 for row in rows], dtype=int)
    recomputed = classifier_stats.summary(y_true, p_cancer, meta.threshold)
    for name in ("roc_auc", "sensitivity", "ece"):
        assert recomputed[name] == pytest.approx(printed[name], abs=1e-6), name
    assert recomputed["sensitivity"] >= 0.8


def test_refuses_members_of_another_split_or_data(ray_session, lesion_tree, lesion_split, tmp_path):
    fingerprint = lesion_split.fingerprint
    same = [_member(tmp_path / name, "seed", seed, lesion_tree, fingerprint) for name, seed in (("a", 1), ("b", 2))]
    other = _member(tmp_path / "other", "seed", 3, lesion_tree, "0" * 64)
    address = ray.get_runtime_context().gcs_address
    mixed = skin_ray_cli("ensemble", same[0], other, "--output", str(tmp_path / "out"), ray_address=address)
    assert mixed.returncode == 2 and "another split" in mixed.stderr, mixed.stderr
    single = skin_ray_cli("ensemble", same[0], "--output", str(tmp_path / "out"), ray_address=address)
    assert single.returncode == 2 and "at least two" in single.stderr, single.stderr
    # The members' split, re-derived from other data, would calibrate on images they may have trained on.
    other_data = tmp_path / "fewer"
    for source in sorted(lesion_tree.glob("*/*.jpg"))[::3]:
        (other_data / source.parent.name).mkdir(parents=True, exist_ok=True)
        (other_data / source.parent.name / source.name).write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="not the data"):
        build_ensemble(EnsembleSettings(members=same, output=str(tmp_path / "out"), data=str(other_data)))
    assert not (tmp_path / "out").exists()
