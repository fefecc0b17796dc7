"""Drift statistics, the reference a bundle stores, the windows the service keeps and the offline job's parsing of
untrusted audit lines: no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from skin_ray.bundle import BundleError, read_drift_reference
from skin_ray.drift import (
    IMAGE_STATISTICS,
    RATES,
    STATISTICS,
    DriftReference,
    DriftWindow,
    Observations,
    compare,
    image_statistics,
    ks_distance,
    ks_threshold,
    rate_threshold,
)
from skin_ray.drift_report import audit_observations, compare_period
from skin_ray.predictor import Predictor
from skin_ray.preprocess import decode_pixels, image_megapixels, to_model_input
from skin_ray.testing import drift_streams, encode, guarded_bundle_lesions

ROOT = Path(__file__).resolve().parents[1]


def test_ks_distance_is_scipys_two_sample_statistic():
    rng = np.random.default_rng(0)
    for n, m, shift in ((30, 200, 0.0), (100, 100, 0.3), (7, 500, 1.0)):
        window, reference = rng.normal(shift, 1, n), rng.normal(0, 1, m)
        assert ks_distance(window, np.sort(reference)) == pytest.approx(stats.ks_2samp(window, reference).statistic)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_thresholds_raise_false_alarms_at_about_alpha_and_catch_a_real_shift(alpha):
    """Windows drawn from the reference's own distribution cross the threshold at about alpha (binomial bounds
    over 2,000 windows; the asymptotic KS bound is slightly conservative at these sizes); a shift of half a
    standard deviation, or a rate from 5% to 15%, crosses it nearly always."""
    rng = np.random.default_rng(1)
    n, m, trials = 100, 500, 2000
    reference = np.sort(rng.normal(0, 1, m))
    same = np.mean([ks_distance(rng.normal(0, 1, n), reference) > ks_threshold(n, m, alpha) for _ in range(trials)])
    shifted = np.mean([ks_distance(rng.normal(0.5, 1, n), reference) > ks_threshold(n, m, alpha) for _ in range(200)])
    assert same <= alpha + 3 * np.sqrt(alpha / trials) and same >= alpha / 4
    assert shifted > 0.9

    def rate_alarm(p: float) -> bool:
        rate = rng.binomial(n, p) / n
        return abs(rate - 0.05) > rate_threshold(rate, n, 0.05, m, alpha)

    same_rate = np.mean([rate_alarm(0.05) for _ in range(trials)])
    assert same_rate <= 2 * alpha + 3 * np.sqrt(alpha / trials)
    assert np.mean([rate_alarm(0.15) for _ in range(200)]) > 0.5


def _record(in_distribution, p=0.7, uncertain=False, label="Cancer") -> dict:
    accepted = in_distribution is not False
    return {"in_distribution": in_distribution, "ood_score": 10.0, "cancer_probability": p if accepted else None,
            "uncertain": uncertain if accepted else None, "label": label if accepted else None}


def test_observations_count_a_refused_image_in_the_refused_rate_only():
    records = [_record(True), _record(False), _record(True, p=0.2, uncertain=True, label="Non_Cancer"), _record(None)]
    image = {name: np.arange(4.0) for name in IMAGE_STATISTICS}
    observed = Observations.of(records, image, "Cancer")
    np.testing.assert_array_equal(observed.flags["refused"], [0, 1, 0, 0])  # no gate (None): not refused
    np.testing.assert_array_equal(observed.flags["cancer"], [1, np.nan, 0, 1])
    np.testing.assert_array_equal(observed.flags["uncertain"], [0, np.nan, 1, 0])
    np.testing.assert_array_equal(observed.values["cancer_probability"], [0.7, np.nan, 0.2, 0.7])
    reference = DriftReference.of(observed)
    assert reference.rates == {"refused": 0.25, "uncertain": pytest.approx(1 / 3), "cancer": pytest.approx(2 / 3)}
    assert reference.counts == {"refused": 4, "uncertain": 3, "cancer": 3}
    assert len(reference.samples["cancer_probability"]) == 3


def test_image_statistics_see_colour_brightness_blur_and_size():
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 200, (2, 64, 64, 3)).astype(np.uint8)
    smooth = np.repeat(texture.mean(axis=(1, 2), keepdims=True), 64, axis=1).repeat(64, axis=2).astype(np.uint8)
    red = texture.copy()
    red[..., 0] = 255
    base = image_statistics(texture, [0.5, 2.0])
    assert (image_statistics(smooth, [0.5, 2.0])["sharpness"] < base["sharpness"] - 2).all()
    assert (image_statistics(red, [0.5, 2.0])["red_share"] > base["red_share"]).all()
    white = image_statistics(np.full((1, 8, 8, 3), 255, np.uint8), [1.0])
    assert white["brightness"][0] == pytest.approx(1.0) and white["red_share"][0] == pytest.approx(1 / 3, abs=1e-6)
    np.testing.assert_array_equal(base["megapixels"], [0.5, 2.0])


def test_a_window_keeps_the_last_images_and_forgets_the_older():
    rng = np.random.default_rng(2)
    reference = DriftReference.of(Observations.of(
        [_record(True, p=float(p)) for p in rng.uniform(0, 1, 300)],
        {name: rng.normal(0, 1, 300) for name in IMAGE_STATISTICS}, "Cancer",
    ))
    window = DriftWindow(reference, size=50, positive_class="Cancer")
    for _ in range(80):
        window.observe(_record(True, p=float(rng.uniform(0, 1))), {name: float(rng.normal(0, 1)) for name in IMAGE_STATISTICS})
    assert len(window) == 50 and window.observed == 80
    assert not any(row["drifted"] for row in window.compare().values())
    for _ in range(50):  # a new camera: every image brighter
        window.observe(_record(True, p=float(rng.uniform(0, 1))),
                       {**{name: float(rng.normal(0, 1)) for name in IMAGE_STATISTICS}, "brightness": float(rng.normal(2, 1))})
    report = window.compare()
    assert [name for name, row in report.items() if row["drifted"]] == ["brightness"]
    assert report["brightness"]["images"] == 50 and set(report) == {*STATISTICS, *RATES}


@pytest.fixture(scope="module")
def guarded(guarded_bundle):
    return Predictor.from_bundle(str(guarded_bundle))


def _observe(predictor: Predictor, files: list[bytes]) -> Observations:
    pixels = np.stack([decode_pixels(data, predictor.metadata.image_size) for data in files])
    image = image_statistics(pixels, np.array([image_megapixels(data) for data in files]))
    return Observations.of(predictor.records(to_model_input(pixels)), image, predictor.metadata.positive_class)


def test_the_bundle_reference_separates_shifted_streams_from_unchanged_ones(guarded, guarded_bundle):
    """New generated lesions (another seed) against the guarded bundle's reference, through the same records
    the service makes: unchanged they stay below every threshold; a colour cast, blur and everyday photos mixed in
    each cross one."""
    reference = read_drift_reference(str(guarded_bundle))
    assert reference is not None and reference.counts["refused"] == 120
    _, images = guarded_bundle_lesions(seed=11, count=60)
    streams = drift_streams([encode(image) for image in images], np.random.default_rng(4))
    drifted = {name: sorted(s for s, row in compare(_observe(guarded, files), reference).items() if row["drifted"])
               for name, files in streams.items()}
    assert drifted["unchanged"] == []
    assert {"red_share", "blue_share"} <= set(drifted["colour_cast"])
    assert "sharpness" in drifted["blurred"]
    assert {"ood_score", "refused"} & set(drifted["everyday_photos_mixed_in"])


def test_a_bundle_without_its_reference_file_is_refused(guarded_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(guarded_bundle, copy)
    (copy / "drift_reference.npz").write_bytes(b"not an npz")
    with pytest.raises(BundleError, match="drift reference"):
        read_drift_reference(str(copy))


def test_the_offline_job_reads_hostile_audit_lines_without_failing(guarded):
    """Audit files are read as untrusted: a line that is not a JSON object is counted as skipped, a field of the
    wrong type is taken as missing, lines of other versions or statuses do not count."""
    version = guarded.model_version
    good = {"time": "2026-12-01T10:00:00.000Z", "status": 200, "model_version": version, **_record(True),
            "image": dict.fromkeys(IMAGE_STATISTICS, 0.5)}
    lines = [
        json.dumps(good),
        json.dumps({**good, "time": "2026-12-02T11:00:00.000Z", "ood_score": "high", "image": "none", "label": 3}),
        json.dumps({**good, "status": 400}),
        json.dumps({**good, "model_version": "another"}),
        "[1, 2]", "{not json", json.dumps("text"),
    ]
    columns = audit_observations({"text": np.array(lines, dtype=object)}, version, "Cancer", by="day")
    assert list(columns["period"]) == ["2026-12-01", "2026-12-02", "", "", ""]
    assert list(columns["skipped"]) == [0, 0, 1, 1, 1]
    assert np.isnan(columns["ood_score"][1]) and np.isnan(columns["brightness"][1]) and np.isnan(columns["cancer"][1])
    assert columns["brightness"][0] == 0.5
    reference = read_drift_reference(str(Path(guarded.bundle.uri)))
    first = {name: values[:1] for name, values in columns.items()}
    assert set(compare_period(first, reference)["statistic"]) == {*STATISTICS, *RATES}


def _series_in(text: str) -> set[str]:
    return set(re.findall(r"\bray_skin_ray_[a-z_]+", text))


def _declared_series() -> set[str]:
    """Every Prometheus series name the service's own metrics produce (Ray prefixes `ray_`; a counter gains
    `_total`, a histogram `_bucket`, `_count` and `_sum`)."""
    from ray.util.metrics import Counter, Histogram

    from skin_ray.serve import telemetry

    metrics = [telemetry.batch_sizes(), telemetry.predictions(), telemetry.decode_errors(), telemetry.request_latency(),
               telemetry.shadow_comparisons(), telemetry.shadow_probability_difference(), telemetry.audit_dropped(),
               *telemetry.drift_gauges().values()]
    names = set()
    for metric in metrics:
        name = f"ray_{metric._name}"
        if isinstance(metric, Counter):
            names.add(f"{name}_total")
        elif isinstance(metric, Histogram):
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def test_alert_rules_and_the_dashboard_name_only_series_the_service_exports():
    rules = yaml.safe_load((ROOT / "cluster" / "prometheus-rules.yaml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert all(rule["alert"] and rule["annotations"]["summary"] for group in rules["groups"] for rule in group["rules"])
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    declared = _declared_series()
    named = set().union(*map(_series_in, expressions + queries))
    assert named and named <= declared, named - declared
    assert {"ray_skin_ray_drift_distance", "ray_skin_ray_drift_threshold"} <= _series_in(" ".join(expressions))
