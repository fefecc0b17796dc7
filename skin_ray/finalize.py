"""What turns a trained network into a bundle, the same for every command that makes one (train, ensemble):
calibration and threshold (skin_ray.calibration), the safeguards fitted on the same split, and the
description. Also re-deriving a bundle's split from its data, for commands that refit what a bundle holds.
"""

from __future__ import annotations

import numpy as np

from skin_ray import safeguards
from skin_ray.bundle import BundleMetadata, describe_bundle, load_bundle, write_safeguards
from skin_ray.calibration import calibrate
from skin_ray.config import FitSafeguardsSettings, ThresholdSettings
from skin_ray.data import CLASS_NAMES, POSITIVE_CLASS, Split, discover, pixel_dataset, split_by_content
from skin_ray.drift import DriftReference, Observations, image_statistics
from skin_ray.predictor import analysis_function, member_cancer_probabilities
from skin_ray.preprocess import to_model_input
from skin_ray.safeguards import InputGate


def finalize_bundle(
    model, split: Split, arch: str, rule: ThresholdSettings, training: dict, source: str
) -> tuple[BundleMetadata, InputGate, DriftReference]:
    """Calibrate `model` in place, choose its threshold by `rule`, fit its safeguards and drift reference,
    describe the bundle: what `save_bundle` then writes. Each split is decoded once, for all of them."""
    train, validation = _pixel_datasets(split, model)
    threshold, bundle_metrics = calibrate(model, validation, rule)
    gate, input_gate, uncertainty, drift = fit_safeguards(model, train, validation, threshold)
    metadata = describe_bundle(model, arch, split, threshold, rule.target_sensitivity, bundle_metrics, training, source)
    metadata.input_gate, metadata.uncertainty = input_gate, uncertainty
    return metadata, gate, drift


def fit_safeguards(model, train, validation, threshold: float) -> tuple[InputGate, dict, dict, DriftReference]:
    """The input gate and the uncertainty margin of a calibrated model, with their bundle.json descriptions,
    and the drift reference (skin_ray.drift) they give on validation; `train` and `validation` are the split's
    `pixel_dataset`s.

    The gate's reference is the training split as the model saw it in training: every image, and every image
    zoomed out onto skin as the augmentation does (without them, 14% of the validation images re-photographed
    with a wider field were refused; with them 2.7%, at the price of letting more noise and flat images
    through: benchmarks/ood.py). Its threshold and the margin come from the validation split.
    """
    from skin_ray.model import RandomZoomOutOntoSkin

    analyse = analysis_function(model)
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    zoom_out = RandomZoomOutOntoSkin(probability=1.0, seed=0)

    def features_of(dataset, zoomed_too: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        labels, probabilities, features, statistics = [], [], [], []
        for batch in dataset.iter_batches(batch_size=64):
            images = to_model_input(batch["pixels"])
            statistics.append(image_statistics(batch["pixels"], batch["megapixels"]))
            views = [images]
            if zoomed_too:
                views.append(np.asarray(zoom_out(images, training=True)))
            for view in views:
                p, f = (np.asarray(t) for t in analyse(view))
                labels.append(batch["label"])
                probabilities.append(p[:, positive])
                features.append(f)
        statistics = {name: np.concatenate([part[name] for part in statistics]) for name in statistics[0]}
        return np.concatenate(labels), np.concatenate(probabilities), np.concatenate(features), statistics

    train_labels, _, train_features, _ = features_of(train, zoomed_too=True)
    labels, p_cancer, features, image = features_of(validation)
    members = member_cancer_probabilities(model, features, positive)
    return fit_safeguards_on(train_features, train_labels, features, labels == positive, p_cancer, members, image, threshold)


def fit_safeguards_on(
    train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray, is_cancer: np.ndarray,
    p_cancer: np.ndarray, member_cancer: np.ndarray | None, image: dict[str, np.ndarray], threshold: float,
) -> tuple[InputGate, dict, dict, DriftReference]:
    """`fit_safeguards` once the network has seen the images: the training split's features and labels, and the
    validation split's features, truth, calibrated Cancer probability, members' probabilities (None: a single
    network) and `image_statistics`."""
    gate = safeguards.fit_input_gate(train_features, train_labels, features)
    disagree = safeguards.members_disagree(member_cancer, threshold, len(p_cancer))
    y_true = np.asarray(is_cancer).astype(np.int64)
    margin = safeguards.uncertainty_margin(y_true, p_cancer, threshold, disagree)
    scores = gate.scores(features)
    drift = DriftReference.of(Observations.of_arrays(
        ood_score=scores, cancer_probability=p_cancer, refused=scores > gate.threshold,
        uncertain=safeguards.is_uncertain(p_cancer, threshold, margin, disagree), cancer=p_cancer >= threshold, image=image,
    ))
    return gate, *safeguards.describe(gate, margin, y_true, p_cancer, threshold, disagree), drift


def _pixel_datasets(split: Split, model) -> tuple:
    """The split's training and validation images decoded (once) to `model`'s input size, in the split's order:
    the gate's zoomed-out views are drawn in sequence, so another order fitted another gate (the shipped bundle's
    threshold moved 1.5% between two fits before)."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    size = model.input_shape[1]
    return pixel_dataset(split.train, size), pixel_dataset(split.validation, size)


def bundle_split(metadata: BundleMetadata, uri: str, data: str | None = None) -> tuple[Split, str]:
    """The split the bundle at `uri` was trained and calibrated on, re-derived from `data` (by default the
    data it was trained on), and that data's location; refused when the data's fingerprint differs."""
    source = data or metadata.data["source"]
    images = discover(source, class_names=tuple(metadata.class_names), subset=metadata.training.get("subset"))
    split = split_by_content(images, metadata.training["validation_fraction"])
    if split.fingerprint != metadata.data["fingerprint"]:
        raise ValueError(f"{source} is not the data {uri} was trained on (its fingerprint differs)")
    return split, source


def add_safeguards(settings: FitSafeguardsSettings) -> BundleMetadata:
    """Fit the safeguards of an existing bundle on its own split and write them into it; the model file is
    left untouched."""
    bundle = load_bundle(settings.bundle)
    metadata = bundle.metadata
    split, _ = bundle_split(metadata, settings.bundle, settings.data)
    train, validation = _pixel_datasets(split, bundle.model)
    gate, metadata.input_gate, metadata.uncertainty, drift = fit_safeguards(
        bundle.model, train, validation, metadata.threshold
    )
    write_safeguards(metadata, gate, drift, settings.bundle)
    return metadata
