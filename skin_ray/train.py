"""Distributed training with Ray Train's TensorflowTrainer and MultiWorkerMirroredStrategy.

Each worker reads its own shard of the training set through Ray Data (`get_dataset_shard`), runs a custom
training loop, and rank 0 validates, checkpoints and reports per epoch. The best checkpoint by validation
ROC AUC becomes the model bundle, after calibration, the choice of a decision threshold and the safeguards
on the same validation split (skin_ray.finalize).

Why a custom loop instead of `model.fit`: on this stack (TensorFlow 2.21, Keras 3.15) `fit` under
MultiWorkerMirroredStrategy with 2+ workers fails inside Keras (keras-team/keras#20585, then
tensorflow/tensorflow#72388). `strategy.run` + `GradientTape` + `tf.nn.compute_average_loss` are public,
stable APIs that work unpatched; patching Keras internals would break with the next Keras release, and
legacy tf-keras needs the full TensorFlow wheel and writes files Keras 3 cannot load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.fs
import ray
import ray.train
from ray.train.tensorflow import TensorflowTrainer

from skin_ray import classifier_stats, storage
from skin_ray.bundle import load_bundle, save_bundle
from skin_ray.config import DistillSettings, TrainingRecipe, TrainSettings
from skin_ray.console import format_duration
from skin_ray.data import Split, discover_sources, pixel_dataset, split_by_content
from skin_ray.finalize import bundle_split, finalize_bundle
from skin_ray.runtime import limit_tensorflow_threads, wait_for_resources
from skin_ray.scoring import cancer_scores

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker is given: the recipe (a DistillSettings when a teacher's soft targets join the
    labels) and what the driver derived from the split."""

    recipe: TrainingRecipe
    class_weights: list[float]
    steps_per_epoch: int
    positive_index: int  # of the Cancer class, in the split's class order


@dataclass
class TrainOutcome:
    bundle_uri: str
    metrics: dict
    history: list[dict]


def train(settings: TrainSettings) -> TrainOutcome:
    """Train on `settings.data`, write the bundle to `settings.output`, return its validation metrics."""
    images = discover_sources(settings.data, settings.metadata, subset=settings.subset)
    split = split_by_content(images, settings.input_spec, settings.validation_fraction, settings.group_column)
    return _train_on_split(settings, split, settings.model_dump())


def distill(settings: DistillSettings) -> TrainOutcome:
    """Train a network on the teacher bundle's soft targets and the labels, on the split the teacher was
    trained and calibrated on (so its validation images stay unseen by both); write it as a bundle."""
    teacher = load_bundle(settings.teacher)
    size = teacher.metadata.image_size
    if settings.input_size not in (None, size):
        raise ValueError(f"the student sees the teacher's inputs: --input-size must be the teacher's, {size}")
    settings = settings.model_copy(update={"input_size": size})
    split = bundle_split(teacher, settings.data)
    record = {
        **settings.model_dump(),
        "teacher": {"uri": teacher.uri, "model_version": teacher.metadata.model_version,
                    "roc_auc": teacher.metadata.metrics["validation"]["roc_auc"]},
        # The split's definition, as every bundle records it (fit-safeguards and ensemble re-derive it).
        "validation_fraction": teacher.metadata.training["validation_fraction"],
        "subset": teacher.metadata.training.get("subset"),
    }
    return _train_on_split(settings, split, record)


def _train_on_split(settings: TrainingRecipe, split: Split, record: dict) -> TrainOutcome:
    """Train by `settings` on `split` (its teacher, if any, in `settings.teacher`), then calibrate, threshold
    and safeguard the best checkpoint and write the bundle, whose bundle.json records `record`."""
    if len(split.validation) == 0 or len(set(split.validation.labels)) < 2:
        raise ValueError("the validation split needs images of both classes; add images or raise --validation-fraction")
    logger.info(
        "training on %d images %s, validating on %d %s, skipped %d undecodable",
        len(split.train), split.train.class_counts(), len(split.validation), split.validation.class_counts(),
        len(split.skipped),
    )
    counts = np.bincount(split.train.labels, minlength=len(split.train.class_names))
    rows_per_worker = len(split.train) // settings.workers
    steps_per_epoch = rows_per_worker // (settings.batch_size // settings.workers)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(split.train)} training images are fewer than one batch per worker")
    class_weights = (len(split.train) / (len(counts) * np.maximum(counts, 1))).tolist()
    plan = WorkerPlan(settings, class_weights, steps_per_epoch, split.train.positive_index)
    _wait_for_resources(settings)
    progress = ProgressLines(settings.epochs, settings.max_failures)
    storage_fs, storage_path = storage.pyarrow_filesystem(os.path.expanduser(settings.storage_path))
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            resources_per_worker={"CPU": settings.cpus_per_worker},
            placement_strategy=settings.placement_strategy,
        ),
        datasets={
            "train": pixel_dataset(split.train, settings.input_spec, not settings.decode_every_epoch, shuffle=True),
            "validation": pixel_dataset(split.validation, settings.input_spec, not settings.decode_every_epoch),
        },
        # Every worker gets an equal share of "train" (equal row counts keep the collectives in step);
        # "validation" is read whole by rank 0.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=settings.run_name or f"skin-ray-{settings.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_auc", checkpoint_score_order="max"
            ),
            callbacks=[progress.callback],
        ),
    )
    with progress:
        result = trainer.fit()
    _remove_unrecorded_checkpoints(result)
    with result.checkpoint.as_directory() as latest:
        history = json.loads(Path(latest, STATE_FILE).read_text())["history"]
    best = result.get_best_checkpoint(metric="val_auc", mode="max")
    with best.as_directory() as checkpoint_dir:
        model = _model_from_checkpoint(settings.arch, settings.input_size, checkpoint_dir)
    training = {**record, "epochs_run": len(history)}
    metadata, gate, drift = finalize_bundle(model, settings.input_spec, split, settings.arch, settings, training,
                                            settings.outliers)
    metadata.metrics["validation"]["best_epoch"] = max(history, key=lambda row: row["val_auc"])["epoch"]
    save_bundle(model, metadata, settings.output, (split.train_digests, split.validation_digests), gate, drift)
    return TrainOutcome(settings.output, metadata.metrics, history)


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


class ProgressLines:
    """What the driver prints while training: a line per epoch with the time left, and a line whenever the
    workers fail, naming the failed workers and the checkpoint the restarted group resumes from.

    Ray Train's controller, where callbacks run, sends each through a queue to a thread here, rather than
    the lines being forwarded, prefixed and coloured, from a worker's output (and a failure would not be
    printed at all: Ray Train logs it in its own files only)."""

    def __init__(self, epochs: int, max_failures: int):
        from ray.util.queue import Queue

        self.epochs = epochs
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _ReportToQueue(self.queue, max_failures)
        self._printer = threading.Thread(target=self._print, daemon=True)

    def __enter__(self):
        self._printer.start()
        return self

    def __exit__(self, *exc_info):
        self.queue.put(None)
        self._printer.join(timeout=10)
        self.queue.shutdown()

    def _print(self) -> None:
        while (line := self.queue.get()) is not None:
            print(line if isinstance(line, str) else self._epoch_line(line), flush=True)

    def _epoch_line(self, row: dict) -> str:
        left = (self.epochs - row["epoch"]) * row["epoch_seconds"]
        return (
            f"epoch {row['epoch']}/{self.epochs}  loss {row['loss']:.4f}  accuracy {row['accuracy']:.3f}  "
            f"val_accuracy {row['val_accuracy']:.3f}  val_auc {row['val_auc']:.4f}  best {row['best_val_auc']:.4f}  "
            f"{row['epoch_seconds']:.0f}s" + (f"  about {format_duration(left)} left" if left else "")
        )


class _ReportToQueue(ray.train.UserCallback):
    """Runs in Ray Train's controller: rank 0's epoch figures, and a line per failure of the worker group."""

    def __init__(self, queue, max_failures: int):
        self.queue, self.max_failures = queue, max_failures
        self.failures = 0
        self.checkpointed_epoch = 0  # of the last checkpoint the controller recorded: where a restart resumes

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if "val_auc" in metrics[0]:  # rank 0 validates; the others report training figures only
            self.queue.put(metrics[0])
        if checkpoint is not None:
            self.checkpointed_epoch = metrics[0]["epoch"]

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        failed = "; ".join(
            f"rank {rank}: {type(error).__name__}: {_first_line(error)}" for rank, error in sorted(worker_exceptions.items())
        )
        if self.failures > self.max_failures:
            outcome = f"no restart left (--max-failures {self.max_failures}): training stops"
        else:
            start = f"the checkpoint of epoch {self.checkpointed_epoch}" if self.checkpointed_epoch else "the start"
            outcome = f"restarting the workers from {start} (restart {self.failures} of at most {self.max_failures})"
        self.queue.put(f"training workers failed ({failed}); {outcome}")


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")


def _wait_for_resources(settings: TrainSettings) -> None:
    """The workers' CPUs plus one for Ray Data must be free, or training fails with a clear message.

    Without this, Ray Train waits forever when another actor (a Serve replica, say) holds the CPUs.
    """
    wait_for_resources(
        [{"CPU": settings.cpus_per_worker}] * settings.workers + [{"CPU": 1}],
        strategy="SPREAD" if settings.placement_strategy.endswith("SPREAD") else "PACK",
        timeout_s=settings.resources_timeout_s,
        purpose=f"training needs {settings.workers} workers x {settings.cpus_per_worker} CPU plus 1 CPU for data loading",
        remedy="Stop what holds them (a Serve app?), lower --workers, or add nodes.",
    )


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (`config` holds the WorkerPlan). MultiWorkerMirroredStrategy keeps the
    replicas' weights identical."""
    context = ray.train.get_context()
    limit_tensorflow_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    plan: WorkerPlan = config["plan"]
    _run_epochs(_make_training(plan, strategy, context.get_world_rank()), plan, context)


class _Training(NamedTuple):
    """One worker's replica of the network and the compiled functions an epoch calls."""

    model: Any
    optimizer: Any
    step: Any  # (uint8 pixels, labels) -> (summed loss, correct predictions) over every worker's batch
    forward: Any  # uint8 pixels -> probabilities, for validation
    weight_divergence: Any  # () -> largest relative difference between the workers' weights (0.0 in sync)


def _make_training(plan: WorkerPlan, strategy, rank: int) -> _Training:
    """The network and AdamW (warm-up, then cosine decay) in the strategy's scope, and the class-weighted
    training step: the recipe, apart from the loop that runs it."""
    import keras
    import tensorflow as tf

    from skin_ray.model import make_augmenter, make_model

    recipe = plan.recipe
    keras.utils.set_random_seed(recipe.seed)
    global_batch, epochs, steps = recipe.batch_size, recipe.epochs, plan.steps_per_epoch
    with strategy.scope():
        # The precision applies to the layers built now, the network's; the augmentation stays in float32.
        # The weights are float32 either way, so the bundle's network (skin_ray.finalize) is the usual one.
        keras.config.set_dtype_policy(recipe.precision)
        model = make_model(recipe.arch, recipe.input_size)
        keras.config.set_dtype_policy("float32")
        schedule = keras.optimizers.schedules.CosineDecay(
            recipe.learning_rate / 20, decay_steps=epochs * steps, alpha=0.01,
            warmup_target=recipe.learning_rate, warmup_steps=min(2 * steps, epochs * steps // 4),
        )
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=recipe.weight_decay)
        optimizer.build(model.trainable_variables)
    # Outside the scope: each worker augments its own shard with its own random stream, and holds the
    # teacher (frozen: only read) whole.
    augmenter = make_augmenter(seed=recipe.seed * 1000 + rank)
    distilling = isinstance(recipe, DistillSettings)
    teacher = load_bundle(recipe.teacher).model if distilling else None
    temperature, teacher_weight = (recipe.temperature, recipe.teacher_weight) if distilling else (1.0, 0.0)
    class_weights = tf.constant(plan.class_weights, tf.float32)

    @tf.function
    def step(pixels, labels):
        def replica_step(pixels, labels):
            images = augmenter(model_input_tensor(pixels), training=True)
            # The teacher sees the same augmented images as the student ("consistent teaching", Beyer et al., 2022).
            teacher_probabilities = None if teacher is None else teacher(images, training=False)
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                per_example = training_loss(
                    labels, probabilities, class_weights, teacher_probabilities, temperature, teacher_weight,
                )
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.argmax(probabilities, axis=1) == tf.cast(labels, tf.int64), tf.float32))
            return loss, correct

        loss, correct = strategy.run(replica_step, args=(pixels, labels))
        total = lambda value: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)  # noqa: E731
        return total(loss), total(correct)

    @tf.function
    def weight_divergence():
        def checksum():
            values = [tf.reshape(tf.cast(w, tf.float64), [-1]) for w in model.weights]
            flat = tf.concat(values, axis=0)
            positions = tf.range(1, tf.size(flat) + 1, dtype=tf.float64)
            return tf.stack([tf.reduce_sum(flat), tf.reduce_sum(flat * flat), tf.reduce_sum(flat * positions)])[None]

        gathered = strategy.gather(strategy.run(checksum), axis=0)
        return tf.reduce_max(tf.abs(gathered - gathered[:1]) / (tf.abs(gathered[:1]) + 1e-12))

    @tf.function
    def forward(pixels):
        return model(model_input_tensor(pixels), training=False)

    return _Training(model, optimizer, step, forward, weight_divergence)


def model_input_tensor(pixels):
    """skin_ray.preprocess.to_model_input in TensorFlow, for the train step's graph (a test holds them equal)."""
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 255.0


def training_loss(labels, probabilities, class_weights, teacher_probabilities=None, temperature=1.0, teacher_weight=0.0):
    """Per-example loss, weighted by the label's class weight: cross-entropy with the labels, or with a
    teacher `teacher_weight` of the cross-entropy with its probabilities softened by `temperature` (times
    temperature², which keeps the gradients at the labels' scale; Hinton et al., 2015) and the rest with the
    labels. The networks end in a softmax: log-probabilities stand for the logits they are shifts of."""
    import keras
    import tensorflow as tf

    per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    if teacher_probabilities is not None:

        def softened_log(p):
            return tf.nn.log_softmax(tf.math.log(tf.clip_by_value(p, 1e-7, 1.0)) / temperature)

        soft_targets = tf.exp(softened_log(teacher_probabilities))
        soft = -tf.reduce_sum(soft_targets * softened_log(probabilities), axis=-1) * temperature**2
        per_example = (1 - teacher_weight) * per_example + teacher_weight * soft
    return per_example * tf.gather(class_weights, labels)


def _run_epochs(training: _Training, plan: WorkerPlan, context) -> None:
    """Epochs from the last checkpoint on: every worker trains on its shard; rank 0 then validates,
    checkpoints and reports, the others report their training figures."""
    import tensorflow as tf

    global_batch, rank = plan.recipe.batch_size, context.get_world_rank()
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            history = _restore(training.model, training.optimizer, checkpoint_dir)
    start_epoch = len(history)
    best_auc = max((row["val_auc"] for row in history), default=-1.0)
    train_shard = ray.train.get_dataset_shard("train")
    validation = ray.train.get_dataset_shard("validation")
    per_worker_batch = global_batch // context.get_world_size()
    for epoch in range(start_epoch, plan.recipe.epochs):
        started = time.perf_counter()
        losses, correct = [], 0.0
        for batch in train_shard.iter_batches(
            batch_size=per_worker_batch, drop_last=True, local_shuffle_buffer_size=4 * per_worker_batch
        ):
            loss, batch_correct = training.step(tf.constant(batch["pixels"]), tf.constant(batch["label"]))
            losses.append(float(loss))
            correct += float(batch_correct)
        epoch_metrics = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "accuracy": correct / max(1, len(losses) * global_batch),  # on augmented images
            "steps": len(losses),
            "replica_weight_divergence": float(training.weight_divergence()),
            "resumed_from_epoch": start_epoch,
            "epoch_seconds": time.perf_counter() - started,
        }
        if rank != 0:
            ray.train.report(epoch_metrics)
            continue
        started = time.perf_counter()
        y_true, p_cancer = cancer_scores(validation, training.forward, plan.positive_index)
        summary = classifier_stats.summary(y_true, p_cancer, 0.5)
        best_auc = max(best_auc, summary["roc_auc"])
        epoch_metrics.update(
            val_accuracy=summary["accuracy"], val_auc=summary["roc_auc"], val_ece=summary["ece"], best_val_auc=best_auc,
            validate_seconds=time.perf_counter() - started,
        )
        history.append(epoch_metrics)
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            _save(training.model, training.optimizer, checkpoint_dir, history)
            ray.train.report(epoch_metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


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


def _model_from_checkpoint(arch: str, size: int, directory: str):
    from skin_ray.model import make_model

    model = make_model(arch, size)
    model.load_weights(Path(directory, WEIGHTS_FILE))
    return model
