"""`skin-ray optimize`: give a bundle the faster runtime of skin_ray.onnx_analysis, once it is shown on the
bundle's own validation split to decide as the Keras network does.

The Keras network stays the reference: its threshold, uncertainty margin and input gate were fitted on its
outputs, and a runtime is accepted only while it changes none of their decisions beyond `BOUNDS` (so nothing is
re-derived for it); one that would is refused with its figures, and the bundle keeps only the Keras network.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import numpy as np

from skin_ray import classifier_stats
from skin_ray.bundle import ANALYSIS_FILE, Bundle, load_bundle, write_runtime
from skin_ray.config import OptimizeSettings
from skin_ray.finalize import bundle_split, split_pixel_datasets
from skin_ray.onnx_analysis import OPSET, RUNTIME, onnx_forward
from skin_ray.predictor import Analyser, Decisions, Predictor, analysis_function
from skin_ray.preprocess import to_model_input
from skin_ray.safeguards import distance_to_threshold
from skin_ray.scoring import scored_batches

logger = logging.getLogger(__name__)

# How far a runtime may move from the Keras network on the validation split: the 95% interval of the paired
# ROC AUC difference, the largest change of a Cancer probability, and the share of images whose label, gate
# decision or uncertainty flag changes.
BOUNDS = {
    "auc_difference": 0.005,
    "max_abs_dp": 1e-3,
    "labels_differ": 0.005,
    "refusals_differ": 0.005,
    "uncertain_differ": 0.005,
}
# Cancer probabilities this close count as equal when ranking: a few float32 steps (one is 6e-8 near 1), so that
# ties broken by rounding, common where a network saturates, are not taken for a change of ranking.
ROUNDING_NOISE = 1e-6
CPU_FEATURES: list[str] = []  # ONNX Runtime's float32 kernels choose among SSE, AVX2 and AVX-512 as they run


class RuntimeRefused(ValueError):
    """The runtime moved the bundle's decisions beyond `BOUNDS`."""


def export_analysis(model) -> bytes:
    """The serialised ONNX graph of `model`'s analysis pass, outputs in `analysis_function`'s order."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        from skin_ray.runtime import StartupError

        raise StartupError("exporting a runtime needs tf2onnx: pip install 'skin-ray[optimize]'") from None

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its optimiser's INFO lines are not the user's business
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]  # unnamed, as analysis_function's
    graph, _ = tf2onnx.convert.from_function(analysis_function(model), input_signature=signature, opset=OPSET)
    return graph.SerializeToString()


def optimize_bundle(settings: OptimizeSettings) -> dict:
    """Export the bundle's analysis pass, compare it with the Keras network on the bundle's validation split and,
    within `BOUNDS`, write it and its figures into the bundle; return bundle.json's `runtime`."""
    bundle = load_bundle(settings.bundle)
    split = bundle_split(bundle, settings.data)
    _, validation = split_pixel_datasets(split, bundle.metadata.input_spec)
    positive = bundle.metadata.positive_index
    batches = ((images, batch["label"] == positive) for batch, images in scored_batches(validation, to_model_input))
    return add_runtime(bundle, settings.bundle, batches)


def add_runtime(bundle: Bundle, uri: str, validation: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """`optimize_bundle` on `validation`: batches of preprocessed images and whether each is Cancer."""
    from skin_ray.runtime import forward_threads

    graph = export_analysis(bundle.model)
    reference = Predictor(bundle, runtime="float32")
    forward = onnx_forward(graph, forward_threads())
    candidate = Predictor(bundle, Analyser(bundle.model, bundle.metadata.positive_index, forward, RUNTIME))
    truth, decided, decided_by_candidate = [], [], []
    for images, is_cancer in validation:
        truth.append(is_cancer)
        decided.append(reference.decide(reference.analyse(images)))
        decided_by_candidate.append(candidate.decide(candidate.analyse(images)))
    decided = Decisions.concatenate(decided)
    figures = compare_decisions(
        np.concatenate(truth), decided, Decisions.concatenate(decided_by_candidate), cut_cases(reference, decided)
    )
    if exceeded := beyond_bounds(figures):
        raise RuntimeRefused(f"{RUNTIME} moved {uri}'s decisions on its validation split beyond the bounds "
                             f"({'; '.join(exceeded)}); the bundle keeps running its Keras network")
    bundle.metadata.runtime = describe_runtime(graph, bundle.model_sha256, figures)
    write_runtime(bundle.metadata, graph, uri)
    logger.info("%s now runs %s: %s", uri, RUNTIME, figures)
    return bundle.metadata.runtime


def describe_runtime(graph: bytes, model_sha256: str, figures: dict) -> dict:
    """bundle.json's `runtime`: what runs `graph`, what it was exported from, what it needs and its `figures`."""
    from importlib.metadata import version

    return {
        "name": RUNTIME, "file": ANALYSIS_FILE, "sha256": hashlib.sha256(graph).hexdigest(), "model_sha256": model_sha256,
        "cpu_features": CPU_FEATURES, "opset": OPSET,
        "made_with": {package: version(package) for package in ("tf2onnx", "onnxruntime")},
        "validation": figures, "bounds": BOUNDS,
    }


def cut_cases(predictor: Predictor, decided: Decisions) -> np.ndarray:
    """Which of the images `predictor` `decided` on are nearest, on either side, to one of its bundle's cuts: the
    threshold (on the Cancer probability), the uncertainty margin (on the log-odds' distance to the threshold's)
    and the input gate's threshold (on its score).

    The decision figures leave these out: fitted on this very split, each cut lies half a gap from two of its
    cases, a gap that can be a few millionths (seen: a 2-epoch bundle's threshold 1.5e-6 from a case, whose label
    a runtime 2e-5 off flipped: one image of 49, "2% of labels"). A new image is no likelier to land there."""
    cases = nearest_each_side(decided.p_cancer, decided.cancer)
    if decided.refused is not None:
        cases |= nearest_each_side(decided.ood_score, decided.refused)
    if predictor.metadata.uncertainty is not None:
        distance = distance_to_threshold(decided.p_cancer, predictor.metadata.threshold)
        cases |= nearest_each_side(-distance, distance < predictor.metadata.uncertainty["margin"])
    return cases


def nearest_each_side(values: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The cases nearest to the cut that puts `high` (the values above it) on one side: the lowest value of those
    above and the highest of those below, with their ties."""
    cases = np.zeros(len(values), dtype=bool)
    if high.any():
        cases |= values == values[high].min()
    if (~high).any():
        cases |= values == values[~high].max()
    return cases


def compare_decisions(
    is_cancer: np.ndarray, reference: Decisions, candidate: Decisions, at_cuts: np.ndarray | None = None
) -> dict:
    """How `candidate`'s decisions on images differ from `reference`'s (the Keras network's): the figures `BOUNDS`
    limits, the two ROC AUCs and ECEs, and the 99th percentile of the change in Cancer probability. The AUCs rank
    a probability within `ROUNDING_NOISE` of the reference's as the reference's; the shares of labels, refusals
    and flags that differ leave out the images `at_cuts` (`cut_cases`), whose changes are counted apart."""
    at_cuts = np.zeros(len(is_cancer), dtype=bool) if at_cuts is None else at_cuts
    dp = np.abs(candidate.p_cancer.astype(np.float64) - reference.p_cancer)
    ranked = np.where(dp <= ROUNDING_NOISE, reference.p_cancer, candidate.p_cancer)
    low, high = classifier_stats.roc_auc_difference_interval(is_cancer, ranked, reference.p_cancer)
    figures = {
        "n": len(dp),
        "roc_auc": {
            "float32": classifier_stats.roc_auc(is_cancer, reference.p_cancer),
            "runtime": classifier_stats.roc_auc(is_cancer, ranked),
        },
        "auc_difference_interval": [low, high],
        "auc_difference": max(abs(low), abs(high)),
        "ece": {"float32": classifier_stats.expected_calibration_error(is_cancer, reference.p_cancer),
                "runtime": classifier_stats.expected_calibration_error(is_cancer, candidate.p_cancer)},
        "max_abs_dp": float(dp.max()),
        "p99_abs_dp": float(np.quantile(dp, 0.99)),
        "cut_cases": int(at_cuts.sum()),
    }
    changed = np.zeros(len(dp), dtype=bool)
    for name, before, after in (("labels_differ", reference.cancer, candidate.cancer),
                                ("refusals_differ", reference.refused, candidate.refused),
                                ("uncertain_differ", reference.uncertain, candidate.uncertain)):
        if before is not None:
            figures[name] = float(np.mean((after != before) & ~at_cuts))
            changed |= after != before
    if reference.refused is not None:
        figures["max_abs_ood_score_difference"] = float(np.abs(candidate.ood_score - reference.ood_score).max())
    figures["cut_cases_changed"] = int((changed & at_cuts).sum())
    return figures


def beyond_bounds(figures: dict, bounds: dict = BOUNDS) -> list[str]:
    """"name figure > bound" for each figure beyond its bound (a figure the bundle has no part for is not checked)."""
    return [f"{name} {figures[name]:.3g} > {bound:g}" for name, bound in bounds.items() if figures.get(name, 0) > bound]
