"""The faster runtime a bundle can carry (skin_ray.onnx_analysis, skin_ray.optimize): exported from the bundle's
network, checked against it, chosen when a bundle carries it, and the Keras network whenever it cannot run."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest

from skin_ray.bundle import METADATA_FILE, BundleError, load_bundle, read_metadata
from skin_ray.onnx_analysis import RUNTIME
from skin_ray.optimize import BOUNDS, add_runtime, beyond_bounds, compare_decisions, nearest_each_side
from skin_ray.predictor import REFERENCE_RUNTIME, Analyser, Decisions, Predictor
from skin_ray.testing import generated_validation


@pytest.fixture(scope="module")
def lesions(guarded_bundle):
    return generated_validation(read_metadata(str(guarded_bundle)).image_size, count=96)


def _decisions(predictor: Predictor, images: np.ndarray) -> Decisions:
    return Decisions.concatenate([predictor.decide(predictor.analyse(images[i : i + 64])) for i in range(0, len(images), 64)])


@pytest.fixture(scope="module")
def optimized(guarded_bundle, lesions, tmp_path_factory):
    """A copy of the guarded bundle given its runtime on generated lesions, and bundle.json's description of it."""
    path = tmp_path_factory.mktemp("optimized") / "bundle"
    shutil.copytree(guarded_bundle, path)
    batches = [(lesions[0][i : i + 64], lesions[1][i : i + 64]) for i in range(0, len(lesions[0]), 64)]
    return path, add_runtime(load_bundle(str(path)), str(path), batches)


def test_the_exported_runtime_decides_as_the_keras_network(optimized, lesions):
    path, described = optimized
    assert read_metadata(str(path)).runtime == described and described["name"] == RUNTIME
    figures = described["validation"]
    assert beyond_bounds(figures) == [], figures
    assert {"refusals_differ", "uncertain_differ", "max_abs_ood_score_difference"} <= set(figures)  # the gate and margin checked
    assert 0 <= figures["max_abs_dp"] < BOUNDS["max_abs_dp"] and figures["labels_differ"] == 0
    assert figures["cut_cases"] >= 2 and figures["cut_cases_changed"] == 0
    chosen, reference = Predictor.from_bundle(str(path)), Predictor.from_bundle(str(path), runtime="float32")
    assert (chosen.analyse.runtime, reference.analyse.runtime) == (RUNTIME, REFERENCE_RUNTIME)
    images = lesions[0][:16]
    errors = [""] * 15 + ["unreadable: not an image"]
    fast, slow = chosen.records(images, errors), reference.records(images, errors)
    assert [r["label"] for r in fast] == [r["label"] for r in slow] and fast[-1] == slow[-1]
    score_differences = [abs(f["ood_score"] - s["ood_score"]) for f, s in zip(fast[:15], slow[:15], strict=True)]
    assert max(score_differences) <= figures["max_abs_ood_score_difference"] + 1e-3


def test_a_runtime_that_moves_decisions_is_refused(guarded_bundle, lesions):
    """The Keras network on inputs rounded to 3 bits, as a coarse quantised runtime would see them: refused."""
    bundle = load_bundle(str(guarded_bundle))
    reference = Predictor(bundle, runtime="float32")
    coarse = Analyser(bundle.model, bundle.metadata.positive_index, lambda x: reference.analyse.forward(np.round(x * 7) / 7))
    figures = compare_decisions(lesions[1], _decisions(reference, lesions[0]), _decisions(Predictor(bundle, coarse), lesions[0]))
    assert any(problem.startswith("max_abs_dp") for problem in beyond_bounds(figures)), figures


def _probabilities_only(p_cancer: np.ndarray) -> Decisions:
    return Decisions(p_cancer, p_cancer >= 0.5, None, None, None)


def test_ties_broken_by_rounding_are_not_a_change_of_ranking():
    """A saturated network's outputs one float32 step apart rank as equal; a real reordering still counts."""
    rng = np.random.default_rng(0)
    is_cancer = np.arange(60) % 2 == 0
    saturated = np.where(rng.random(60) < 0.5, np.float32(1.0), np.float32(0.25))
    rounded = np.where(rng.random(60) < 0.5, np.nextafter(saturated, np.float32(0)), saturated)
    figures = compare_decisions(is_cancer, _probabilities_only(saturated), _probabilities_only(rounded))
    assert figures["auc_difference"] == 0 and 0 < figures["max_abs_dp"] < 1e-7, figures
    reordered = saturated + np.float32(1e-4) * is_cancer
    figures = compare_decisions(is_cancer, _probabilities_only(saturated), _probabilities_only(reordered))
    assert any(problem.startswith("auc_difference") for problem in beyond_bounds(figures)), figures


def test_labels_that_change_next_to_the_threshold_it_was_fitted_between_are_counted_apart():
    """A threshold halfway between two of the split's probabilities a few millionths apart (as a 2-epoch bundle's
    was): a runtime 2e-5 off flips the case above it, counted apart rather than refused; a label changed away from
    the threshold is refused."""
    is_cancer = np.arange(60) % 2 == 0
    reference = np.linspace(0.05, 0.95, 60)
    reference[30], reference[31] = 0.5 + 1.5e-6, 0.5 - 1.5e-6
    at_cuts = nearest_each_side(reference, reference >= 0.5)
    assert np.flatnonzero(at_cuts).tolist() == [30, 31]
    near = reference.copy()
    near[30] -= 2e-5
    figures = compare_decisions(is_cancer, _probabilities_only(reference), _probabilities_only(near), at_cuts)
    assert figures["labels_differ"] == 0 and (figures["cut_cases"], figures["cut_cases_changed"]) == (2, 1), figures
    assert beyond_bounds(figures) == [], figures
    away = near.copy()
    away[40] = 0.45  # a case at 0.66 moved across the threshold
    figures = compare_decisions(is_cancer, _probabilities_only(reference), _probabilities_only(away), at_cuts)
    assert figures["labels_differ"] == 1 / 60 and any(problem.startswith("labels_differ") for problem in beyond_bounds(figures))


def _edited(path, tmp_path, edit):
    copy = tmp_path / "bundle"
    shutil.copytree(path, copy)
    edit(copy)
    return str(copy)


def _set_runtime_field(name, value):
    def edit(copy):
        described = json.loads((copy / METADATA_FILE).read_text())
        described["runtime"][name] = value
        (copy / METADATA_FILE).write_text(json.dumps(described))

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_set_runtime_field("cpu_features", ["avx2", "skin_ray_absent_feature"]), "this CPU lacks skin_ray_absent_feature"),
        (lambda copy: (copy / "analysis.onnx").write_bytes(b"not the graph"), "not the one validated"),
        (_set_runtime_field("model_sha256", "0" * 64), "exported from another model.keras"),
        (_set_runtime_field("name", "openvino-bf16"), "runs onnxruntime-float32, not openvino-bf16"),
    ],
    ids=["cpu", "graph", "model", "name"],
)
def test_a_runtime_this_machine_cannot_run_falls_back_to_the_keras_network_and_says_so_once(
    optimized, tmp_path, caplog, edit, reason
):
    uri = _edited(optimized[0], tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger="skin_ray.predictor"):
        predictors = [Predictor.from_bundle(uri) for _ in range(2)]
    assert [p.analyse.runtime for p in predictors] == [REFERENCE_RUNTIME] * 2
    said = [record.getMessage() for record in caplog.records if "instead of" in record.getMessage()]
    assert len(said) == 1 and reason in said[0], said


def test_without_onnxruntime_installed_the_keras_network_runs(optimized, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with caplog.at_level(logging.WARNING, logger="skin_ray.predictor"):
        predictor = Predictor.from_bundle(str(optimized[0]))
    assert predictor.analyse.runtime == REFERENCE_RUNTIME and "onnxruntime is not installed" in caplog.text


@pytest.mark.parametrize(
    "edit",
    [
        _set_runtime_field("cpu_features", ["../../etc/passwd"]),
        _set_runtime_field("cpu_features", ["avx2"] * 17),
        _set_runtime_field("sha256", "not a digest"),
        _set_runtime_field("validation", "fine"),
    ],
    ids=["feature-name", "too-many-features", "digest", "figures"],
)
def test_a_malformed_runtime_description_refuses_the_bundle(optimized, tmp_path, edit):
    with pytest.raises(BundleError, match="runtime is malformed"):
        load_bundle(_edited(optimized[0], tmp_path, edit))
