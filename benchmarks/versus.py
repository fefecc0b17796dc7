"""A candidate bundle against a baseline (the shipped one), on images neither trained on.

    python benchmarks/versus.py CANDIDATE [--baseline skin_ray/bundles/default] [--data DIR ...]

The images: the candidate's recorded validation split (grouped by lesion across its data trees), less every
image the baseline trained on (its train_images.sha256, by content). Both bundles score them through the same path
(file bytes -> each bundle's preprocessing -> its calibrated network). Prints one JSON document:
- per bundle: the headline figures at its own threshold (ROC AUC with its 95% interval, sensitivity,
  specificity, ECE), and the specificity at the threshold the shipped rule (sensitivity >= target with the
  bundle's confidence, `threshold_keeping_sensitivity`) takes on these very images, so a baseline whose threshold was
  fitted on other images is judged by the same rule;
- per bundle, per data tree, diagnosis, sex, age band and body site (the metadata tables' `dx`, `sex`, `age`,
  `localization`; "(none)" where a table has no value): sensitivity and specificity with Wilson intervals at its
  own threshold, and the AUC within a group that has both classes;
- the paired 95% DeLong interval of the candidate's ROC AUC minus the baseline's, over all images and within each
  tree (an interval that excludes 0 is a real difference on these images), and the bootstrap interval of the ECE
  difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from skin_ray import classifier_stats, storage  # noqa: E402
from skin_ray.finalize import bundle_split  # noqa: E402
from skin_ray.predictor import Predictor  # noqa: E402
from skin_ray.preprocess import to_model_input  # noqa: E402
from skin_ray.runtime import init_ray  # noqa: E402

SHIPPED = "skin_ray/bundles/default"
SUBGROUPS = (("diagnosis", "dx"), ("sex", "sex"), ("age_band", "age"), ("site", "localization"))  # metadata columns


def p_cancer(predictor: Predictor, files: list[bytes], batch: int = 64) -> np.ndarray:
    spec, positive = predictor.metadata.input_spec, predictor.metadata.positive_index
    scores = []
    for start in range(0, len(files), batch):
        pixels = np.stack([spec.pixels(data) for data in files[start : start + batch]])
        scores.append(predictor.analyse(to_model_input(pixels)).probabilities[:, positive])
    return np.concatenate(scores)


def age_band(age: str) -> str:
    """HAM10000's age (years, in fives) as a band of twenty years; "" where unknown."""
    try:
        low = int(float(age)) // 20 * 20
    except ValueError:
        return ""
    return f"{low}-{low + 19}"


def figures(predictor: Predictor, y_true: np.ndarray, scores: np.ndarray, groups: dict[str, list[str]]) -> dict:
    metadata = predictor.metadata
    at = metadata.threshold
    own = classifier_stats.summary(y_true, scores, at)
    confidence = metadata.metrics.get("threshold_rule", {}).get("confidence_reached", 0.95)
    rule_threshold, rule = classifier_stats.threshold_keeping_sensitivity(
        y_true, scores, metadata.target_sensitivity, confidence
    )
    return {
        "model": predictor.model_version,
        "at_own_threshold": own,
        "rule_on_these_images": {"threshold": rule_threshold, "confidence": confidence, **rule},
        **{f"by_{name}": classifier_stats.by_group(y_true, scores, at, values) for name, values in groups.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", help="the bundle to judge; its recorded validation split gives the images")
    parser.add_argument("--baseline", default=SHIPPED, help="the bundle to beat (default: the shipped one)")
    parser.add_argument("--data", nargs="+", help="the candidate's labelled image trees, if they moved since it was trained")
    args = parser.parse_args()
    init_ray()
    candidate, baseline = Predictor.from_bundle(args.candidate), Predictor.from_bundle(args.baseline)
    if not candidate.bundle.validation_digests:
        raise SystemExit(f"{args.candidate} records no validation split by content; retrain it with this version")
    validation = bundle_split(candidate.bundle, args.data).validation
    files = [storage.read_bytes(path) for path in validation.paths]
    unseen = np.array([hashlib.sha256(data).hexdigest() not in baseline.bundle.train_digests for data in files])
    files = [data for data, keep in zip(files, unseen, strict=True) if keep]
    y_true = (np.asarray(validation.labels)[unseen] == validation.positive_index).astype(np.int64)
    trees = np.asarray(validation.sources())[unseen].tolist()
    groups = {"tree": trees, **{name: np.asarray(validation.attribute(column))[unseen].tolist() for name, column in SUBGROUPS}}
    groups["age_band"] = [age_band(age) for age in groups["age_band"]]
    scores = {name: p_cancer(predictor, files) for name, predictor in (("candidate", candidate), ("baseline", baseline))}
    paired = {"all": classifier_stats.roc_auc_difference_interval(y_true, scores["candidate"], scores["baseline"])}
    for tree in sorted(set(trees)):
        chosen = np.asarray(trees) == tree
        if 0 < y_true[chosen].sum() < chosen.sum():
            paired[tree] = classifier_stats.roc_auc_difference_interval(
                y_true[chosen], scores["candidate"][chosen], scores["baseline"][chosen]
            )
    print(json.dumps({
        "images": {"validation": len(validation), "baseline_trained_on": int((~unseen).sum()), "compared": len(files)},
        "candidate": figures(candidate, y_true, scores["candidate"], groups),
        "baseline": figures(baseline, y_true, scores["baseline"], groups),
        "roc_auc_candidate_minus_baseline_ci95": paired,
        "ece_candidate_minus_baseline_ci95": classifier_stats.ece_difference_interval(
            y_true, scores["candidate"], scores["baseline"]
        ),
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
