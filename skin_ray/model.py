"""The CNNs: `make_model(arch)` builds the original notebook network (`seed`) or one of ours: `default`, a
small residual network, and `plain`, the same network with plain convolution stages (our first default).

All take the output of `preprocess_image` (`size`x`size` RGB in [0, 1], 170 unless asked) and end in a
2-way softmax whose index order is the bundle's `class_names`. Augmentation lives in `make_augmenter`,
applied by the training loop only, so a saved model is just the inference graph.
"""

from __future__ import annotations

import math
from typing import get_args

import keras
import tensorflow as tf
from keras import layers, ops

from skin_ray.config import Arch
from skin_ray.preprocess import IMAGE_SIZE

NUM_CLASSES = 2


@keras.saving.register_keras_serializable(package="skin_ray")
class ShadesOfGray(layers.Layer):
    """Colour constancy: divide each channel by the image's Minkowski p-norm illuminant estimate.

    The output no longer depends on per-channel gains (white balance, exposure, a clinic's lighting), so the
    network cannot learn the colour cast of one camera. p=6 is the usual choice for dermoscopy
    (Barata et al., 2015).
    """

    def __init__(self, power: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.power = power

    def call(self, images):
        illuminant = ops.power(ops.mean(ops.power(images + 1e-6, self.power), axis=(1, 2), keepdims=True), 1.0 / self.power)
        # 0.5 keeps the typical output near the [0, 1] range the first convolution was initialised for.
        return 0.5 * images / (illuminant + 1e-6)

    def get_config(self):
        return {**super().get_config(), "power": self.power}


def make_model(arch: Arch = "default", size: int = IMAGE_SIZE) -> keras.Model:
    if arch == "default":
        return _make_ours(_residual_block, "default", size)
    if arch == "plain":
        return _make_ours(_plain_block, "plain", size)
    if arch == "seed":
        return _make_seed(size)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {get_args(Arch)}")


def _make_seed(size: int) -> keras.Model:
    """The original notebook network, layer for layer."""
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"),  # as in _make_ours
        ],
        name="seed",
    )


def _conv_bn(x, filters: int, kernel_size: int = 3, strides: int = 1, gamma_initializer: str = "ones"):
    """Convolution then BatchNorm, no activation."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(x)
    # synchronized: batch statistics are all-reduced across workers, so every replica keeps the same
    # moving averages (unsynchronized, each worker's drift apart). momentum 0.9 settles within an epoch.
    return layers.BatchNormalization(momentum=0.9, synchronized=True, gamma_initializer=gamma_initializer)(x)


def _conv_bn_relu(x, filters: int, strides: int = 1):
    return layers.ReLU()(_conv_bn(x, filters, strides=strides))


def _residual_block(x, filters: int):
    """Two 3x3 convolutions plus a 1x1-projected shortcut (ResNet's basic block).

    The shortcut lets each stage start as a near-identity map; the last BatchNorm starts at zero scale so
    the block begins as exactly its shortcut (Goyal et al., 2017).
    """
    shortcut = _conv_bn(x, filters, kernel_size=1)
    x = _conv_bn_relu(x, filters)
    x = _conv_bn(x, filters, gamma_initializer="zeros")
    return layers.ReLU()(layers.Add()([x, shortcut]))


def _plain_block(x, filters: int):
    """Two 3x3 convolutions (VGG's stage)."""
    return _conv_bn_relu(_conv_bn_relu(x, filters), filters)


def _make_ours(block, name: str, size: int) -> keras.Model:
    """A stem, three pooled stages of `block`, global average pooling (~1.2M parameters, ~5 MB).

    A stride-2 stem keeps the cost on CPUs; global pooling (not Flatten) makes the head independent of where
    the lesion sits in the frame.
    """
    inputs = keras.Input((size, size, 3))
    x = ShadesOfGray(dtype="float32")(inputs)  # its image-wide means, too, stay out of bfloat16
    x = _conv_bn_relu(x, 32, strides=2)
    x = _conv_bn_relu(x, 32)
    for filters in (64, 128, 256):
        x = layers.MaxPooling2D(2)(x)
        x = block(x, filters)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    # float32 whatever the training precision: a softmax and its log-loss in bfloat16 would round the
    # probabilities near 0 and 1 to a few hundredths.
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="classifier", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


class RandomZoomOutOntoSkin(layers.Layer):
    """Shrink the image into a wider field of plain skin: the same lesion photographed from further away.

    With `probability`, an image is scaled by a factor drawn log-uniformly from `scale_range`, shifted by up
    to its free margin, and surrounded by its own skin colour (the mean of the middle thirds of its edges,
    which avoids the dark corners of dermoscopy) with a soft edge and a little noise. Keras' RandomZoom
    would fill the new field with mirror copies of the lesion, which no photo has.
    """

    def __init__(self, probability: float = 0.5, scale_range=(0.35, 1.0), seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.probability = probability
        self.scale_range = tuple(scale_range)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        batch, size = ops.shape(images)[0], images.shape[1]
        uniform = lambda low, high: keras.random.uniform((batch,), low, high, seed=self.seed_generator)  # noqa: E731
        applied = uniform(0.0, 1.0) < self.probability
        scale = ops.where(applied, ops.exp(uniform(*(math.log(s) for s in self.scale_range))), 1.0)
        margin = (1.0 - scale) * size / 2
        shift_x, shift_y = uniform(-1.0, 1.0) * margin, uniform(-1.0, 1.0) * margin
        # affine_transform maps each output pixel to the input pixel it samples: x_in = (x_out - c - dx) / s + c.
        centre, zero = (size - 1) / 2, ops.zeros_like(scale)
        transform = ops.stack(
            [
                1 / scale,
                zero,
                centre - (centre + shift_x) / scale,
                zero,
                1 / scale,
                centre - (centre + shift_y) / scale,
                zero,
                zero,
            ],
            axis=1,
        )
        distance_to_edge = ops.minimum(ops.arange(size, dtype="float32"), ops.arange(size, dtype="float32")[::-1])
        ramp = ops.clip(distance_to_edge / (0.1 * size), 0.0, 1.0)
        feather = ops.cast(ramp[:, None, None] * ramp[None, :, None], images.dtype)  # 1 inside, 0 at the edges
        mask = ops.image.affine_transform(ops.broadcast_to(feather, (batch, size, size, 1)), transform)
        shrunk = ops.image.affine_transform(images * feather, transform)  # alpha-premultiplied
        third = slice(size // 3, 2 * size // 3)
        edges = ops.concatenate(
            [
                images[:, :6, third],
                images[:, -6:, third],
                ops.swapaxes(images[:, third, :6], 1, 2),
                ops.swapaxes(images[:, third, -6:], 1, 2),
            ],
            axis=1,
        )
        skin = ops.mean(edges, axis=(1, 2), keepdims=True)
        skin = ops.clip(skin + 0.02 * keras.random.normal(ops.shape(images), seed=self.seed_generator), 0.0, 1.0)
        return ops.where(applied[:, None, None, None], shrunk + (1.0 - mask) * skin, images)


class RandomResample(layers.Layer):
    """Take the image at a lower resolution: sample it down, then back up (bilinear), as a smaller camera would.

    The training sources differ in sharpness (HAM10000's copies were upsampled from 200x150, skin_isic's made
    from 600x450 originals) and in label mix, so sharpness alone would tell the network a label. Applied
    alike to every image whatever its source, it leaves sharpness nothing to tell. With `probability` per
    image; the scale of each side is drawn log-uniformly from `scale_range` once per batch (a resize has one
    output size per batch), the two sides apart, since a squashed frame is softer along one of them.
    """

    def __init__(self, probability: float = 0.5, scale_range=(0.45, 0.9), seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.probability = probability
        self.scale_range = tuple(scale_range)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        size = images.shape[1]
        low, high = (math.log(s) for s in self.scale_range)
        scales = ops.exp(keras.random.uniform((2,), low, high, seed=self.seed_generator))
        sides = ops.cast(ops.round(scales * size), "int32")
        # TensorFlow's resize, since Keras' wants the new size as Python ints; training runs on TensorFlow.
        smaller = tf.image.resize(images, sides, method="bilinear", antialias=True)
        resampled = tf.image.resize(smaller, (size, size), method="bilinear")
        applied = keras.random.uniform((ops.shape(images)[0],), seed=self.seed_generator) < self.probability
        return ops.where(applied[:, None, None, None], resampled, images)


def make_augmenter(seed: int | None = None) -> keras.Sequential:
    """Training-time augmentation for dermoscopy and clinical photos.

    Half the images, from every source alike, are first taken at a lower resolution. Lesions have no
    canonical orientation (full-circle rotation, both flips). Other clinics take larger
    photos with the lesion smaller in the frame and use other cameras, so half the images are zoomed out
    onto plain skin (down to 35% of the frame), all are zoomed a little and translated, and colour,
    contrast and focus are jittered.
    """
    return keras.Sequential(
        [
            RandomResample(probability=0.5, scale_range=(0.45, 0.9), seed=seed),
            RandomZoomOutOntoSkin(probability=0.5, scale_range=(0.35, 1.0), seed=seed),
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(1.0, fill_mode="reflect", seed=seed),
            layers.RandomZoom((-0.2, 0.2), fill_mode="reflect", seed=seed),
            layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed),
            layers.RandomColorJitter(
                value_range=(0, 1), brightness_factor=0.2, contrast_factor=0.2, saturation_factor=(0.35, 0.65),
                hue_factor=0.03, seed=seed,
            ),
            layers.RandomGaussianBlur(factor=0.5, sigma=(0.1, 1.2), value_range=(0, 1), seed=seed),
        ],
        name="augmenter",
    )
