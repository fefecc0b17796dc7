"""Distributed training on a real local Ray: 2 workers, identical weights, learning, resume, resources."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from skin_ray import classifier_stats, safeguards
from skin_ray.bundle import load_bundle, read_metadata
from skin_ray.calibration import calibrate
from skin_ray.config import DistillSettings, EvaluateSettings, ThresholdSettings, TrainSettings
from skin_ray.data import discover, image_dataset, pixel_dataset, split_by_content
from skin_ray.evaluate import evaluate
from skin_ray.predictor import Predictor
from skin_ray.preprocess import to_model_input
from skin_ray.runtime import InsufficientResourcesError
from skin_ray.train import distill, model_input_tensor, train, training_loss


def _config(data: Path, tmp_path: Path, **overrides) -> TrainSettings:
    settings = dict(
        data=str(data), output=str(tmp_path / "bundle"), storage_path=str(tmp_path / "runs"), run_name="run",
        workers=2, epochs=8, batch_size=16, learning_rate=3e-3, seed=0,
    )
    return TrainSettings(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(ray_session, lesion_tree, tmp_path_factory):
    """One 2-worker training run on the generated lesions, shared by the tests that read its outcome; at their
    own size, 96 pixels, which every command using the bundle must then decode to (170 is the default)."""
    return train(_config(lesion_tree, tmp_path_factory.mktemp("trained"), input_size=96))


def test_two_workers_stay_identical_and_learn(trained, lesion_tree, tmp_path):
    outcome = trained

    assert [row["epoch"] for row in outcome.history] == list(range(1, 9))
    # Both workers' weight checksums, all-gathered after every epoch, are exactly equal.
    assert all(row["replica_weight_divergence"] == 0.0 for row in outcome.history)
    assert all(row["steps"] > 0 for row in outcome.history)

    bundle = load_bundle(outcome.bundle_uri)
    assert bundle.metadata.class_names == ["Cancer", "Non_Cancer"]
    assert bundle.metadata.training["workers"] == 2
    assert bundle.metadata.input_size == [96, 96, 3] and bundle.model.input_shape == (None, 96, 96, 3)
    # The shipped metrics are reproducible from the bundle itself on the validation split.
    split = split_by_content(discover(str(lesion_tree)), bundle.metadata.input_spec, 0.2)
    predictor = Predictor(bundle)
    rows = image_dataset(split.validation, bundle.metadata.input_spec).take_all()
    y_true = np.array([row["label"] == 0 for row in rows], dtype=int)
    p_cancer = predictor.cancer_probabilities(np.stack([row["image"] for row in rows]))
    recomputed = classifier_stats.summary(y_true, p_cancer, bundle.metadata.threshold)
    assert recomputed["roc_auc"] == pytest.approx(outcome.metrics["validation"]["roc_auc"], abs=1e-6)
    # evaluate scores the same images alike. Image by image, not by AUC: this network's Cancer probabilities
    # saturate (24 distinct values among the 49 in one run here, many at 0.99999994), and evaluate's batches
    # differ from this one by a float32 ulp, which breaks ties and so moves the AUC.
    evaluated = evaluate(EvaluateSettings(data=str(lesion_tree), bundle=outcome.bundle_uri, split="validation",
                                          report=str(tmp_path)))
    scored = {row["path"]: row for row in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    assert evaluated["n"] == len(rows) and sorted(scored) == sorted(row["path"] for row in rows)
    records = predictor.records(np.stack([row["image"] for row in rows]))
    for row, record in zip(rows, records, strict=True):
        evaluated_record = scored[row["path"]]
        assert evaluated_record["ood_score"] == pytest.approx(record["ood_score"], abs=1e-4), row["path"]
        assert evaluated_record["cancer_probability"] == pytest.approx(record["cancer_probability"], abs=1e-6), row["path"]
    assert recomputed["sensitivity"] >= bundle.metadata.target_sensitivity
    # Learned: far above chance on held-out images of a task only the texture can solve.
    assert recomputed["roc_auc"] > 0.9, recomputed
    # The safeguards were fitted on the same split: the gate lets 95% of validation through, and the
    # predictions left certain are as accurate as the recorded figure says.
    accepted = np.mean([record["in_distribution"] for record in records])
    assert accepted == pytest.approx(safeguards.GATE_TPR, abs=1.5 / len(records))
    uncertainty, threshold = bundle.metadata.uncertainty, bundle.metadata.threshold
    flagged = safeguards.is_uncertain(p_cancer, threshold, uncertainty["margin"], np.zeros(len(p_cancer), dtype=bool))
    assert flagged.mean() == pytest.approx(uncertainty["validation"]["flagged"], abs=1e-9)
    correct = (p_cancer >= threshold) == (y_true == 1)
    assert not (~flagged).any() or correct[~flagged].mean() >= safeguards.CERTAIN_ACCURACY


def test_calibration_does_not_depend_on_the_order_of_the_rows(ray_session, untrained_bundle, lesion_tree):
    """The cross-fitted ECE's halves follow each image's content, not its row number (Ray Data writes rows
    in any order), so calibrating on the same images in another order gives the same figures. (An untrained
    network: a trained one separates the generated lesions perfectly, and every half would calibrate alike.)"""
    spec = read_metadata(str(untrained_bundle)).input_spec
    split = split_by_content(discover(str(lesion_tree)), spec, 0.2)
    rows = pixel_dataset(split.validation, spec).take_all()
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    figures = []
    for ordered in (rows, shuffled):
        bundle = load_bundle(str(untrained_bundle))
        validation = ray.data.from_items(ordered).materialize()
        threshold, bundle_metrics = calibrate(bundle.model, bundle.metadata.positive_index, validation, ThresholdSettings())
        figures.append([threshold, bundle_metrics["validation"]["ece_crossfit"], bundle_metrics["validation"]["roc_auc"]])
    np.testing.assert_allclose(figures[0], figures[1], rtol=1e-5)


def _alive_train_workers() -> list:
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return [actor for actor in alive if actor.class_name.endswith("RayTrainWorker")]


def test_resumes_from_checkpoint_after_a_worker_is_killed_and_says_so(ray_session, lesion_tree, tmp_path):
    """`skin-ray train` loses a worker the moment an epoch's checkpoint is written: the group restarts from the
    last checkpoint Ray Train recorded, training ends as if nothing happened, and stderr says what failed and
    from which epoch training resumed."""
    runs = tmp_path / "runs"
    command = [
        "skin-ray", "train", str(lesion_tree), "--output", str(tmp_path / "bundle"), "--storage-path", str(runs),
        "--run-name", "run", "--workers", "2", "--epochs", "4", "--batch-size", "16", "--learning-rate", "3e-3",
        "--max-failures", "2", "--input-size", "96",  # small inputs: the test is about the restart, not the network
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The controller records a checkpoint in this snapshot once every worker has reported it.
        snapshot = runs / "run" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 300
        while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert snapshot.exists(), "no checkpoint was registered"
        # Kill the moment the next epoch's checkpoint is written, before the controller's poll records it.
        recorded = set(re.findall(r"checkpoint_[0-9-_.]+", snapshot.read_text()))
        while not _checkpoint_dirs(snapshot.parent) - recorded and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(_alive_train_workers()[-1].pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["bundle"] == str(tmp_path / "bundle")

    checkpoints = [snapshot.parent / name for name in _checkpoint_dirs(snapshot.parent)]
    history = max((json.loads((checkpoint / "state.json").read_text())["history"] for checkpoint in checkpoints), key=len)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    # Epochs after the kill ran in the restarted worker group, which resumed from a checkpoint.
    resumed = history[-1]["resumed_from_epoch"]
    assert resumed >= 1 and history[0]["resumed_from_epoch"] == 0
    assert all(row["replica_weight_divergence"] == 0.0 for row in history)
    # The checkpoint written just before the kill was never recorded; it is gone rather than orphaned.
    assert _checkpoint_dirs(snapshot.parent) <= set(re.findall(r"checkpoint_[0-9-_.]+", snapshot.read_text()))
    failures = [line for line in stderr.splitlines() if line.startswith("training workers failed")]
    assert len(failures) == 1, stderr[-3000:]
    assert re.search(r"\(rank \d: \w+Error: .+\)", failures[0]), failures[0]
    assert failures[0].endswith(f"restarting the workers from the checkpoint of epoch {resumed} (restart 1 of at most 2)")
    epochs = [line for line in stderr.splitlines() if line.startswith("epoch ")]
    assert epochs[-1].startswith("epoch 4/4") and stderr.index(failures[0]) < stderr.index(epochs[-1])


def _checkpoint_dirs(run: Path) -> set[str]:
    return {path.name for path in run.glob("checkpoint_*") if path.is_dir()}


def test_fails_fast_when_another_actor_holds_the_cpus(ray_session, lesion_tree, tmp_path):
    @ray.remote
    class CpuHolder:
        def ready(self):
            return True

    free = ray.available_resources().get("CPU", 0)
    holder = CpuHolder.options(num_cpus=free - 1).remote()  # leaves one CPU: not enough for 2 workers + data
    ray.get(holder.ready.remote())
    try:
        started = time.monotonic()
        with pytest.raises(InsufficientResourcesError, match="CPUs are free"):
            train(_config(lesion_tree, tmp_path, resources_timeout_s=3))
        assert time.monotonic() - started < 60
    finally:
        ray.kill(holder)


def test_distill_learns_from_its_teacher_on_the_teachers_split(trained, lesion_tree, tmp_path):
    teacher = load_bundle(trained.bundle_uri)
    settings = DistillSettings(
        teacher=trained.bundle_uri, output=str(tmp_path / "student"), storage_path=str(tmp_path / "runs"),
        run_name="student", arch="plain", workers=2, epochs=6, batch_size=16, learning_rate=3e-3,
    )
    with pytest.raises(ValueError, match="--input-size must be the teacher's, 96"):
        distill(settings.model_copy(update={"input_size": 170}))
    outcome = distill(settings)
    student = load_bundle(outcome.bundle_uri).metadata
    assert student.arch == "plain" and student.data["fingerprint"] == teacher.metadata.data["fingerprint"]
    assert student.input_size == teacher.metadata.input_size  # it saw the teacher's inputs
    assert student.training["teacher"]["model_version"] == teacher.metadata.model_version
    assert student.training["validation_fraction"] == teacher.metadata.training["validation_fraction"]
    assert all(row["replica_weight_divergence"] == 0.0 for row in outcome.history)
    assert outcome.metrics["validation"]["roc_auc"] > 0.9, outcome.metrics  # learned the teacher's task


def test_training_loss_mixes_the_labels_and_the_teachers_softened_probabilities():
    import tensorflow as tf

    labels = tf.constant([0, 1, 1])
    weights = tf.constant([2.0, 0.5])
    student = tf.constant([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    teacher = tf.constant([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    cross_entropy = -np.log([0.7, 0.6, 0.1]) * [2.0, 0.5, 0.5]
    np.testing.assert_allclose(training_loss(labels, student, weights), cross_entropy, rtol=1e-6)
    np.testing.assert_allclose(training_loss(labels, student, weights, teacher, 2.0, 0.0), cross_entropy, rtol=1e-6)
    # All from the teacher: the loss is smallest, its gradient zero, where the student equals the teacher.
    logits = tf.Variable(tf.math.log(teacher))
    with tf.GradientTape() as tape:
        at_teacher = training_loss(labels, tf.nn.softmax(logits), weights, teacher, 2.0, 1.0)
        total = tf.reduce_sum(at_teacher)
    np.testing.assert_allclose(tape.gradient(total, logits), 0.0, atol=1e-6)
    assert (training_loss(labels, student, weights, teacher, 2.0, 1.0).numpy() > at_teacher.numpy()).all()


def test_the_train_steps_model_input_is_the_served_one_bit_for_bit():
    """Training scales pixels in TensorFlow, serving and calibration in numpy: a model trained on one and
    served on the other must see the same numbers."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 17, 17, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    np.testing.assert_array_equal(np.asarray(model_input_tensor(pixels)), to_model_input(pixels))


@pytest.mark.parametrize("arch", ["default", "seed"])
def test_mixed_precision_trains_a_bfloat16_network_whose_weights_are_the_float32_ones(arch, tmp_path):
    """`--precision mixed_bfloat16`: the train step's network computes in bfloat16 but keeps float32 weights,
    softmax (and colour constancy), the augmentation stays float32, and the checkpoint loads into the float32
    network a bundle holds, which scores like the network that was trained."""
    import keras
    import tensorflow as tf

    from skin_ray.train import WorkerPlan, _make_training, _model_from_checkpoint, _save

    recipe = TrainSettings(
        data="unused", output="unused", arch=arch, workers=1, batch_size=4, epochs=1, precision="mixed_bfloat16",
        input_size=64,  # small: this CPU emulates bfloat16
    )
    plan = WorkerPlan(recipe, class_weights=[1.0, 1.0], steps_per_epoch=1, positive_index=0)
    training = _make_training(plan, tf.distribute.get_strategy(), rank=0)
    assert keras.config.dtype_policy().name == "float32"  # set back for whatever is built next
    computing = {layer.compute_dtype for layer in training.model.layers if layer.weights}
    assert computing == {"bfloat16", "float32"}
    assert {weight.dtype for weight in training.model.weights} == {"float32"}

    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    loss, _ = training.step(tf.constant(pixels), tf.constant([0, 1, 0, 1]))
    assert np.isfinite(float(loss))
    in_training = training.forward(tf.constant(pixels)).numpy()
    assert in_training.dtype == np.float32

    _save(training.model, training.optimizer, str(tmp_path), history=[])
    served = _model_from_checkpoint(arch, recipe.input_size, str(tmp_path))
    assert {layer.compute_dtype for layer in served.layers} == {"float32"}
    # bfloat16 keeps about 3 significant digits through the network; the float32 one is the same function.
    np.testing.assert_allclose(served.predict(to_model_input(pixels), verbose=0), in_training, atol=0.05)
