"""What the tests and the benchmarks share: generated images (a learnable two-class lesion set, kinds of image
no input gate is fitted on), free ports, a service's readiness and steady load, and where the real data lives.

Needs the `test` extra (httpx, pytest); nothing in the package imports it.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from skin_ray import classifier_stats
from skin_ray.gate_images import random_crops, sample_photographs

_SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside a checkout of this repository


class Locations(BaseModel):
    """Where the tests and benchmarks find what does not ship with the package. Each field is overridden by
    the environment variable SKIN_RAY_<FIELD>, e.g. SKIN_RAY_DATA=/data/skin_isic."""

    data: Path = Field(
        _SHARED / "datasets" / "skin_isic",
        description="the labelled ISIC images (Cancer/, Non_Cancer/): real-data tests skip and benchmarks fall "
        "back to generated images without them",
    )
    ham10000: Path = Field(
        _SHARED / "datasets" / "ham10000",
        description="HAM10000 in the same layout, with metadata.csv: with `data`, the trees the shipped bundle was "
        "trained on, which the tests of its recorded figures need",
    )
    not_dermoscopy: Path = Field(
        _SHARED / "datasets" / "not_dermoscopy",
        description="real images that are not dermoscopy, by kind: the shipped input gate was fitted against them",
    )
    kuberay_schemas: Path = Field(
        _SHARED / "schemas" / "kuberay", description="KubeRay's CRD schemas: the manifest validation test skips without them"
    )
    peers: Path = Field(_SHARED / "peers", description="the peer-server harness that `serve_bench.py --peers` runs")

    @classmethod
    def from_environment(cls) -> Locations:
        return cls(**{name: os.environ[var] for name in cls.model_fields if (var := f"SKIN_RAY_{name.upper()}") in os.environ})


LOCATIONS = Locations.from_environment()
REAL_DATA = LOCATIONS.data
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real data set not found at {REAL_DATA} (SKIN_RAY_DATA sets where)"
)


needs_training_data = pytest.mark.skipif(
    not (REAL_DATA.is_dir() and LOCATIONS.ham10000.is_dir()),
    reason=f"the shipped bundle's data trees not found at {REAL_DATA} and {LOCATIONS.ham10000} (SKIN_RAY_DATA and "
    "SKIN_RAY_HAM10000 set where)",
)


def shipped_trees(metadata) -> list[str]:
    """Where the tests find the data trees a bundle trained on ../shared/datasets recorded, in its order."""
    here = {"skin_isic": REAL_DATA, "ham10000": LOCATIONS.ham10000}
    return [str(here[PurePosixPath(tree).name]) for tree in metadata.data["sources"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_ray_environment() -> dict:
    """The environment of a command started in a fresh terminal: no cluster named, so it starts its own Ray."""
    return {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}


def skin_ray_cli(*args: str, ray_address: str | None = None, **environment: str) -> subprocess.CompletedProcess:
    """`skin-ray ARGS` as a user runs it, on the cluster at `ray_address` when given."""
    env = {**os.environ, **({"RAY_ADDRESS": ray_address} if ray_address else {}), **environment}
    return subprocess.run(["skin-ray", *args], capture_output=True, text=True, env=env, timeout=300)


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout_s: float = 240) -> None:
    """Return once `url`/healthz answers 200; fail early if `process` (the server) exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}): {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not become healthy")


async def steady_load(url: str, data: bytes, clients: int, until, answers: list) -> list:
    """`clients` clients posting `data` to /predict back to back until `until()` is true; appends (sent at,
    status or the transport error's name, response) per request to `answers` as they come, and returns it."""
    import httpx

    async def one_client(http):
        while not until():
            sent = time.monotonic()
            try:
                response = await http.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
                answers.append((sent, response.status_code, response))
            except httpx.TransportError as exc:
                answers.append((sent, type(exc).__name__, None))
                await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(one_client(http) for _ in range(clients)))
    return answers


def lesion_image(label: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A skin-coloured square with a lesion: Cancer lesions are striped, Non_Cancer ones smooth.

    Colours, positions and radii vary, so only the texture tells the classes apart.
    """
    yy, xx = np.mgrid[0:size, 0:size]
    skin = np.array([200, 160, 140]) + rng.normal(0, 12, 3)
    image = np.ones((size, size, 3)) * skin + rng.normal(0, 6, (size, size, 3))
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.18, 0.32) * size
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    lesion = np.array([110, 70, 50]) + rng.normal(0, 15, 3)
    if label == "Cancer":
        period = rng.uniform(4, 7)
        stripes = (np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) * 2 * np.pi / period) > 0)[..., None]
        image[inside] = np.where(stripes, lesion * 0.45, lesion * 1.25)[inside]
    else:
        image[inside] = lesion
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def guarded_bundle_lesions(seed: int = 3, count: int = 280) -> tuple[np.ndarray, list[Image.Image]]:
    """The generated lesions the tests' guarded bundle is fitted on (class indices, 0 Cancer, and images); another
    seed gives new images of the same kind."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    return labels, [lesion_image(("Cancer", "Non_Cancer")[label], rng) for label in labels]


def generated_validation(size: int, count: int, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Generated lesions of the kind the tests' guarded bundle is fitted on (another seed: not the same ones) as
    `size`-pixel model input, and which are Cancer: the tests' stand-in for a bundle's validation split."""
    from skin_ray.preprocess import decode_pixels, to_model_input

    labels, images = guarded_bundle_lesions(seed, count)
    return to_model_input(np.stack([decode_pixels(encode(image), size) for image in images])), labels == 0


def write_lesion_tree(root: Path, per_class: int, seed: int = 0, split_folders: bool = False) -> Path:
    """ROOT/<class>/[Training|Testing/]*.jpg with `per_class` images of each class."""
    rng = np.random.default_rng(seed)
    for label in ("Cancer", "Non_Cancer"):
        for i in range(per_class):
            folder = root / label / (("Training" if i % 4 else "Testing") if split_folders else "")
            folder.mkdir(parents=True, exist_ok=True)
            lesion_image(label, rng).save(folder / f"{label.lower()}_{i:04d}.jpg", quality=92)
    return root


def round_lesion_photo(centre: tuple[int, int] = (200, 150), size: tuple[int, int] = (400, 300)) -> bytes:
    """Skin with one dark, round lesion centred at `centre` (x, y), as a JPEG: close enough to dermoscopy
    for the shipped model's input gate to accept it (the striped `lesion_image`s are borderline)."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    width, height = size
    pixels = np.ones((height, width, 3)) * np.array([205.0, 160.0, 140.0]) + rng.normal(0, 5, (height, width, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    inside = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 < 45**2
    pixels[inside] = np.array([90.0, 55.0, 40.0]) + rng.normal(0, 10, (inside.sum(), 3))
    return encode(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)))


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def never_fitted_kinds(rng: np.random.Generator) -> dict[str, list[Image.Image]]:
    """Kinds of image that are not dermoscopy and that no gate is fitted on (skin_ray.gate_images has the ones it
    is): scikit-image's microscopy and retina samples, and its small grey faces enlarged, with random crops."""
    import skimage.data

    samples = [skimage.data.immunohistochemistry(), skimage.data.cell(), skimage.data.retina(), skimage.data.microaneurysms()]
    photos = [Image.fromarray(pixels).convert("RGB") for pixels in samples]
    microscopy = photos + [crop for photo in photos for crop in random_crops(photo, rng, 6)]
    faces = [Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((200, 200), Image.Resampling.BICUBIC)
             for face in skimage.data.lfw_subset()[rng.choice(200, 30, replace=False)]]
    return {"microscopy and retina": microscopy, "faces": faces}


def drift_streams(files: list[bytes], rng: np.random.Generator) -> dict[str, list[bytes]]:
    """Image streams for drift checks: `files` as they are (`unchanged`), re-encoded with a warm colour cast (a
    camera's white balance), blurred (out of focus), and with every third replaced by an everyday photograph."""
    from PIL import ImageFilter

    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in files]
    photos = sample_photographs(rng)
    cast = np.array([1.2, 1.0, 0.8])
    return {
        "unchanged": list(files),
        "colour_cast": [encode(Image.fromarray(np.clip(np.asarray(image) * cast, 0, 255).astype(np.uint8))) for image in images],
        "blurred": [encode(image.filter(ImageFilter.GaussianBlur(max(image.size) / 150))) for image in images],
        "everyday_photos_mixed_in": [encode(photos[i % len(photos)]) if i % 3 == 0 else data for i, data in enumerate(files)],
    }


def threshold_miss_rates(y_true: np.ndarray, p_cancer: np.ndarray, target: float, trials: int, seed: int = 0) -> dict[str, float]:
    """How often each rule's threshold, chosen on a random half of the cases, gives a sensitivity below
    `target` on the other half."""
    rng = np.random.default_rng(seed)
    misses = {"exact_fit": 0, "lower_bound": 0}
    for _ in range(trials):
        half = rng.permutation(len(y_true)) < len(y_true) // 2
        chosen = {
            "exact_fit": classifier_stats.threshold_for_sensitivity(y_true[half], p_cancer[half], target),
            "lower_bound": classifier_stats.threshold_keeping_sensitivity(y_true[half], p_cancer[half], target, 0.95)[0],
        }
        other = p_cancer[~half & y_true]
        for rule, threshold in chosen.items():
            misses[rule] += (other >= threshold).mean() < target
    return {rule: count / trials for rule, count in misses.items()}
