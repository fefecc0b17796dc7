"""Calibration and the decision threshold of a trained network, fitted on its validation split.

Platt scaling is folded into the network's last Dense layer, so every consumer gets calibrated
probabilities from the plain model. Because calibration and threshold are fitted on the split they are
reported on, the figures also carry a 2-fold cross-fitted ECE: an honest estimate for unseen images of the
same kind. Used by training, ensembling and anything else that makes a bundle (skin_ray.finalize).
"""

from __future__ import annotations

import numpy as np

from skin_ray import classifier_stats
from skin_ray.config import ThresholdSettings
from skin_ray.preprocess import to_model_input
from skin_ray.scoring import cancer_scores


def calibrate(model, positive_index: int, validation, rule: ThresholdSettings, sources=None) -> tuple[float, dict]:
    """Calibrate `model` (whose class `positive_index` is Cancer) in place on `validation` (a materialized
    `pixel_dataset`, so every pass reads its rows in the same order); return the threshold `rule` chooses on it
    and the bundle's metrics (with `threshold_rule`: what the threshold promises on new images, and its cost).
    With `sources` (each row's data source, in row order) from more than one source, the threshold is lowered
    where needed for every source to keep the target sensitivity on its own validation cases."""
    import tensorflow as tf

    network = tf.function(lambda images: model(images, training=False))
    forward = lambda pixels: network(to_model_input(pixels))  # noqa: E731
    y_true, p_raw = cancer_scores(validation, forward, positive_index)
    gap = classifier_stats.log_odds(p_raw)
    scale, offset = classifier_stats.fit_platt(y_true, gap)
    _fold_platt_into_classifier(model, positive_index, scale, offset)
    _, p_cancer = cancer_scores(validation, forward, positive_index)
    threshold, threshold_rule = classifier_stats.threshold_keeping_sensitivity(
        y_true, p_cancer, rule.target_sensitivity, rule.sensitivity_confidence
    )
    if sources is not None and len(set(sources)) > 1:
        overall = threshold
        threshold, threshold_rule["within_sources"] = classifier_stats.threshold_within_strata(
            y_true, p_cancer, sources, rule.target_sensitivity, threshold)
        threshold_rule["lowered_from"] = overall if threshold < overall else None
    summary = classifier_stats.summary(y_true, p_cancer, threshold)
    summary.update(
        ece_uncalibrated=classifier_stats.expected_calibration_error(y_true, p_raw),
        ece_crossfit=crossfit_ece(y_true, gap, _content_folds(validation)),
    )
    return threshold, {
        "validation": summary,
        "calibration": {"platt_scale": scale, "platt_offset": offset},
        "threshold_rule": threshold_rule,
    }


def _fold_platt_into_classifier(model, positive_index: int, scale: float, offset: float) -> None:
    """softmax(a*l + c*e_pos) has logit gap a*(l_pos - l_neg) + c: scale kernel and bias, shift one bias."""
    classifier = model.layers[-1]
    kernel, bias = classifier.get_weights()
    bias = scale * bias
    bias[positive_index] += offset
    classifier.set_weights([scale * kernel, bias])


def content_fold(sha256: str) -> int:
    """The cross-fitting half (0 or 1) of an image, from its content hash: the same halves whatever order
    the rows come in (halves by row number moved the figure with Ray Data's order)."""
    return int(sha256[-8:], 16) % 2  # the last digits: the split's rule reads the first ones


def _content_folds(dataset) -> np.ndarray:
    """`content_fold` of every row of a `pixel_dataset`, in its row order."""
    return np.array([content_fold(digest) for batch in dataset.iter_batches(batch_size=64) for digest in batch["sha256"]])


def crossfit_ece(y_true: np.ndarray, gap: np.ndarray, folds: np.ndarray) -> float:
    """ECE of Platt scaling fitted on one half of the images (`folds` == 0 or 1) and applied to the other,
    both ways."""
    out_of_fold = np.empty(len(y_true))
    for fold in (0, 1):
        scale, offset = classifier_stats.fit_platt(y_true[folds != fold], gap[folds != fold])
        out_of_fold[folds == fold] = classifier_stats.sigmoid(scale * gap[folds == fold] + offset)
    return classifier_stats.expected_calibration_error(y_true, out_of_fold)
