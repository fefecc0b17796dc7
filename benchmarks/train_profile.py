"""Where a training epoch's time goes: each part timed alone in this process, then the real thing.

    python benchmarks/train_profile.py [--images 0] [--epochs 3] [--workers 2]

On the training split of the ISIC images (all of them by default; generated ones without the folder), with
TensorFlow on this machine's cores as a worker has them, one after the other:

- decode: read and preprocess every training image once (what an epoch costs when images are not cached);
- augment: the training augmentation over every batch;
- step: forward, backward and AdamW update over every batch, on pre-augmented images; again compiled
  with XLA (`jit_compile`), and again in mixed precision (`--precision mixed_bfloat16`);
- teacher forward: the shipped ensemble's forward pass over every batch (what distillation adds to a step);
- validate: decode and score the validation split (rank 0 does it after every epoch);

then `skin-ray train`'s own path (Ray Train, its workers, Ray Data) for `--epochs` epochs three times:
decoding the images every epoch (`--decode-every-epoch`, as training did before), once per run (the
default), and once per run in mixed precision, reporting each run's mean epoch and validation times without
the first epoch (tracing, start-up), the first run's over each of the others, and Ray Train's epoch over the
same augmentation and steps in one process (what distribution costs).
Prints one JSON line.
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

from skin_ray.testing import Locations  # noqa: E402

REAL_DATA = Locations.from_environment().data


def data_tree(scratch: Path, images: int) -> Path:
    """The real data (links to `images` of them when given), or a generated tree."""
    if REAL_DATA.is_dir() and not images:
        return REAL_DATA
    root = scratch / "data"
    if REAL_DATA.is_dir():
        for name in ("Cancer", "Non_Cancer"):
            (root / name).mkdir(parents=True)
            for source in sorted((REAL_DATA / name).glob("*.jpg"))[: images // 2]:
                (root / name / source.name).symlink_to(source)
        return root
    from skin_ray.testing import write_lesion_tree

    return write_lesion_tree(root, max(images, 320) // 2)


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def parts(data: Path, batch_size: int, repeats: int = 2) -> dict:
    """Seconds per epoch of each part, alone; the best of `repeats` passes after one warm-up batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from skin_ray.bundle import load_bundle
    from skin_ray.data import discover, load_images, split_by_content
    from skin_ray.model import make_augmenter, make_model
    from skin_ray.preprocess import IMAGE_SIZE, InputSpec

    spec = InputSpec(IMAGE_SIZE)  # the default network's
    split = split_by_content(discover(str(data)), spec)

    def decode(images) -> dict:
        return load_images({"path": np.array(images.paths, dtype=object)}, spec)

    decode_s, train = timed(lambda: decode(split.train))
    pixels, labels = train["image"], np.asarray(split.train.labels)
    starts = range(0, len(labels) - batch_size + 1, batch_size)
    batches = [(pixels[i : i + batch_size], labels[i : i + batch_size]) for i in starts]
    model, augmenter = make_model("default", spec.size), make_augmenter(seed=0)

    @tf.function
    def augment(images):
        return augmenter(images, training=True)

    def step_function(jit_compile: bool = False, precision: str = "float32"):
        """A fresh network's train step, its layers built in `precision` as skin_ray.train builds them."""
        keras.config.set_dtype_policy(precision)
        model = make_model("default", spec.size)
        keras.config.set_dtype_policy("float32")
        optimizer = keras.optimizers.AdamW(1e-3)

        @tf.function(jit_compile=jit_compile)
        def step(images, labels):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, model(images, training=True)))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return loss

        return step

    step, step_xla, step_bf16 = step_function(), step_function(jit_compile=True), step_function(precision="mixed_bfloat16")

    @tf.function
    def forward(images):
        return model(images, training=False)

    teacher = load_bundle().model  # the shipped ensemble, the teacher `skin-ray distill` learns from

    @tf.function
    def teach(images):
        return teacher(images, training=False)

    augmented = [(augment(x), y) for x, y in batches]  # also the warm-up (tracing) of `augment`
    step(*augmented[0])
    step_xla(*augmented[0])
    step_bf16(*augmented[0])
    forward(batches[0][0])
    teach(batches[0][0])

    def best(function) -> float:
        return min(timed(function)[0] for _ in range(repeats))

    augment_s = best(lambda: [augment(x).numpy() for x, _ in batches])
    step_s = best(lambda: [float(step(x, y)) for x, y in augmented])
    step_xla_s = best(lambda: [float(step_xla(x, y)) for x, y in augmented])
    step_bf16_s = best(lambda: [float(step_bf16(x, y)) for x, y in augmented])
    teacher_s = best(lambda: [teach(x).numpy() for x, _ in augmented])
    validate_s = best(lambda: forward(decode(split.validation)["image"]).numpy())
    return {
        "train_images": len(split.train),
        "validation_images": len(split.validation),
        "decode_s": round(decode_s, 2),
        "augment_s": round(augment_s, 2),
        "step_s": round(step_s, 2),
        "step_xla_s": round(step_xla_s, 2),
        "step_mixed_bfloat16_s": round(step_bf16_s, 2),
        "teacher_forward_s": round(teacher_s, 2),
        "validate_s": round(validate_s, 2),
    }


# `skin-ray train` as it was (decoding every epoch), as it is, and with the faster precision.
RAY_TRAIN_ARMS = {
    "decode_every_epoch": {"decode_every_epoch": True},
    "decode_once": {},
    "decode_once_mixed_bfloat16": {"precision": "mixed_bfloat16"},
}


def ray_train(data: Path, epochs: int, batch_size: int, workers: int, scratch: Path, name: str) -> dict:
    """Mean seconds of an epoch's training and of its validation, without the first epoch."""
    from skin_ray.config import TrainSettings
    from skin_ray.train import train

    settings = TrainSettings(
        data=str(data), output=str(scratch / name), storage_path=str(scratch / "runs"), run_name=name, workers=workers,
        epochs=epochs, batch_size=batch_size, **RAY_TRAIN_ARMS[name],
    )
    history = train(settings).history[1:]
    return {
        "epoch_s": round(sum(row["epoch_seconds"] for row in history) / len(history), 2),
        "validate_s": round(sum(row["validate_seconds"] for row in history) / len(history), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="use this many images (half per class); 0: all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from skin_ray.runtime import init_ray, limit_tensorflow_threads

    limit_tensorflow_threads()
    init_ray()
    scratch = Path(tempfile.mkdtemp(prefix="train_profile_"))
    try:
        data = data_tree(scratch, args.images)
        report = {"benchmark": "train_profile", "data": "skin_isic" if REAL_DATA.is_dir() else "generated",
                  "cpus": os.cpu_count(), **parts(data, args.batch_size)}
        runs = {name: ray_train(data, args.epochs, args.batch_size, args.workers, scratch, name) for name in RAY_TRAIN_ARMS}
        report[f"ray_train_{args.workers}_workers"] = runs
        seconds = {name: sum(run.values()) for name, run in runs.items()}  # an epoch and its validation
        report["ratio_epoch_plus_validation_every_over_once"] = round(seconds["decode_every_epoch"] / seconds["decode_once"], 3)
        report["ratio_epoch_plus_validation_every_over_once_mixed_bfloat16"] = round(
            seconds["decode_every_epoch"] / seconds["decode_once_mixed_bfloat16"], 3
        )
        # What distribution costs: Ray Train's epoch against the same work in this one process.
        report["ratio_ray_train_over_one_process"] = round(
            runs["decode_once"]["epoch_s"] / (report["augment_s"] + report["step_s"]), 3
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
