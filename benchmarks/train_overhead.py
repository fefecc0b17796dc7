"""Epoch time of 2-worker Ray Train against plain single-process Keras `fit`, same data and model.

    python benchmarks/train_overhead.py [--images 640] [--epochs 3]

Both runs train the `default` architecture with the same augmentation and global batch size on the same
training split of the same images (real ISIC images when ../shared/datasets/skin_isic exists, generated ones
otherwise), one after the
other in this script. The first epoch of each (tracing, worker start-up) is excluded. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from skin_ray.config import Locations  # noqa: E402

REAL_DATA = Locations.from_environment().data


def make_subset(root: Path, per_class: int) -> Path:
    """A tree with `per_class` images of each class: links into the real data, or generated images."""
    if REAL_DATA.is_dir():
        for name in ("Cancer", "Non_Cancer"):
            (root / name).mkdir(parents=True)
            for source in sorted((REAL_DATA / name).glob("*.jpg"))[:per_class]:
                (root / name / source.name).symlink_to(source)
        return root
    from skin_ray.testing import write_lesion_tree

    return write_lesion_tree(root, per_class)


def keras_fit_epoch_seconds(data: Path, epochs: int, batch_size: int) -> float:
    import keras
    import numpy as np

    from skin_ray.data import discover, split_by_content
    from skin_ray.model import make_augmenter, make_model
    from skin_ray.preprocess import preprocess_image

    images = split_by_content(discover(str(data))).train  # the images Ray Train trains on
    x = np.stack([preprocess_image(Path(p).read_bytes()) for p in images.paths])
    y = np.asarray(images.labels)
    model = keras.Sequential([keras.Input(x.shape[1:]), make_augmenter(seed=0), make_model("default")])
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[Timer()])
    return sum(times[1:]) / len(times[1:])


def ray_train_epoch_seconds(data: Path, epochs: int, batch_size: int, workers: int, scratch: Path) -> float:
    from skin_ray.config import TrainSettings
    from skin_ray.train import train

    config = TrainSettings(
        data=str(data), output=str(scratch / "bundle"), storage_path=str(scratch / "runs"), workers=workers,
        epochs=epochs, batch_size=batch_size,
    )
    history = train(config).history
    return sum(row["epoch_seconds"] for row in history[1:]) / len(history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640, help="images in all, half per class")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from skin_ray.runtime import init_ray, limit_tensorflow_threads

    limit_tensorflow_threads()
    init_ray()
    scratch = Path(tempfile.mkdtemp(prefix="train_overhead_"))
    try:
        data = make_subset(scratch / "data", args.images // 2)
        fit = keras_fit_epoch_seconds(data, args.epochs, args.batch_size)
        ray_train = ray_train_epoch_seconds(data, args.epochs, args.batch_size, args.workers, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({
        "benchmark": "train_overhead",
        "images": args.images,
        "data": "skin_isic" if REAL_DATA.is_dir() else "generated",
        "cpus": os.cpu_count(),
        "keras_fit_epoch_s": round(fit, 2),
        f"ray_train_{args.workers}_workers_epoch_s": round(ray_train, 2),
        "ratio_ray_train_over_keras_fit": round(ray_train / fit, 3),
    }))


if __name__ == "__main__":
    main()
