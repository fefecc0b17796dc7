"""A Grad-CAM map (skin_ray.explain) drawn over the photo it explains, and an image's explanation record: PIL and
matplotlib only, so the split layout's Ingress draws overlays without importing TensorFlow."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from skin_ray.preprocess import decode_photo

OVERLAY_MAX_SIDE = 512  # the overlay is for looking at, not for measuring


def overlay_png(data: bytes, heatmap: np.ndarray) -> tuple[bytes, list[int]]:
    """The photo in `data` (at most OVERLAY_MAX_SIDE pixels a side) with `heatmap` laid over the centre
    square the model saw, as PNG bytes, and that square's box in the photo's own pixels."""
    from matplotlib import colormaps

    photo, scale = decode_photo(data, OVERLAY_MAX_SIDE)
    width, height = photo.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    peak = float(heatmap.max())
    strength = heatmap / peak if peak > 0 else heatmap
    resized = np.asarray(Image.fromarray(strength.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
    colours = colormaps["inferno"](resized)[..., :3] * 255
    alpha = 0.55 * np.clip(resized, 0, 1)[..., None]
    pixels = np.asarray(photo, dtype=np.float64).copy()
    square = pixels[top : top + side, left : left + side]
    pixels[top : top + side, left : left + side] = (1 - alpha) * square + alpha * colours
    buffer = io.BytesIO()
    Image.fromarray(pixels.round().astype(np.uint8)).save(buffer, "PNG")
    box = [round(v / scale) for v in (left, top, left + side, top + side)]
    return buffer.getvalue(), box


def explanation(data: bytes, heatmap: np.ndarray, label: str, overlay_path: Path | None = None) -> dict:
    """An image's explanation: the label it explains, the raw map, the box of the photo it covers and the
    overlay, written to `overlay_path` when given (`overlay`: that path), else inline (`overlay_png`: base64)."""
    png, box = overlay_png(data, heatmap)
    described = {"label": label, "map": np.round(heatmap, 6).tolist(), "crop_box": box}
    if overlay_path is None:
        return {**described, "overlay_png": base64.b64encode(png).decode()}
    overlay_path.write_bytes(png)
    return {**described, "overlay": str(overlay_path)}
