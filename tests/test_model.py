"""The architectures and the invariances the default model is built to have."""

from __future__ import annotations

import numpy as np
import pytest

from skin_ray.model import RandomResample, RandomZoomOutOntoSkin, ShadesOfGray, make_augmenter, make_model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((3, 170, 170, 3), dtype=np.float32)


def test_seed_is_the_original_network():
    model = make_model("seed")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert [model.layers[i].filters for i in (0, 2)] == [32, 64]
    assert model.layers[-2].units == 128 and model.layers[-1].units == 2
    assert model.output_shape == (None, 2)


@pytest.mark.parametrize("arch", ["default", "plain"])
def test_ours_are_small_and_end_in_a_two_way_softmax(arch, images):
    model = make_model(arch)
    assert model.count_params() < 2_000_000  # ships in the repository: a few MB
    probabilities = model(images).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown architecture"):
        make_model("resnet")


def test_colour_constancy_removes_per_channel_gains(images):
    """A clinic's white balance or exposure (a gain per channel) does not change what the network sees."""
    gains = np.array([1.3, 0.8, 0.6], dtype=np.float32)
    layer = ShadesOfGray()
    np.testing.assert_allclose(layer(images * gains).numpy(), layer(images).numpy(), rtol=1e-4, atol=1e-5)


def test_augmenter_keeps_shape_and_range(images):
    augmented = make_augmenter(seed=1)(images, training=True).numpy()
    assert augmented.shape == images.shape
    assert not np.allclose(augmented, images)
    assert augmented.min() >= -0.05 and augmented.max() <= 1.05


def test_zoom_out_shrinks_the_lesion_onto_its_own_skin():
    """A dark lesion on pink skin, zoomed out to half size: a quarter of the dark area, skin all around."""
    skin = np.array([0.9, 0.7, 0.7], dtype=np.float32)
    image = np.broadcast_to(skin, (1, 170, 170, 3)).copy()
    image[0, 45:125, 45:125] = 0.2
    zoomed = RandomZoomOutOntoSkin(probability=1.0, scale_range=(0.5, 0.5), seed=0)(image, training=True).numpy()[0]
    dark = zoomed.mean(axis=-1) < 0.4
    assert dark.sum() / (image[0].mean(axis=-1) < 0.4).sum() == pytest.approx(0.25, abs=0.05)
    np.testing.assert_allclose(zoomed[:10].mean(axis=(0, 1)), skin, atol=0.02)
    untouched = RandomZoomOutOntoSkin(probability=0.0, seed=0)(image, training=True).numpy()
    np.testing.assert_array_equal(untouched, image)


def test_resample_softens_the_images_it_takes_and_leaves_the_others(images):
    """Fine detail (pixel-to-pixel differences) drops where an image was taken at a lower resolution."""
    def detail(batch):
        return np.abs(np.diff(batch, axis=2)).mean(axis=(1, 2, 3))

    resampled = RandomResample(probability=1.0, scale_range=(0.5, 0.5), seed=0)(images, training=True).numpy()
    assert resampled.shape == images.shape
    assert np.all(detail(resampled) < 0.6 * detail(images))
    np.testing.assert_allclose(resampled.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.01)  # same picture
    untouched = RandomResample(probability=0.0, seed=0)(images, training=True).numpy()
    np.testing.assert_array_equal(untouched, images)
    np.testing.assert_array_equal(RandomResample(probability=1.0)(images, training=False), images)
