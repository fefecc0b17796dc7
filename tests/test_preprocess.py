"""The one preprocessing function: every image mode and format, EXIF orientation, and broken input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from skin_ray.preprocess import IMAGE_SIZE, MAX_PIXELS, ImageDecodeError, preprocess_image
from skin_ray.testing import encode, lesion_image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return lesion_image("Cancer", np.random.default_rng(0), size=200)


def _check_output(array: np.ndarray) -> None:
    assert array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I", "F", "YCbCr", "HSV"])
def test_every_mode_becomes_rgb(photo, mode):
    image = photo.convert(mode) if mode != "I" else photo.convert("L").convert("I")
    fmt = "TIFF" if mode in ("CMYK", "F", "I", "YCbCr", "HSV") else "PNG"
    if mode == "HSV":  # no common format stores HSV; a TIFF keeps YCbCr-like three-band data
        image = photo.convert("HSV").convert("RGB")
    array = preprocess_image(encode(image, fmt), IMAGE_SIZE)
    _check_output(array)
    assert array.std() > 0.02, "the picture must survive the conversion, not turn into a flat colour"


def test_sixteen_bit_grey_keeps_its_range():
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (128, 1))
    array = preprocess_image(encode(Image.fromarray(ramp), "PNG"), IMAGE_SIZE)
    _check_output(array)
    # Pillow's own conversion would clip everything above 255/65535 to white.
    assert array[..., 0].min() < 0.05 and array[..., 0].max() > 0.95
    assert 0.4 < array.mean() < 0.6


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    array = preprocess_image(encode(rgba, "PNG"), IMAGE_SIZE)
    np.testing.assert_allclose(array, 1.0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_formats_agree(photo, fmt):
    """Lossless formats decode to the PNG's array exactly; lossy ones closely."""
    reference = preprocess_image(encode(photo, "PNG"), IMAGE_SIZE)
    array = preprocess_image(encode(photo, fmt), IMAGE_SIZE)
    _check_output(array)
    tolerance = {"JPEG": 0.04, "WEBP": 0.04, "GIF": 0.08}.get(fmt, 0.0)
    assert np.abs(array - reference).mean() <= tolerance


def test_exif_orientation_is_applied():
    # A landscape image whose EXIF says "rotate 90": the model must see it upright (portrait content).
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 150, 200))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    array = preprocess_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), IMAGE_SIZE)
    # Displayed upright, the black half is on top.
    assert array[:40].mean() < 0.2 and array[-40:].mean() > 0.8


def test_non_square_photo_is_centre_cropped_not_squashed():
    # A 4:3 photo with a centred circle: after the recipe the circle must still be round.
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    yy, xx = np.mgrid[0:300, 0:400]
    pixels = np.asarray(image).copy()
    pixels[(yy - 150) ** 2 + (xx - 200) ** 2 < 100**2] = 0
    array = preprocess_image(encode(Image.fromarray(pixels), "PNG"), IMAGE_SIZE)
    dark = array.mean(axis=2) < 0.5
    height = dark.any(axis=1).sum()
    width = dark.any(axis=0).sum()
    assert abs(height - width) <= 2


def test_large_jpeg_uses_reduced_decoding_without_changing_the_result(photo):
    """A 4000x3000 JPEG decodes via draft (fast) to nearly what a full decode + resize gives."""
    big = photo.resize((4000, 3000))
    data = encode(big, "JPEG", quality=90)
    fast = preprocess_image(data, IMAGE_SIZE)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").crop((500, 0, 3500, 3000)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR),
        dtype=np.float32,
    ) / 255.0
    _check_output(fast)
    assert np.abs(fast - full).mean() < 0.02


def test_one_pixel_image():
    _check_output(preprocess_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), IMAGE_SIZE))


def _truncated_jpeg(photo) -> bytes:
    data = encode(photo, "JPEG")
    return data[: len(data) // 2]


def _bomb() -> bytes:
    # A tiny file that declares 20000 x 20000 pixels (400 million).
    return encode(Image.new("1", (20000, 20000)), "PNG")


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty", lambda photo: b"", "empty"),
        ("text", lambda photo: b"this is not an image, just some text\n" * 20, "not_an_image"),
        ("random bytes", lambda photo: np.random.default_rng(0).bytes(5000), "not_an_image"),
        ("truncated jpeg", _truncated_jpeg, "truncated"),
        ("decompression bomb", lambda photo: _bomb(), "too_many_pixels"),
        ("png header only", lambda photo: encode(photo, "PNG")[:60], "truncated"),
    ],
)
def test_broken_input_raises_one_error_type_with_a_reason(photo, name, make, reason):
    with pytest.raises(ImageDecodeError) as caught:
        preprocess_image(make(photo), IMAGE_SIZE)
    assert caught.value.reason == reason
    assert str(caught.value).startswith(reason)


def test_pixel_limit_allows_phone_photos():
    assert 4000 * 3000 < MAX_PIXELS


def test_the_pixel_limit_fits_real_dermoscopy_and_is_a_setting():
    """ISIC's largest photos are about 6000x4500; the limit refuses what is beyond it before decoding."""
    from skin_ray.preprocess import decode_pixels

    assert 6000 * 4500 < MAX_PIXELS
    photo = Image.new("RGB", (3000, 2000), (180, 120, 100))
    assert decode_pixels(encode(photo, "PNG"), 96).shape == (96, 96, 3)
    with pytest.raises(ImageDecodeError, match="3000x2000 is more than the 5,000,000 pixels allowed") as refused:
        decode_pixels(encode(photo, "PNG"), 96, max_pixels=5_000_000)
    assert refused.value.reason == "too_many_pixels"


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "1", "LA"])
def test_a_large_image_of_any_mode_is_reduced_before_it_is_converted(mode):
    """Formats decoded whole are reduced first (box averages), then converted: the result is the image's own
    colour, as a direct conversion of the whole image gives it, within a grey level or two."""
    from skin_ray.preprocess import decode_pixels

    pixels = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    pixels[:] = pixels.mean(axis=(0, 1), keepdims=True).astype(np.uint8)  # one colour: reduction cannot change it
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    small = decode_pixels(encode(image, "PNG"), 96)
    whole = np.asarray(Image.open(io.BytesIO(encode(image, "PNG"))).convert("RGBA" if mode == "LA" else "RGB"))[..., :3]
    if mode == "I;16":
        whole = np.repeat((np.asarray(Image.open(io.BytesIO(encode(image, "PNG")))) / 257).round()[..., None], 3, axis=2)
    np.testing.assert_allclose(small.reshape(-1, 3).mean(axis=0), whole.reshape(-1, 3).mean(axis=0), atol=2)
