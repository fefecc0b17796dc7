"""The one preprocessing recipe: image bytes -> model input.

Training, `predict`, the Serve app and the batch job all call `preprocess_image`, so the model can never
see pixels prepared differently from how it was trained (the original trained on OpenCV's BGR and served
Pillow's RGB). The recipe's id, which names the input size, is stored in every model bundle and checked
when a bundle is loaded; a bundle's own size (its `input_size`) is what its callers decode to.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = 170  # the input size of the original notebook and of new networks unless trained with another
# The largest dermoscopy (ISIC's own photos reach about 6000x4500, 27 MP) and phone photos must pass; beyond,
# an image is refused before its pixels are decoded. At this limit no file costs a decode more than 0.6 s of CPU
# and 260 MB (benchmarks/decode_budget.py); the service's max_image_megapixels sets it.
MAX_PIXELS = 30_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageDecodeError(ValueError):
    """Bytes that cannot become a model input. `reason` is a short stable code for metrics and rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def preprocessing_id(size: int) -> str:
    """The recipe's name for `size`-pixel inputs, as bundles record it."""
    return f"pil-rgb-exif-centercrop-{size}-unit-v1"


@dataclass(frozen=True)
class InputSpec:
    """What a network takes and how an image becomes it: `size`x`size` RGB pixels by the one recipe. A bundle
    carries it (`BundleMetadata.input_spec`), a training run takes it from its recipe; every job decodes by it."""

    size: int

    @property
    def preprocessing(self) -> str:
        return preprocessing_id(self.size)

    def pixels(self, data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """`decode_pixels` to this input."""
        return decode_pixels(data, self.size, max_pixels)


def preprocess_image(data: bytes, size: int) -> np.ndarray:
    """Decode `data` to a (size, size, 3) float32 RGB array in [0, 1]: `to_model_input(decode_pixels(data))`."""
    return to_model_input(decode_pixels(data, size))


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels (any leading shape) -> float32 in [0, 1], the model's input."""
    return pixels.astype(np.float32) / 255.0


def decode_pixels(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode `data` to a (size, size, 3) uint8 RGB array: the recipe up to the last step, a quarter of the bytes
    of the model input (what the Serve app passes between processes).

    Steps: decode with Pillow (JPEGs at a reduced size via `draft`, which is exact enough and several times
    faster), apply the EXIF orientation, convert any mode to RGB, centre-crop to a square (photos from other
    cameras are not square; squashing them would distort the lesion), resize.
    Raises ImageDecodeError for anything that is not a decodable image of acceptable size.
    """
    square = ImageOps.fit(_decode_rgb(data, size, max_pixels), (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(square, dtype=np.uint8)


def image_megapixels(data: bytes) -> float:
    """The image's size in millions of pixels, from its header (nothing is decoded)."""
    width, height = _open(data).size
    return width * height / 1e6


def decode_photo(data: bytes, max_side: int) -> tuple[Image.Image, float]:
    """The whole photo, upright and RGB, shrunk to at most `max_side` pixels a side (for showing, e.g. under
    an explanation), and the factor it was shrunk by. Raises ImageDecodeError like `decode_pixels`."""
    image = _open(data)
    original = image.size
    photo = _upright_rgb(image, lambda size: max(size) // max_side)
    scale = min(1.0, max_side / max(photo.size))
    if scale < 1.0:
        photo = photo.resize((round(photo.size[0] * scale), round(photo.size[1] * scale)), Image.Resampling.BILINEAR)
    return photo, max(photo.size) / max(original)


def _decode_rgb(data: bytes, draft_short_side: int, max_pixels: int) -> Image.Image:
    """The image in `data`, upright and RGB, decoded and reduced no further than a short side of
    `draft_short_side` allows."""
    image = _open(data, max_pixels)
    # draft picks the largest JPEG DCT scale (1/2, 1/4, 1/8) that still covers `draft_short_side` on both
    # sides; the centre crop's short side is what must stay >= size, hence the square request.
    short = min(image.size)
    if image.format == "JPEG" and short > draft_short_side:
        scale = short / draft_short_side
        image.draft("RGB", (int(image.size[0] / scale), int(image.size[1] / scale)))
    return _upright_rgb(image, lambda size: min(size) // draft_short_side)


def _upright_rgb(image: Image.Image, factor_for) -> Image.Image:
    """`image` decoded, reduced by the whole factor `factor_for(size)` when that is 2 or more (box averages in
    one pass), turned upright by its EXIF orientation and converted to RGB. Formats without JPEG's reduced
    decoding (PNG, TIFF, WebP, GIF) are decoded whole, so every step after the reduction (mode conversion,
    transparency, the final resize) works on the small image: a 30 MP 16-bit PNG took 2.2 s and 372 MB before,
    its conversion running in float64 on every pixel (benchmarks/decode_budget.py)."""
    try:
        image.load()
        factor = factor_for(image.size)
        if factor >= 2:
            if image.mode in ("1", "P", "PA") or image.mode.startswith("I;16"):
                # Modes reduce() does not take, converted to the nearest it does (still one pixel per pixel).
                image = image.convert(
                    "I" if image.mode.startswith("I;16") else "L" if image.mode == "1"
                    else "RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB"
                )
            image = image.reduce(factor)
        return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageDecodeError(reason, f"cannot decode image: {exc}") from None


def _open(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "the data is not an image format Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("too_many_pixels", "the image declares more pixels than allowed") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("corrupt", f"cannot read image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{width}x{height} is more than the {max_pixels:,} pixels allowed"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels are composited onto white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # Pillow's own conversion clips high-bit-depth values at 255, which turns a 16-bit photo white.
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if image.mode == "F" and values.max() <= 1.0 else (255.0 if values.max() <= 255 else 65535.0)
        image = Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
