"""A candidate bundle against a baseline (the shipped one), on images neither trained on.

    python benchmarks/versus.py CANDIDATE [--baseline skin_ray/bundles/default] [--data DIR ...]

The images: the candidate's recorded validation split (grouped by lesion across its data trees), less every
image the baseline trained on (its train_images.sha256, by content). Both bundles score them through the same path
(file bytes -> each bundle's preprocessing -> its calibrated network). Prints one JSON document:
- per bundle: the headline figures at its own threshold (ROC AUC with its 95% interval, sensitivity,
  specificity, ECE), and the specificity at the threshold the shipped rule (sensitivity >= target with the
  bundle's confidence, `threshold_keeping_sensitivity`) takes on these very images, so a baseline whose threshold was
  fitted on other images is judged by the same rule;
- per bundle, per data tree, diagnosis, sex, age band and body site (`finalize.BREAKDOWN_COLUMNS`, as bundle.json
  records them; "(none)" where a table has no value): sensitivity and specificity with Wilson intervals at its
  own threshold, and the AUC within a group that has both classes;
- the paired 95% DeLong interval of the candidate's ROC AUC minus the baseline's, over all images and within each
  tree (an interval that excludes 0 is a real difference on these images), and the bootstrap interval of the ECE
  difference;
- the forward pass's cost: each bundle's process CPU time per image over the same images (Keras network, and the
  runtime each would run here), rounds taken in turn after a warm-up, medians and the candidate's ratio to the
  baseline's, with the CPU's vector features (`--cost-rounds 0` leaves it out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from skin_ray import classifier_stats, storage  # noqa: E402
from skin_ray.finalize import breakdown_groups, bundle_split  # noqa: E402
from skin_ray.onnx_analysis import missing_cpu_features  # noqa: E402
from skin_ray.predictor import Predictor, analyser_for  # noqa: E402
from skin_ray.preprocess import to_model_input  # noqa: E402
from skin_ray.runtime import init_ray  # noqa: E402

SHIPPED = "skin_ray/bundles/default"


def p_cancer(predictor: Predictor, files: list[bytes], batch: int = 64) -> np.ndarray:
    spec, positive = predictor.metadata.input_spec, predictor.metadata.positive_index
    scores = []
    for start in range(0, len(files), batch):
        pixels = np.stack([spec.pixels(data) for data in files[start : start + batch]])
        scores.append(predictor.analyse(to_model_input(pixels)).probabilities[:, positive])
    return np.concatenate(scores)


def cpu_seconds_per_image(bundles: dict[str, Predictor], files: list[bytes], rounds: int, batch: int = 32) -> dict:
    """Per bundle and runtime ("float32": its Keras network; "auto": what it runs here), the median over `rounds`
    of the process CPU seconds per image of its analysis pass over `files`' preprocessed pixels; every analyser
    runs once before the rounds, then each round runs all of them in turn, so drift on the machine is shared."""
    analysers = {
        (name, runtime): analyser_for(predictor.bundle, runtime)
        for name, predictor in bundles.items() for runtime in ("float32", "auto")
    }
    pixels = {
        name: [to_model_input(np.stack([predictor.metadata.input_spec.pixels(data) for data in files[start : start + batch]]))
               for start in range(0, len(files), batch)]
        for name, predictor in bundles.items()
    }
    seconds = {key: [] for key in analysers}
    for round_ in range(rounds + 1):
        for (name, runtime), analyse in analysers.items():
            started = time.process_time()
            for images in pixels[name]:
                analyse(images)
            if round_:  # the first is the warm-up (tracing, allocation)
                seconds[(name, runtime)].append((time.process_time() - started) / len(files))
    median = {key: float(np.median(values)) for key, values in seconds.items()}
    return {
        "cpu_flags": [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if not missing_cpu_features([flag])],
        "images": len(files), "rounds": rounds,
        **{name: {analysers[(name, runtime)].runtime: round(median[(name, runtime)] * 1e3, 2) for runtime in ("float32", "auto")}
           for name in bundles},
        "unit": "CPU ms per image",
        "candidate_over_baseline": {
            runtime: round(median[("candidate", runtime)] / median[("baseline", runtime)], 3) for runtime in ("float32", "auto")
        },
    }


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
    parser.add_argument("--cost-rounds", type=int, default=5, help="rounds of the CPU-per-image measurement (0: none)")
    parser.add_argument("--cost-images", type=int, default=256, help="images it runs per round")
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
    groups = {name: np.asarray(values)[unseen].tolist() for name, values in breakdown_groups(validation).items()}
    trees = groups["source"]
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
        **({"cost": cpu_seconds_per_image(
            {"candidate": candidate, "baseline": baseline}, files[: args.cost_images], args.cost_rounds
        )} if args.cost_rounds else {}),
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
