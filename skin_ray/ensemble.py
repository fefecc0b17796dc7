"""`skin-ray ensemble`: combine trained bundles into one bundle that averages their logits.

Networks trained from different starting points make partly independent mistakes, so the average of their
logits ranks images better than any one of them (a deep ensemble; Lakshminarayanan et al., 2017). The
result is an ordinary bundle around one Keras model, so serving and batch classification need nothing new:
each member runs up to its pooled features, and one Dense layer holding every member's classifier divided by
their number computes the mean logit. Calibration is folded into that layer and the threshold chosen exactly
as after training.

Calibration and threshold are fitted on the members' validation split, so every member must have been
trained on that same split (same data fingerprint), or one member's training images would calibrate the rest.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from skin_ray.bundle import BundleMetadata, load_bundle, save_bundle
from skin_ray.config import EnsembleSettings
from skin_ray.finalize import bundle_split, finalize_bundle
from skin_ray.model import NUM_CLASSES


def make_ensemble(members: list[keras.Model]) -> keras.Model:
    """One model whose softmax input is the mean of the members' softmax inputs (logits)."""
    if len({member.input_shape for member in members}) > 1:
        raise ValueError(f"the members take inputs of different sizes: {[member.input_shape[1:] for member in members]}")
    inputs = keras.Input(members[0].input_shape[1:])
    features, kernels, biases = [], [], []
    for index, member in enumerate(members):
        member_classifier = member.layers[-1]
        kernel, bias = member_classifier.get_weights()
        kernels.append(kernel)
        biases.append(bias)
        features.append(keras.Model(member.inputs, member_classifier.input, name=f"member_{index}")(inputs))
    classifier = layers.Dense(NUM_CLASSES, activation="softmax", name="classifier")
    outputs = classifier(layers.Concatenate()(features))
    # Stacked kernels over the concatenated features sum the members' logits; dividing by their number averages.
    classifier.set_weights([np.concatenate(kernels) / len(members), np.mean(biases, axis=0)])
    return keras.Model(inputs, outputs, name="ensemble")


def build_ensemble(settings: EnsembleSettings) -> BundleMetadata:
    """Write the ensemble of the bundles `settings.members` to `settings.output`."""
    bundles = [load_bundle(uri) for uri in settings.members]
    first = bundles[0].metadata
    for bundle in bundles[1:]:
        meta = bundle.metadata
        if meta.data.get("fingerprint") != first.data.get("fingerprint") or meta.class_names != first.class_names:
            raise ValueError(f"{bundle.uri} was trained on another split or class order than {bundles[0].uri}")
    split = bundle_split(bundles[0], settings.data)
    model = make_ensemble([bundle.model for bundle in bundles])
    training = {
        "members": [
            {"uri": bundle.uri, "model_version": bundle.metadata.model_version, "arch": bundle.metadata.arch,
             "roc_auc": bundle.metadata.metrics["validation"]["roc_auc"], "training": bundle.metadata.training}
            for bundle in bundles
        ],
        "validation_fraction": first.training["validation_fraction"],
        "subset": first.training.get("subset"),
    }
    metadata, gate, drift = finalize_bundle(model, first.input_spec, split, "ensemble", settings, training, settings.outliers)
    save_bundle(model, metadata, settings.output, (split.train_digests, split.validation_digests), gate, drift)
    return metadata
