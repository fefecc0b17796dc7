"""Distributed training with Ray Train's TensorflowTrainer and MultiWorkerMirroredStrategy.

Each worker reads its own shard of the training set through Ray Data (`get_dataset_shard`), runs a custom
training loop, and rank 0 validates, checkpoints and reports per epoch. The best checkpoint by validation
ROC AUC becomes the model bundle, after calibration and the choice of a decision threshold on the same
validation split.

Why a custom loop instead of `model.fit`: on this stack (TensorFlow 2.21, Keras 3.15) `fit` under
MultiWorkerMirroredStrategy with 2+ workers fails inside Keras (keras-team/keras#20585, then
tensorflow/tensorflow#72388). `strategy.run` + `GradientTape` + `tf.nn.compute_average_loss` are public,
stable APIs that work unpatched; patching Keras internals would break with the next Keras release, and
legacy tf-keras needs the full TensorFlow wheel and writes files Keras 3 cannot load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from skin_ray import metrics, safeguards, storage
from skin_ray.bundle import BundleMetadata, load_bundle, save_bundle, write_safeguards
from skin_ray.config import TrainConfig
from skin_ray.data import CLASS_NAMES, POSITIVE_CLASS, discover, image_dataset, split_by_content
from skin_ray.predictor import analysis_function, member_cancer_probabilities
from skin_ray.preprocess import IMAGE_SIZE
from skin_ray.runtime import format_duration, limit_tensorflow_threads, wait_for_resources
from skin_ray.safeguards import InputGate

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"


@dataclass
class TrainOutcome:
    bundle_uri: str
    metrics: dict
    history: list[dict]


def train(config: TrainConfig) -> TrainOutcome:
    """Train on `config.data`, write the bundle to `config.output`, return its validation metrics."""
    images = discover(config.data, subset=config.subset)
    split = split_by_content(images, config.validation_fraction)
    if len(split.validation) == 0 or len(set(split.validation.labels)) < 2:
        raise ValueError("the validation split needs images of both classes; add images or raise --validation-fraction")
    logger.info(
        "training on %d images %s, validating on %d %s, skipped %d undecodable",
        len(split.train), split.train.class_counts(), len(split.validation), split.validation.class_counts(),
        len(split.skipped),
    )
    counts = np.bincount(split.train.labels, minlength=len(images.class_names))
    rows_per_worker = len(split.train) // config.workers
    steps_per_epoch = rows_per_worker // (config.batch_size // config.workers)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(split.train)} training images are fewer than one batch per worker")
    loop_config = {
        **asdict(config),
        "class_weights": (len(split.train) / (len(counts) * np.maximum(counts, 1))).tolist(),
        "steps_per_epoch": steps_per_epoch,
    }
    _wait_for_resources(config)
    epoch_lines = EpochLines(config.epochs)
    storage_fs, storage_path = storage.pyarrow_filesystem(os.path.expanduser(config.storage_path))
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
        ),
        datasets={
            "train": image_dataset(split.train, shuffle=True),
            "validation": image_dataset(split.validation),
        },
        # Every worker gets an equal share of "train" (equal row counts keep the collectives in step);
        # "validation" is read whole by rank 0.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=config.run_name or f"skin-ray-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_auc", checkpoint_score_order="max"
            ),
            callbacks=[epoch_lines.callback],
        ),
    )
    with epoch_lines:
        result = trainer.fit()
    _remove_unrecorded_checkpoints(result)
    with result.checkpoint.as_directory() as latest:
        history = json.loads(Path(latest, STATE_FILE).read_text())["history"]
    best = result.get_best_checkpoint(metric="val_auc", mode="max")
    with best.as_directory() as checkpoint_dir:
        model = _model_from_checkpoint(config.arch, checkpoint_dir)
    metadata, gate = finalize_bundle(model, config, split, history)
    save_bundle(model, metadata, config.output, split.train_digests, gate)
    return TrainOutcome(config.output, metadata.metrics, history)


def _remove_unrecorded_checkpoints(result: ray.train.Result) -> None:
    """Delete the run's checkpoint directories that Ray Train never recorded.

    Ray Train records a reported checkpoint when its controller next polls the workers (every 2 s,
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker killed in between leaves the epoch's checkpoint written
    but unrecorded: the restarted workers resume from the one before and rerun that epoch (waiting for the
    record before the next epoch would not close the window; the record still waits for the poll), and
    nothing would ever delete the orphan.
    """
    recorded = {checkpoint.path for checkpoint, _ in result.best_checkpoints} | {result.checkpoint.path}
    for entry in result.filesystem.get_file_info(pyarrow.fs.FileSelector(result.path)):
        if (
            entry.type == pyarrow.fs.FileType.Directory
            and entry.base_name.startswith("checkpoint_")
            and entry.path not in recorded
        ):
            logger.info("removing %s: a killed worker wrote it before Ray Train recorded it", entry.path)
            result.filesystem.delete_dir(entry.path)


class EpochLines:
    """One line per epoch with the time left, printed by the driver: rank 0's report travels from Ray Train's
    controller (where callbacks run) through a queue to a thread here, rather than being forwarded, prefixed
    and coloured, from a worker's output."""

    def __init__(self, epochs: int):
        from ray.util.queue import Queue

        self.epochs = epochs
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _ReportToQueue(self.queue)
        self._printer = threading.Thread(target=self._print, daemon=True)

    def __enter__(self):
        self._printer.start()
        return self

    def __exit__(self, *exc_info):
        self.queue.put(None)
        self._printer.join(timeout=10)
        self.queue.shutdown()

    def _print(self) -> None:
        while (row := self.queue.get()) is not None:
            left = (self.epochs - row["epoch"]) * row["epoch_seconds"]
            print(
                f"epoch {row['epoch']}/{self.epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}  "
                f"val_accuracy {row['val_accuracy']:.3f}  val_auc {row['val_auc']:.4f}  best {row['best_val_auc']:.4f}  "
                f"{row['epoch_seconds']:.0f}s" + (f"  about {format_duration(left)} left" if left else ""),
                flush=True,
            )


class _ReportToQueue(ray.train.UserCallback):
    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if "val_auc" in metrics[0]:  # rank 0 validates; the others report training figures only
            self.queue.put(metrics[0])


def finalize_bundle(model, config: TrainConfig, split, history: list[dict]) -> tuple[BundleMetadata, InputGate]:
    """Calibrate the best checkpoint's model in place, choose its threshold, fit its safeguards, describe
    the bundle."""
    threshold, bundle_metrics = calibrate(model, split, config.target_sensitivity)
    bundle_metrics["validation"]["best_epoch"] = max(history, key=lambda row: row["val_auc"])["epoch"]
    gate, input_gate, uncertainty = fit_safeguards(model, split, threshold)
    metadata = describe_bundle(
        model, config.arch, split, threshold, config.target_sensitivity, bundle_metrics,
        training={**asdict(config), "epochs_run": len(history)}, source=config.data,
    )
    metadata.input_gate, metadata.uncertainty = input_gate, uncertainty
    return metadata, gate


def fit_safeguards(model, split, threshold: float) -> tuple[InputGate, dict, dict]:
    """The input gate and the uncertainty margin of a calibrated model, with their bundle.json descriptions.

    The gate's reference is the training split as the model saw it in training: every image, and every image
    zoomed out onto skin as the augmentation does (without them, 14% of the validation images re-photographed
    with a wider field were refused; with them 2.7%, at the price of letting more noise and flat images
    through: benchmarks/ood.py). Its threshold and the margin come from the validation split.
    """
    from skin_ray.model import RandomZoomOutOntoSkin

    analyse = analysis_function(model, (IMAGE_SIZE, IMAGE_SIZE, 3))
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    zoom_out = RandomZoomOutOntoSkin(probability=1.0, seed=0)

    def features_of(images, zoomed_too: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels, probabilities, features = [], [], []
        dataset = image_dataset(images)
        dataset.set_name("fit-safeguards")  # what its progress line is called
        for batch in dataset.iter_batches(batch_size=64):
            views = [batch["image"]]
            if zoomed_too:
                views.append(np.asarray(zoom_out(batch["image"], training=True)))
            for pixels in views:
                p, f = (np.asarray(t) for t in analyse(pixels))
                labels.append(batch["label"])
                probabilities.append(p[:, positive])
                features.append(f)
        return np.concatenate(labels), np.concatenate(probabilities), np.concatenate(features)

    train_labels, _, train_features = features_of(split.train, zoomed_too=True)
    labels, p_cancer, features = features_of(split.validation)
    gate = safeguards.fit_input_gate(train_features, train_labels, features)
    disagree = safeguards.members_disagree(member_cancer_probabilities(model, features, positive), threshold, len(labels))
    y_true = (labels == positive).astype(np.int64)
    margin = safeguards.uncertainty_margin(y_true, p_cancer, threshold, disagree)
    return gate, *safeguards.describe(gate, margin, y_true, p_cancer, threshold, disagree)


def add_safeguards(bundle_uri: str, data: str | None = None) -> BundleMetadata:
    """Fit the safeguards of an existing bundle on its own split (re-derived from `data`, by default the
    data it was trained on) and write them into it; the model file is left untouched."""
    bundle = load_bundle(bundle_uri)
    metadata = bundle.metadata
    source = data or metadata.data["source"]
    images = discover(source, class_names=tuple(metadata.class_names), subset=metadata.training.get("subset"))
    split = split_by_content(images, metadata.training["validation_fraction"])
    if split.fingerprint != metadata.data["fingerprint"]:
        raise ValueError(f"{source} is not the data {bundle_uri} was trained on (its fingerprint differs)")
    gate, metadata.input_gate, metadata.uncertainty = fit_safeguards(bundle.model, split, metadata.threshold)
    write_safeguards(metadata, gate, bundle_uri)
    return metadata


def calibrate(model, split, target_sensitivity: float) -> tuple[float, dict]:
    """Calibrate `model` in place on the validation split; return the threshold and the bundle's metrics.

    Platt scaling is folded into the last Dense layer, so every consumer gets calibrated probabilities from
    the plain model. Because calibration and threshold are fitted on the split they are reported on, the
    metrics also carry a 2-fold cross-fitted ECE, an honest estimate for unseen images of the same kind.
    """
    import tensorflow as tf

    forward = tf.function(lambda images: model(images, training=False))
    validation = image_dataset(split.validation).materialize()
    y_true, p_raw = score_dataset(forward, validation)
    gap = metrics.log_odds(p_raw)
    scale, offset = metrics.fit_platt(y_true, gap)
    _fold_platt_into_classifier(model, scale, offset)
    _, p_cancer = score_dataset(forward, validation)
    threshold = metrics.threshold_for_sensitivity(y_true, p_cancer, target_sensitivity)
    summary = metrics.summary(y_true, p_cancer, threshold)
    summary.update(
        ece_uncalibrated=metrics.expected_calibration_error(y_true, p_raw),
        ece_crossfit=_crossfit_ece(y_true, gap),
    )
    return threshold, {"validation": summary, "calibration": {"platt_scale": scale, "platt_offset": offset}}


def describe_bundle(
    model, arch: str, split, threshold: float, target_sensitivity: float, bundle_metrics: dict, training: dict, source: str
) -> BundleMetadata:
    """The bundle.json of a calibrated model; its version names the architecture, the day and the weights."""
    weights_digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    return BundleMetadata(
        model_version=f"{arch}-{time.strftime('%Y%m%d')}-{weights_digest[:10]}",
        arch=arch,
        class_names=list(split.train.class_names),
        positive_class=POSITIVE_CLASS,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        metrics=bundle_metrics,
        training=training,
        data={
            "source": source,
            "fingerprint": split.fingerprint,
            "train": split.train.class_counts(),
            "validation": split.validation.class_counts(),
            "skipped": len(split.skipped),
        },
    )


def _fold_platt_into_classifier(model, scale: float, offset: float) -> None:
    """softmax(a*l + c*e_pos) has logit gap a*(l_pos - l_neg) + c: scale kernel and bias, shift one bias."""
    classifier = model.layers[-1]
    kernel, bias = classifier.get_weights()
    bias = scale * bias
    bias[CLASS_NAMES.index(POSITIVE_CLASS)] += offset
    classifier.set_weights([scale * kernel, bias])


def _crossfit_ece(y_true: np.ndarray, gap: np.ndarray) -> float:
    folds = np.arange(len(y_true)) % 2
    out_of_fold = np.empty(len(y_true))
    for fold in (0, 1):
        scale, offset = metrics.fit_platt(y_true[folds != fold], gap[folds != fold])
        out_of_fold[folds == fold] = metrics.sigmoid(scale * gap[folds == fold] + offset)
    return metrics.expected_calibration_error(y_true, out_of_fold)


def _wait_for_resources(config: TrainConfig) -> None:
    """The workers' CPUs plus one for Ray Data must be free, or training fails with a clear message.

    Without this, Ray Train waits forever when another actor (a Serve replica, say) holds the CPUs.
    """
    wait_for_resources(
        [{"CPU": config.cpus_per_worker}] * config.workers + [{"CPU": 1}],
        strategy="SPREAD" if config.placement_strategy.endswith("SPREAD") else "PACK",
        timeout_s=config.resources_timeout_s,
        purpose=f"training needs {config.workers} workers x {config.cpus_per_worker} CPU plus 1 CPU for data loading",
        remedy="Stop what holds them (a Serve app?), lower --workers, or add nodes.",
    )


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. MultiWorkerMirroredStrategy keeps the replicas' weights identical."""
    context = ray.train.get_context()
    limit_tensorflow_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    import keras
    import tensorflow as tf

    from skin_ray.model import make_augmenter, make_model

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = context.get_world_rank()
    keras.utils.set_random_seed(config["seed"])
    global_batch, epochs, steps = config["batch_size"], config["epochs"], config["steps_per_epoch"]
    with strategy.scope():
        model = make_model(config["arch"])
        schedule = keras.optimizers.schedules.CosineDecay(
            config["learning_rate"] / 20, decay_steps=epochs * steps, alpha=0.01,
            warmup_target=config["learning_rate"], warmup_steps=min(2 * steps, epochs * steps // 4),
        )
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config["weight_decay"])
        optimizer.build(model.trainable_variables)
    # Outside the scope: each worker augments its own shard with its own random stream.
    augmenter = make_augmenter(seed=config["seed"] * 1000 + rank)
    class_weights = tf.constant(config["class_weights"], tf.float32)

    @tf.function
    def train_step(images, labels):
        def replica_step(images, labels):
            images = augmenter(images, training=True)
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
                per_example *= tf.gather(class_weights, labels)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.argmax(probabilities, axis=1) == tf.cast(labels, tf.int64), tf.float32))
            return loss, correct

        loss, correct = strategy.run(replica_step, args=(images, labels))
        total = lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)  # noqa: E731
        return total(loss), total(correct)

    @tf.function
    def replica_weight_divergence():
        """Largest relative difference between the workers' weight checksums (0.0 when in sync)."""

        def checksum():
            values = [tf.reshape(tf.cast(w, tf.float64), [-1]) for w in model.weights]
            flat = tf.concat(values, axis=0)
            positions = tf.range(1, tf.size(flat) + 1, dtype=tf.float64)
            return tf.stack([tf.reduce_sum(flat), tf.reduce_sum(flat * flat), tf.reduce_sum(flat * positions)])[None]

        gathered = strategy.gather(strategy.run(checksum), axis=0)
        return tf.reduce_max(tf.abs(gathered - gathered[:1]) / (tf.abs(gathered[:1]) + 1e-12))

    @tf.function
    def forward(images):
        return model(images, training=False)

    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            history = _restore(model, optimizer, checkpoint_dir)
    start_epoch = len(history)
    best_auc = max((row["val_auc"] for row in history), default=-1.0)
    train_shard = ray.train.get_dataset_shard("train")
    validation = ray.train.get_dataset_shard("validation")
    per_worker_batch = global_batch // context.get_world_size()
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        losses, correct = [], 0.0
        for batch in train_shard.iter_batches(
            batch_size=per_worker_batch, drop_last=True, local_shuffle_buffer_size=4 * per_worker_batch
        ):
            loss, batch_correct = train_step(tf.constant(batch["image"]), tf.constant(batch["label"]))
            losses.append(float(loss))
            correct += float(batch_correct)
        divergence = float(replica_weight_divergence())
        epoch_metrics = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "accuracy": correct / max(1, len(losses) * global_batch),  # on augmented images
            "steps": len(losses),
            "replica_weight_divergence": divergence,
            "resumed_from_epoch": start_epoch,
            "epoch_seconds": time.perf_counter() - started,
        }
        if rank != 0:
            ray.train.report(epoch_metrics)
            continue
        y_true, p_cancer = score_dataset(forward, validation)
        summary = metrics.summary(y_true, p_cancer, 0.5)
        best_auc = max(best_auc, summary["roc_auc"])
        epoch_metrics.update(
            val_accuracy=summary["accuracy"], val_auc=summary["roc_auc"], val_ece=summary["ece"], best_val_auc=best_auc,
        )
        history.append(epoch_metrics)
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            _save(model, optimizer, checkpoint_dir, history)
            ray.train.report(epoch_metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


def score_dataset(forward, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(y_true as 1 = Cancer, Cancer probability) for every row of an `image_dataset`."""
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    labels, probabilities = [], []
    for batch in dataset.iter_batches(batch_size=64):
        labels.append(batch["label"] == positive)
        probabilities.append(np.asarray(forward(batch["image"]))[:, positive])
    return np.concatenate(labels).astype(np.int64), np.concatenate(probabilities)


def _save(model, optimizer, directory: str, history: list[dict]) -> None:
    model.save_weights(Path(directory, WEIGHTS_FILE))
    np.savez(Path(directory, OPTIMIZER_FILE), *[np.asarray(v) for v in optimizer.variables])
    Path(directory, STATE_FILE).write_text(json.dumps({"history": history}))


def _restore(model, optimizer, directory: str) -> list[dict]:
    """Weights, optimizer state (moments, step count: the schedule continues) and the metrics so far."""
    model.load_weights(Path(directory, WEIGHTS_FILE))
    with np.load(Path(directory, OPTIMIZER_FILE)) as saved:
        for variable, key in zip(optimizer.variables, saved.files, strict=True):
            variable.assign(saved[key])
    history = json.loads(Path(directory, STATE_FILE).read_text())["history"]
    logger.info("resuming after epoch %d", len(history))
    return history


def _model_from_checkpoint(arch: str, directory: str):
    from skin_ray.model import make_model

    model = make_model(arch)
    model.load_weights(Path(directory, WEIGHTS_FILE))
    return model
