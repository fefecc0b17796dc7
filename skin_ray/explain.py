"""Grad-CAM (Selvaraju et al., 2017): which parts of an image moved the prediction, as a heat map.

For each network (each member of an ensemble) the map is the ReLU of its last convolutional stage's
channels weighted by the mean gradient of the predicted label's log-odds over them; an ensemble's map is
its members' average. The maps cover the model's input, the centre square of the photo, so an overlay puts
them back onto that square of the whole photo. Only networks ending in global average pooling (`default`,
`plain` and their ensembles) can be explained; `seed` flattens its last stage and is refused. Drawing a map
over its photo is skin_ray.overlay's (which needs no TensorFlow, as the split layout's Ingress draws them).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class Explainer:
    def __init__(self, model: keras.Model, positive_index: int):
        networks = [layer for layer in model.layers if layer.name.startswith("member_")] or [model]
        self.stages = [keras.Model(network.inputs, _global_pooling(network).input) for network in networks]
        self.kernel, self.bias = (tf.constant(w) for w in model.layers[-1].get_weights())
        self.positive_index = positive_index

    def heatmaps(self, images: np.ndarray, cancer: np.ndarray) -> np.ndarray:
        """(n, h, w) Grad-CAM maps for preprocessed `images`, each for its predicted label (`cancer[i]`:
        whether that label is Cancer). Non-negative; larger is more evidence for the label."""
        images = tf.convert_to_tensor(images, tf.float32)
        sign = tf.constant(np.where(cancer, 1.0, -1.0), tf.float32)
        with tf.GradientTape() as tape:
            maps = [stage(images, training=False) for stage in self.stages]
            tape.watch(maps)
            features = tf.concat([tf.reduce_mean(m, axis=(1, 2)) for m in maps], axis=1)  # the pooled features
            logits = features @ self.kernel + self.bias
            log_odds = logits[:, self.positive_index] - logits[:, 1 - self.positive_index]
            target = tf.reduce_sum(sign * log_odds)
        gradients = tape.gradient(target, maps)
        cams = [
            tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * m, axis=-1))
            for g, m in zip(gradients, maps, strict=True)
        ]
        return tf.reduce_mean(tf.stack(cams), axis=0).numpy()


def _global_pooling(network: keras.Model) -> keras.layers.Layer:
    for layer in reversed(network.layers):
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return layer
    raise ValueError(f"{network.name} has no global average pooling stage; Grad-CAM explains `default` and `plain` networks")
