"""Batch classification: the Ray Data job against a single-process loop, and its memory as inputs grow.

    python benchmarks/classify_bench.py [--bundle BUNDLE] [--small 2000] [--large 20000]

On the same images and model, in this one script:
- ceiling: one process, decode + batched predict (the best this machine can do without Ray), with the bundle's
  Keras network (float32, the reference) and with the runtime it carries (skin_ray.onnx_analysis);
- job: `skin-ray classify`'s pipeline on a local Ray with the bundle's runtime, images/s and the ratios to both
  ceilings;
- memory: peak proportional set size (PSS, so shared object-store pages count once) summed over the driver
  and every Ray process, sampled every 0.5 s, for the job at --small and at --large images. Inputs are the
  ISIC images repeated under new names (symlinks) to reach the count, or generated images without them.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from skin_ray.testing import Locations

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Locations.from_environment().data


def source_images(scratch: Path) -> list[Path]:
    if REAL_DATA.is_dir():
        return sorted(REAL_DATA.glob("*/*.jpg"))
    from skin_ray.testing import lesion_image

    rng = np.random.default_rng(0)
    (scratch / "generated").mkdir()
    paths = []
    for i in range(500):
        path = scratch / "generated" / f"{i}.jpg"
        lesion_image(("Cancer", "Non_Cancer")[i % 2], rng, size=224).save(path)
        paths.append(path)
    return paths


def make_tree(root: Path, sources: list[Path], count: int) -> Path:
    """`count` image files under new names, 1000 per folder, each a link to one of `sources`."""
    for i in range(count):
        folder = root / f"part_{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").symlink_to(sources[i % len(sources)])
    return root


def ceiling_images_per_second(model: str | None, paths: list[Path], runtime: str, batch_size: int = 32) -> float:
    from skin_ray.predictor import Predictor

    predictor = Predictor.from_bundle(model, runtime)
    predictor.predict_pixels(predictor.decode_pixels(paths[0].read_bytes())[None])
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        batch = [predictor.decode_pixels(p.read_bytes()) for p in paths[start : start + batch_size]]
        predictor.predict_pixels(np.stack(batch))
    return len(paths) / (time.perf_counter() - started)


class PeakMemory:
    """Samples the summed PSS of this process and all Ray processes on the machine."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = 0
        for process in psutil.process_iter(["cmdline", "pid"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["pid"] == os.getpid() or "ray" in cmdline:
                try:
                    total += process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_job(source: Path, output: Path, model: str | None, workers: int) -> tuple[dict, int]:
    from skin_ray.classify import classify
    from skin_ray.config import ClassifySettings

    with PeakMemory() as memory:
        summary = classify(ClassifySettings(source=str(source), output=str(output), bundle=model, workers=workers))
    assert summary["rows"] == summary["files"], summary
    return summary, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle (default: the shipped model)")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2, help="classifier actors")
    args = parser.parse_args()
    from skin_ray.runtime import init_ray, limit_tensorflow_threads

    limit_tensorflow_threads()
    scratch = Path(tempfile.mkdtemp(prefix="classify_bench_"))
    try:
        sources = source_images(scratch)
        small = make_tree(scratch / "small", sources, args.small)
        large = make_tree(scratch / "large", sources, args.large)
        ceiling = {runtime: ceiling_images_per_second(args.bundle, sorted(small.rglob("*.jpg")), runtime)
                   for runtime in ("float32", "auto")}
        init_ray()
        small_summary, small_peak = run_job(small, scratch / "out_small", args.bundle, args.workers)
        large_summary, large_peak = run_job(large, scratch / "out_large", args.bundle, args.workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mib = 2**20
    print(json.dumps({
        "benchmark": "classify",
        "data": "skin_isic" if REAL_DATA.is_dir() else "generated",
        "cpus": os.cpu_count(),
        "ceiling_images_per_s": {"float32": round(ceiling["float32"], 1), "runtime": round(ceiling["auto"], 1)},
        f"job_images_per_s@{args.small}": small_summary["images_per_s"],
        f"job_images_per_s@{args.large}": large_summary["images_per_s"],
        f"ratio_job_over_float32_ceiling@{args.large}": round(large_summary["images_per_s"] / ceiling["float32"], 3),
        f"ratio_job_over_runtime_ceiling@{args.large}": round(large_summary["images_per_s"] / ceiling["auto"], 3),
        f"peak_pss_mib@{args.small}": round(small_peak / mib),
        f"peak_pss_mib@{args.large}": round(large_peak / mib),
        "ratio_peak_memory_large_over_small": round(large_peak / small_peak, 3),
    }))


if __name__ == "__main__":
    main()
