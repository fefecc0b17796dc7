"""The images the input gate is fitted against, all generated or shipped with a package, so every fit can be
rebuilt: kinds of images that are not dermoscopy (outlier exposure; Hendrycks et al., 2019), and dermoscopy
re-photographed as another clinic might or taken with another device, which the gate must keep accepting.

Each kind in `NOT_DERMOSCOPY` takes a random generator and some dermoscopic pixels (the clinical photographs
borrow lesions from them) and returns PIL images; `rephotographed` and `another_device` work on model-input pixels. The gate's
figures are reported per kind and with each kind left out of the fit (skin_ray.safeguards), so what it
refuses is not only what it was shown.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

# scikit-image's sample photographs that ship in its wheel (others are downloaded on first use).
PHOTOGRAPHS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
               "gravel", "hubble_deep_field", "horse", "logo", "moon", "page", "rocket", "text")
# Skin tones from light to dark (RGB): clinical photographs are of every skin, under ordinary light.
SKIN_TONES = np.array([[235, 200, 180], [220, 175, 150], [195, 150, 120], [165, 115, 85], [130, 90, 65], [95, 65, 45]], float)


def _image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def sample_photographs(rng: np.random.Generator, crops_per_photo: int = 4) -> list[Image.Image]:
    """scikit-image's sample photographs (an astronaut, a cat, coffee, a rocket, coins, text, ...) and
    matplotlib's portrait, whole and as random square crops at several scales."""
    import matplotlib.cbook
    import skimage.data

    photos = []
    for name in PHOTOGRAPHS:
        pixels = np.asarray(getattr(skimage.data, name)())
        photos.append(Image.fromarray(pixels.astype(np.uint8) * (255 if pixels.dtype == bool else 1)).convert("RGB"))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        photos.append(Image.open(file).convert("RGB"))
    return photos + [crop for photo in photos for crop in random_crops(photo, rng, crops_per_photo)]


def random_crops(photo: Image.Image, rng: np.random.Generator, count: int) -> list[Image.Image]:
    """`count` square crops of `photo`, each 30-90% of its short side, anywhere in it."""
    crops = []
    for _ in range(count):
        side = int(min(photo.size) * rng.uniform(0.3, 0.9))
        x, y = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        crops.append(photo.crop((x, y, x + side, y + side)))
    return crops


def documents(rng: np.random.Generator, count: int = 60) -> list[Image.Image]:
    """Pages of text and user-interface screenshots, drawn with Pillow in fonts of several sizes."""
    images = []
    for i in range(count):
        width, height = int(rng.integers(400, 1200)), int(rng.integers(300, 900))
        image = Image.new("RGB", (width, height), _colour(rng, 225))
        draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=int(rng.integers(10, 28)))
        if i % 2 == 0:  # a page of text
            for row in range(20, height - 20, int(font.size * 1.5)):
                words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(30))
                draw.text((20, row), words, fill=_colour(rng, 0, 90), font=font)
        else:  # a screenshot: a title bar, panels, buttons
            draw.rectangle([0, 0, width, 30], fill=_colour(rng, 30, 120))
            for _ in range(int(rng.integers(4, 12))):
                x, y = int(rng.integers(0, width - 60)), int(rng.integers(40, height - 30))
                draw.rectangle([x, y, x + int(rng.integers(40, 300)), y + int(rng.integers(20, 120))],
                               fill=_colour(rng, 150), outline=(90, 90, 90))
                draw.text((x + 5, y + 5), "Button", fill=(0, 0, 0), font=font)
        images.append(image)
    return images


def charts(rng: np.random.Generator, count: int = 60) -> list[Image.Image]:
    """Line plots, scatter plots, bar and pie charts and heat maps, rendered by matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = []
    for i in range(count):
        figure = Figure(figsize=(rng.uniform(4, 9), rng.uniform(3, 7)), dpi=80)
        axes = figure.subplots()
        kind = i % 5
        if kind == 0:
            for _ in range(int(rng.integers(1, 5))):
                axes.plot(np.cumsum(rng.normal(size=50)))
        elif kind == 1:
            axes.scatter(rng.normal(size=200), rng.normal(size=200), c=rng.uniform(size=200), s=10)
        elif kind == 2:
            axes.bar(range(8), rng.uniform(1, 10, 8), color=[tuple(rng.uniform(size=3)) for _ in range(8)])
        elif kind == 3:
            axes.pie(rng.uniform(1, 5, 5))
        else:
            axes.imshow(rng.normal(size=(20, 20)).cumsum(0), cmap=str(rng.choice(["viridis", "magma", "coolwarm", "gray"])))
        axes.set_title(f"figure {i}")
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        images.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"))
    return images


def radiographs(rng: np.random.Generator, count: int = 60) -> list[Image.Image]:
    """Grey-scale images drawn like chest radiographs, radiographs of limbs and CT slices, blurred and noisy."""
    images = []
    for i in range(count):
        height, width = int(rng.integers(400, 1000)), int(rng.integers(400, 1000))
        yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
        pixels = np.full((height, width), rng.uniform(0, 30))
        kind = i % 3
        if kind == 0:  # a chest: body, two dark lungs, ribs, spine
            body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
            pixels[body] = rng.uniform(150, 210)
            for centre in (0.32, 0.68):
                pixels[((xx - centre) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = rng.uniform(40, 90)
            for row in np.linspace(0.25, 0.8, 9):
                pixels[(np.abs(yy - row - 0.6 * (xx - 0.5) ** 2) < 0.012) & body] += 50
            pixels[np.abs(xx - 0.5) < 0.04] = rng.uniform(190, 240)
        elif kind == 1:  # bones in soft tissue
            for _ in range(int(rng.integers(3, 7))):
                x0, y0 = rng.uniform(0.2, 0.8, 2)
                angle, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.5)
                along = (xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)
                across = np.abs((yy - y0) * np.cos(angle) - (xx - x0) * np.sin(angle))
                soft = (np.abs(along) < length) & (across < 0.09)
                pixels[soft] = np.maximum(pixels[soft], 90)
                pixels[(np.abs(along) < length) & (across < 0.04)] = 220
        else:  # a CT slice: an ellipse with round structures
            body = ((xx - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
            pixels[body] = 120
            for _ in range(6):
                cx, cy, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.03, 0.1)
                pixels[((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2) & body] = rng.uniform(30, 250)
        grey = _image(pixels + rng.normal(0, 6, pixels.shape)).filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
        images.append(grey.convert("RGB"))
    return images


def noise_and_flat(rng: np.random.Generator, count: int = 60) -> list[Image.Image]:
    """Uniform and Gaussian noise, solid colours and gradients."""
    images = []
    for i in range(count):
        width, height = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        kind = i % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (height, width, 3))
        elif kind == 1:
            pixels = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (height, width, 3))
        elif kind == 2:
            pixels = np.ones((height, width, 3)) * rng.integers(0, 256, 3)
        else:
            ramp = np.linspace(0, 1, width)[None, :, None]
            pixels = rng.integers(0, 256, 3) * ramp + rng.integers(0, 256, 3) * (1 - ramp) + np.zeros((height, 1, 1))
        images.append(_image(pixels))
    return images


def clinical_photographs(rng: np.random.Generator, lesions: np.ndarray, count: int = 60) -> list[Image.Image]:
    """Skin photographed with an ordinary camera: a wide field of skin of any tone, shaded by the body's curve,
    with a rash of papules, scaly plaques or a mole taken from `lesions` (dermoscopic pixels) seen from afar, and
    half the time the background beyond the body's edge."""
    images = []
    for i in range(count):
        width, height = int(rng.integers(600, 1400)), int(rng.integers(450, 1050))
        yy, xx = np.ogrid[0:height, 0:width]
        yy, xx = yy / max(height, width), xx / max(height, width)
        tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.95, 1.05, 3)
        direction = rng.uniform(0, 2 * np.pi)
        curve = (xx - 0.5) ** 2 + (yy - 0.4) ** 2
        shading = 1 + rng.uniform(0.1, 0.4) * np.cos(direction) * (2 * xx - 1) - rng.uniform(0, 0.3) * curve
        mottling = _smooth_noise(rng, height, width, 40)
        pixels = tone * shading[..., None] * (1 + 0.04 * mottling[..., None]) + rng.normal(0, 3, (height, width, 3))
        red = np.array([rng.uniform(170, 230), rng.uniform(50, 110), rng.uniform(60, 110)])
        kind = i % 3
        if kind == 0:  # a rash of papules
            for _ in range(int(rng.integers(20, 200))):
                cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 15) * width / 800
                top, left = max(0, int(cy - radius)), max(0, int(cx - radius))
                window = pixels[top : int(cy + radius) + 1, left : int(cx + radius) + 1]  # a view: drawn in place
                rows, columns = np.ogrid[top : top + window.shape[0], left : left + window.shape[1]]
                papule = (columns - cx) ** 2 + (rows - cy) ** 2 < radius**2
                window[papule] = 0.5 * window[papule] + 0.5 * red
        elif kind == 1:  # plaques with silvery scale
            plaque = _smooth_noise(rng, height, width, int(rng.integers(60, 160))) > rng.uniform(0.6, 1.2)
            pixels[plaque] = 0.4 * pixels[plaque] + 0.6 * red
            scale = plaque & (rng.uniform(size=plaque.shape) < 0.25)
            pixels[scale] = 0.5 * pixels[scale] + 0.5 * np.array([235.0, 225.0, 220.0])
        else:  # a mole from afar: the dark part of a dermoscopic lesion, small in the frame
            side = int(min(width, height) * rng.uniform(0.06, 0.2))
            lesion = np.asarray(Image.fromarray(lesions[rng.integers(len(lesions))]).resize((side, side)), float)
            v, u = np.mgrid[0:side, 0:side] / side - 0.5
            round_ = np.clip((0.45 - np.hypot(u, v)) / 0.1, 0, 1) * (lesion.mean(axis=2) < np.median(lesion))
            alpha = np.asarray(_image(round_ * 255).filter(ImageFilter.GaussianBlur(side / 30)), float)[..., None] / 255
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            patch = pixels[y0 : y0 + side, x0 : x0 + side]
            pixels[y0 : y0 + side, x0 : x0 + side] = patch * (1 - alpha) + alpha * lesion * tone / 200
        if rng.uniform() < 0.5:  # the background beyond the body's edge
            beyond = np.cos(direction) * (xx - 0.5) + np.sin(direction) * (yy - 0.5) > rng.uniform(0.15, 0.4)
            pixels[beyond] = rng.uniform(20, 230, 3) + rng.normal(0, 4, (int(beyond.sum()), 3))
        camera = rng.uniform(0.9, 1.1, 3)
        images.append(_image(pixels * camera).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5))))
    return images


def _smooth_noise(rng: np.random.Generator, height: int, width: int, grain: int) -> np.ndarray:
    """Gaussian noise varying over about `grain` pixels."""
    coarse = rng.normal(size=(height // grain + 2, width // grain + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


NOT_DERMOSCOPY: dict[str, Callable[[np.random.Generator, np.ndarray], list[Image.Image]]] = {
    "everyday photographs": lambda rng, lesions: sample_photographs(rng),
    "documents and screenshots": lambda rng, lesions: documents(rng),
    "charts and plots": lambda rng, lesions: charts(rng),
    "radiographs": lambda rng, lesions: radiographs(rng),
    "noise and flat colours": lambda rng, lesions: noise_and_flat(rng),
    "clinical photographs of skin": clinical_photographs,
}
BORROWS_LESIONS = frozenset({"clinical photographs of skin"})


def images_of(kind: str, seed: int, lesions: np.ndarray) -> list[Image.Image]:
    """The images of `kind` (of NOT_DERMOSCOPY) from a generator of its own, seeded by `seed` and the kind's place:
    each kind's images are the same whichever kinds are drawn with it."""
    return NOT_DERMOSCOPY[kind](np.random.default_rng([seed, list(NOT_DERMOSCOPY).index(kind)]), lesions)


def not_dermoscopy_pixels(size: int, lesions: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Every kind's `images_of` as `model_pixels` at `size`, each kind kept in `DRAWN_CACHE` once drawn: drawing
    them all takes ~13 s, and every command that fits a gate draws the same ones (the tests fit a dozen)."""
    return {kind: _cached_pixels(kind, seed, size, lesions if kind in BORROWS_LESIONS else None) for kind in NOT_DERMOSCOPY}


# Drawn kinds, one .npy file each, named by a digest of everything they are drawn from: this module's and the
# preprocessing's code, the drawing libraries' versions, the kind, seed, size and the lesions a kind borrows.
DRAWN_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skin-ray" / "not-dermoscopy"
DRAWN_CACHE_FILES = 24  # the newest are kept (2-8 MB each)
MAX_DRAWN_IMAGES = 1000  # a cached file with more (or of another shape) is not ours: drawn again


def _cached_pixels(kind: str, seed: int, size: int, lesions: np.ndarray | None) -> np.ndarray:
    path = DRAWN_CACHE / f"{_drawing_digest(kind, seed, size, lesions)}.npy"
    if (pixels := _read_drawn(path, size)) is not None:
        return pixels
    pixels = model_pixels(images_of(kind, seed, np.empty((0, size, size, 3), np.uint8) if lesions is None else lesions), size)
    with contextlib.suppress(OSError):  # an unwritable cache costs only time
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with partial.open("wb") as file:
            np.save(file, pixels, allow_pickle=False)
        partial.replace(path)  # whole or absent, whoever reads it
        for stale in sorted(path.parent.glob("*.npy"), key=lambda cached: cached.stat().st_mtime)[:-DRAWN_CACHE_FILES]:
            stale.unlink(missing_ok=True)
    return pixels


def _read_drawn(path: Path, size: int) -> np.ndarray | None:
    """The pixels cached at `path`, or None when there are none of the right shape and type."""
    try:
        with path.open("rb") as file:
            if np.lib.format.read_magic(file) != (1, 0):  # what np.save writes for these
                return None
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
            if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1:] != (size, size, 3) \
                    or not 0 < shape[0] <= MAX_DRAWN_IMAGES:
                return None
            file.seek(0)
            return np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


@functools.cache
def _code_digest() -> bytes:
    from importlib.metadata import version

    from skin_ray import preprocess

    digest = hashlib.sha256()
    for module in (__file__, preprocess.__file__):
        digest.update(Path(module).read_bytes())
    for package in ("numpy", "pillow", "matplotlib", "scikit-image"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.digest()


def _drawing_digest(kind: str, seed: int, size: int, lesions: np.ndarray | None) -> str:
    digest = hashlib.sha256(_code_digest() + f"{kind}|{seed}|{size}".encode())
    if lesions is not None:
        digest.update(f"{lesions.dtype.str}{lesions.shape}".encode() + np.ascontiguousarray(lesions).tobytes())
    return digest.hexdigest()


def model_pixels(images: list[Image.Image], size: int) -> np.ndarray:
    """`images` as the model gets them from a client: JPEG bytes through the one preprocessing, (n, size, size, 3)."""
    from skin_ray.preprocess import decode_pixels

    def jpeg(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    return np.stack([decode_pixels(jpeg(image), size) for image in images])


def rephotographed(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dermoscopic model-input pixels (n, s, s, 3) as another clinic might photograph them: shrunk to 30-85% of
    the frame in a field of the image's own edge colour (plain, or with a little noise: a large photo reduced to
    the input size leaves skin smooth), with a soft edge, and another camera's white balance and tone curve."""
    size = pixels.shape[1]
    third = slice(size // 3, 2 * size // 3)
    views = []
    for image in pixels:
        side = int(size * rng.uniform(0.3, 0.85))
        lesion = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR), float)
        edge = np.concatenate([image[:6, third], image[-6:, third], image[third, :6], image[third, -6:]], axis=None)
        skin = edge.reshape(-1, 3).mean(axis=0)
        field = skin + rng.normal(0, rng.choice([0.0, rng.uniform(0, 5)]), (size, size, 3))
        border = max(1, side // 10)
        square = np.zeros((side, side), np.uint8)
        square[border:-border, border:-border] = 255
        mask = np.asarray(Image.fromarray(square).filter(ImageFilter.GaussianBlur(side / 20)), float)[..., None] / 255
        x0, y0 = rng.integers(0, size - side + 1, 2)
        field[y0 : y0 + side, x0 : x0 + side] = field[y0 : y0 + side, x0 : x0 + side] * (1 - mask) + lesion * mask
        gains = rng.uniform(0.8, 1.1) * (1 + rng.uniform(-0.12, 0.12, 3))
        views.append(255 * np.clip(field / 255 * gains, 0, 1) ** rng.uniform(0.7, 1.3))
    return np.clip(np.stack(views), 0, 255).round().astype(np.uint8)


def another_device(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dermoscopic model-input pixels (n, s, s, 3) as another dermatoscope and camera might give them: a narrower
    field (a crop of 45-100% of each side, back to full size: atlases crop tight around the lesion), stronger
    contrast (x1-1.8) and colour (x1-1.6), another white balance and tone curve, and JPEG at quality 50-90."""
    size = pixels.shape[1]
    views = []
    for image in pixels:
        side = int(size * rng.uniform(0.45, 1.0))
        x0, y0 = rng.integers(0, size - side + 1, 2)
        view = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side]).resize((size, size), Image.Resampling.BILINEAR)
        view = ImageEnhance.Color(ImageEnhance.Contrast(view).enhance(rng.uniform(1.0, 1.8))).enhance(rng.uniform(1.0, 1.6))
        gains = rng.uniform(0.85, 1.1) * (1 + rng.uniform(-0.12, 0.12, 3))
        toned = 255 * np.clip(np.asarray(view, float) / 255 * gains, 0, 1) ** rng.uniform(0.7, 1.3)
        encoded = io.BytesIO()
        Image.fromarray(toned.round().astype(np.uint8)).save(encoded, "JPEG", quality=int(rng.integers(50, 91)))
        views.append(np.asarray(Image.open(encoded).convert("RGB")))
    return np.stack(views)
