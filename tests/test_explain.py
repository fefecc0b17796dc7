"""Grad-CAM explanations: what the map is, where it sits on the photo, and that it follows the lesion."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from skin_ray.explain import Explainer
from skin_ray.model import make_model
from skin_ray.overlay import explanation
from skin_ray.predictor import Predictor
from skin_ray.preprocess import preprocess_image
from skin_ray.testing import round_lesion_photo


def _heatmap(predictor: Predictor, data: bytes) -> np.ndarray:
    record, heatmap = predictor.explain(preprocess_image(data, predictor.metadata.image_size)[None])
    assert record["label"] is not None, record
    return heatmap


def _centroid(heatmap: np.ndarray) -> np.ndarray:
    """(x, y) of the map's mass, in cells."""
    rows, columns = np.mgrid[0 : heatmap.shape[0], 0 : heatmap.shape[1]]
    return np.array([(heatmap * columns).sum(), (heatmap * rows).sum()]) / heatmap.sum()


def test_map_is_finite_and_the_overlay_has_the_photos_aspect(shipped):
    data = round_lesion_photo((200, 150))
    heatmap = _heatmap(shipped, data)
    assert heatmap.shape == (10, 10) and np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() > 0
    described = explanation(data, heatmap, "Cancer")
    overlay = Image.open(io.BytesIO(base64.b64decode(described["overlay_png"])))
    assert overlay.size == (400, 300)  # the photo's own aspect, not the model's square
    assert described["crop_box"] == [50, 0, 350, 300]  # the centre square the model saw
    # Outside that square the photo is untouched.
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
    assert np.abs(np.asarray(overlay.convert("RGB"), dtype=int)[:, :50] - original[:, :50]).max() == 0


def _cancer_heatmap(predictor: Predictor, data: bytes) -> np.ndarray:
    return predictor.explainer.heatmaps(preprocess_image(data, predictor.metadata.image_size)[None], np.array([True]))[0]


@pytest.mark.parametrize("start, end", [((150, 150), (250, 150)), ((200, 90), (200, 210))], ids=["left-right", "top-bottom"])
def test_the_cancer_evidence_map_moves_with_the_lesion(shipped, start, end):
    """The map follows what is in the photo: the Cancer evidence moves with a dark lesion moved across it. (Not the
    map of the predicted label: the shipped network calls this plain generated lesion Non_Cancer and finds that
    evidence in the flat skin around it.)"""
    before, after = (_centroid(_cancer_heatmap(shipped, round_lesion_photo(centre))) for centre in (start, end))
    moved = np.subtract(end, start) / 300 * 10  # the lesion's move in map cells (300 px square -> 10 cells)
    axis = int(np.argmax(np.abs(moved)))
    assert (after - before)[axis] > 0.4 * moved[axis], (before, after)


def test_networks_without_global_pooling_are_refused():
    with pytest.raises(ValueError, match="global average pooling"):
        Explainer(make_model("seed"), positive_index=0)
