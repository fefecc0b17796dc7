"""Inference on a loaded bundle: arrays in, probabilities and labels out.

`Predictor` is what `predict`, `evaluate`, the Serve model replica and the batch job's actors hold. The
model is called through one traced `tf.function` with a batch-agnostic signature: Keras 3 `model.predict`
pays ~150 ms of fixed overhead per call on a 2-core machine, which would dominate small batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from skin_ray.bundle import Bundle, load_bundle
from skin_ray.preprocess import to_model_input


@dataclass(frozen=True)
class Prediction:
    label: str
    cancer_probability: float
    probabilities: dict[str, float]


class Predictor:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.metadata = bundle.metadata
        height, width, channels = self.metadata.input_size
        self._forward = tf.function(
            lambda images: bundle.model(images, training=False),
            input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)],
        )

    @classmethod
    def from_bundle(cls, uri: str | None = None) -> Predictor:
        return cls(load_bundle(uri))

    @property
    def model_version(self) -> str:
        return self.metadata.model_version

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), for a batch of preprocessed images."""
        if len(images) == 0:
            return np.zeros((0, len(self.metadata.class_names)), dtype=np.float32)
        return self._forward(tf.convert_to_tensor(images, dtype=tf.float32)).numpy()

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of uint8 pixels from `decode_pixels`."""
        return self.predict_arrays(to_model_input(pixels))

    def cancer_probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict_arrays(images)[:, self.metadata.positive_index]

    def to_prediction(self, probabilities: np.ndarray) -> Prediction:
        """One row of class probabilities -> the label decided by the bundle's threshold (not argmax)."""
        names = self.metadata.class_names
        cancer = float(probabilities[self.metadata.positive_index])
        negative = next(name for name in names if name != self.metadata.positive_class)
        label = self.metadata.positive_class if cancer >= self.metadata.threshold else negative
        return Prediction(label, cancer, {name: float(p) for name, p in zip(names, probabilities)})
