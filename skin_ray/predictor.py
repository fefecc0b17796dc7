"""Inference on a loaded bundle: arrays in, probabilities and prediction records out.

`Predictor` is what `predict`, `evaluate`, the Serve app and the batch job's actors hold, and
`Predictor.records` is the one place where a batch of images (some of which failed to decode) becomes one
prediction record per image, the same fields in every path. The model is called through one traced
`tf.function` with a batch-agnostic signature: Keras 3 `model.predict` pays ~150 ms of fixed overhead per
call on a 2-core machine, which would dominate small batches; or, when the bundle carries a validated faster
runtime (skin_ray.onnx_analysis) and this machine can run it, through that (`analyser_for`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from skin_ray.bundle import Bundle, load_bundle
from skin_ray.explain import Explainer
from skin_ray.onnx_analysis import RUNTIME, Forward, missing_cpu_features, onnx_forward
from skin_ray.preprocess import to_model_input
from skin_ray.record import OUT_OF_DISTRIBUTION, RECORD_FIELDS, error_record
from skin_ray.safeguards import GateInputs, image_evidence, is_uncertain, members_disagree

logger = logging.getLogger(__name__)

REFERENCE_RUNTIME = "keras-float32"  # the bundle's Keras network itself: what every other runtime is checked against


@dataclass(frozen=True)
class Prediction:
    label: str
    cancer_probability: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Decisions:
    """What a bundle decides of each image of an analysis (None where the bundle has no gate or margin)."""

    p_cancer: np.ndarray
    cancer: np.ndarray  # p_cancer >= the bundle's threshold
    ood_score: np.ndarray | None
    refused: np.ndarray | None  # by the input gate
    uncertain: np.ndarray | None

    @staticmethod
    def concatenate(parts: list[Decisions]) -> Decisions:
        return Decisions(*(
            None if getattr(parts[0], name) is None else np.concatenate([getattr(part, name) for part in parts])
            for name in Decisions.__dataclass_fields__
        ))


@dataclass(frozen=True)
class Analysis:
    """What one forward pass gives for a batch."""

    probabilities: np.ndarray  # (n, classes), calibrated
    features: np.ndarray  # (n, d): the classifier's input
    member_cancer: np.ndarray | None  # (n, members): each ensemble member's Cancer probability
    gate_inputs: GateInputs  # what the input gate measures


def analysis_function(model: keras.Model) -> tf.types.experimental.GenericFunction:
    """A traced function: images -> (probabilities, the classifier's input features, `image_evidence`, and each
    stage's output pooled to channel means and deviations: one array per depth, an ensemble's members side by side).

    A stage's output is the input of a pooling layer; an ensemble's members each run once, their stages kept."""
    inputs = keras.Input(model.input_shape[1:])
    members = [layer for layer in model.layers if layer.name.startswith("member_")]
    if members:
        runs = [keras.Model(member.inputs, [member.output, *_stage_outputs(member)])(inputs) for member in members]
        features = ops.concatenate([run[0] for run in runs], axis=-1)
        stages = [[run[1 + depth] for run in runs] for depth in range(len(runs[0]) - 1)]
    elif isinstance(model, keras.Sequential):  # a loaded Sequential has no symbolic graph: rebuild the chain
        features, stages = inputs, []
        for layer in model.layers[:-1]:
            if isinstance(layer, _POOLING):
                stages.append([features])
            features = layer(features)
    else:
        features, *outputs = keras.Model(model.inputs, [model.layers[-1].input, *_stage_outputs(model)])(inputs)
        stages = [[output] for output in outputs]
    pooled = [
        ops.concatenate([statistic for x in depth for statistic in (ops.mean(x, axis=(1, 2)), ops.std(x, axis=(1, 2)))], axis=-1)
        for depth in stages
    ]
    analysis = keras.Model(inputs, [model.layers[-1](features), features, image_evidence(inputs), *pooled])
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
    return tf.function(lambda images: analysis(images, training=False), input_signature=signature)


_POOLING = (keras.layers.MaxPooling2D, keras.layers.GlobalAveragePooling2D)


def _stage_outputs(model: keras.Model) -> list:
    """The symbolic outputs of `model`'s stages: the inputs of its pooling layers."""
    return [layer.input for layer in model.layers if isinstance(layer, _POOLING)]


def member_cancer_probabilities(model: keras.Model, features: np.ndarray, positive_index: int) -> np.ndarray | None:
    """Each member's Cancer probability from an ensemble's concatenated features: the member's block of the
    shared classifier, times the number of members (the classifier averages them), plus the shared bias,
    so a member's probability carries the ensemble's calibration. None for a single network."""
    members = [layer for layer in model.layers if layer.name.startswith("member_")]
    if not members:
        return None
    kernel, bias = model.layers[-1].get_weights()
    sizes = np.cumsum([0] + [member.output.shape[-1] for member in members])
    logits = np.stack(
        [
            len(members) * features[:, start:end] @ kernel[start:end] + bias
            for start, end in zip(sizes[:-1], sizes[1:], strict=True)
        ],
        axis=1,
    )  # (n, members, classes)
    logits -= logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return probabilities[..., positive_index]


def keras_forward(model: keras.Model) -> Forward:
    """`analysis_function(model)` on numpy arrays: the reference runtime."""
    function = analysis_function(model)
    return lambda images: [output.numpy() for output in function(tf.convert_to_tensor(images, dtype=tf.float32))]


class Analyser:
    """A network's forward pass for a batch of preprocessed images, as an `Analysis`, run by `forward` (the
    Keras network itself when None) and named by `runtime`."""

    def __init__(self, model: keras.Model, positive_index: int, forward: Forward | None = None, runtime: str = REFERENCE_RUNTIME):
        self.model, self.positive_index, self.runtime = model, positive_index, runtime
        self.forward = forward or keras_forward(model)

    def __call__(self, images: np.ndarray) -> Analysis:
        if len(images) == 0:
            images = np.zeros((0, *self.model.input_shape[1:]), np.float32)
        probabilities, features, evidence, *depths = self.forward(images)
        members = member_cancer_probabilities(self.model, features, self.positive_index)
        return Analysis(probabilities, features, members, GateInputs(tuple(depths), evidence))


def analyser_for(bundle: Bundle, runtime: str = "auto", threads: int | None = None) -> Analyser:
    """The analyser of `bundle`: its recorded runtime (`runtime="auto"`) when this machine can run it, on `threads`
    threads (default `forward_threads()`), else the Keras network, saying once per process and bundle why;
    `runtime="float32"` asks for the Keras network."""
    from skin_ray.runtime import forward_threads

    positive_index = bundle.metadata.positive_index
    recorded = bundle.metadata.runtime
    if runtime == "float32" or recorded is None:
        return Analyser(bundle.model, positive_index)
    try:
        return Analyser(bundle.model, positive_index, onnx_forward(_usable_graph(bundle), threads or forward_threads()), RUNTIME)
    except RuntimeUnavailable as exc:
        _say_once(f"{bundle.uri}: running its Keras network (float32) instead of {recorded['name']}: {exc}")
        return Analyser(bundle.model, positive_index)


class RuntimeUnavailable(Exception):
    pass


def _usable_graph(bundle: Bundle) -> bytes:
    """The bundle's analysis graph, if this version and machine can run the runtime its bundle.json records;
    RuntimeUnavailable says why not."""
    import hashlib

    recorded = bundle.metadata.runtime
    if recorded["name"] != RUNTIME:
        raise RuntimeUnavailable(f"this version of skin-ray runs {RUNTIME}, not {recorded['name']}")
    if missing := missing_cpu_features(recorded["cpu_features"]):
        raise RuntimeUnavailable(f"this CPU lacks {', '.join(missing)}")
    if recorded["model_sha256"] != bundle.model_sha256:
        raise RuntimeUnavailable("its analysis graph was exported from another model.keras; `skin-ray optimize` exports it anew")
    if bundle.analysis_graph is None or hashlib.sha256(bundle.analysis_graph).hexdigest() != recorded["sha256"]:
        raise RuntimeUnavailable("its analysis graph is missing or not the one validated; `skin-ray optimize` exports it anew")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed") from None
    return bundle.analysis_graph


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


class Predictor:
    """A bundle's predictions, its network run by `analyser` (by default the runtime `analyser_for` chooses)."""

    def __init__(self, bundle: Bundle, analyser: Analyser | None = None, runtime: str = "auto", threads: int | None = None):
        self.bundle = bundle
        self.metadata = bundle.metadata
        self.analyse = analyser or analyser_for(bundle, runtime, threads)  # preprocessed images -> Analysis

    @classmethod
    def from_bundle(cls, uri: str | None = None, runtime: str = "auto", threads: int | None = None) -> Predictor:
        return cls(load_bundle(uri), runtime=runtime, threads=threads)

    @property
    def model_version(self) -> str:
        return self.metadata.model_version

    def decode_pixels(self, data: bytes) -> np.ndarray:
        """Image bytes as this bundle's input pixels: `skin_ray.preprocess.decode_pixels` at its input size."""
        return self.metadata.input_spec.pixels(data)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), for a batch of preprocessed images."""
        return self.analyse(images).probabilities

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of uint8 pixels from `decode_pixels`."""
        return self.predict_arrays(to_model_input(pixels))

    def cancer_probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict_arrays(images)[:, self.metadata.positive_index]

    def to_prediction(self, probabilities: np.ndarray) -> Prediction:
        """One row of class probabilities -> the label decided by the bundle's threshold (not argmax)."""
        names = self.metadata.class_names
        cancer = float(probabilities[self.metadata.positive_index])
        label = self.metadata.positive_class if cancer >= self.metadata.threshold else self.negative_class
        return Prediction(label, cancer, {name: float(p) for name, p in zip(names, probabilities, strict=True)})

    @property
    def negative_class(self) -> str:
        return next(name for name in self.metadata.class_names if name != self.metadata.positive_class)

    @functools.cached_property
    def explainer(self) -> Explainer:
        return Explainer(self.bundle.model, self.metadata.positive_index)

    def explain(self, images: np.ndarray) -> tuple[dict, np.ndarray | None]:
        """The record of one preprocessed image (shape (1, h, w, 3)) and its Grad-CAM map for the predicted
        label; no map when the input gate refused the image."""
        (record,) = self.records(images)
        if record["label"] is None:
            return record, None
        return record, self.explainer.heatmaps(images, np.array([record["label"] == self.metadata.positive_class]))[0]

    def records(self, images: np.ndarray, errors: Sequence[str] | None = None) -> list[dict]:
        """One prediction record per image, with the fields of `skin_ray.record.RECORD_FIELDS`, in every path.

        `errors[i]` ("reason: detail", empty when fine) marks an image that could not be read; its record
        carries the error and no prediction. An image the input gate refuses gets `in_distribution: false`
        and the reason `out_of_distribution` instead of a label: an answer, not a failure. Without a gate
        or margin in the bundle, `in_distribution` / `uncertain` are null (not checked).
        """
        errors = list(errors) if errors is not None else [""] * len(images)
        ok = np.array([not error for error in errors], dtype=bool)
        return self.to_records(self.analyse(images[ok]), errors)

    def error_record(self, error: str) -> dict:
        """The record of an image that could not be read: `error` ("reason: detail") and no prediction."""
        return error_record(error, self.metadata.threshold, self.model_version)

    def decide(self, analysis: Analysis) -> Decisions:
        """The label, the gate's and the margin's decisions on each image of `analysis`."""
        p_cancer = analysis.probabilities[:, self.metadata.positive_index]
        threshold, gate, uncertainty = self.metadata.threshold, self.bundle.gate, self.metadata.uncertainty
        scores = gate.scores(analysis.gate_inputs) if gate else None
        disagree = members_disagree(analysis.member_cancer, threshold, len(p_cancer))
        return Decisions(
            p_cancer, p_cancer >= threshold, scores, None if gate is None else scores > gate.threshold,
            is_uncertain(p_cancer, threshold, uncertainty["margin"], disagree) if uncertainty else None,
        )

    def to_records(self, analysis: Analysis, errors: Sequence[str]) -> list[dict]:
        """`records` for an analysis already made of the images whose `errors` entry is empty."""
        decisions = self.decide(analysis)
        scores, gate = decisions.ood_score, self.bundle.gate
        records, row = [], 0
        for error in errors:
            if error:
                records.append(self.error_record(error))
                continue
            record = {**dict.fromkeys(RECORD_FIELDS), "threshold": self.metadata.threshold, "model_version": self.model_version}
            if gate:
                record.update(in_distribution=not decisions.refused[row], ood_score=float(scores[row]))
            if record["in_distribution"] is False:
                record.update(
                    error=f"{OUT_OF_DISTRIBUTION}: not like the dermoscopic images this model was trained on "
                    f"(score {scores[row]:.2f}, accepted up to {gate.threshold:.2f}); no prediction is made",
                    error_reason=OUT_OF_DISTRIBUTION,
                )
            else:
                prediction = self.to_prediction(analysis.probabilities[row])
                record.update(
                    label=prediction.label, cancer_probability=prediction.cancer_probability,
                    probabilities=prediction.probabilities,
                    uncertain=None if decisions.uncertain is None else bool(decisions.uncertain[row]),
                    member_probabilities=None if analysis.member_cancer is None else analysis.member_cancer[row].tolist(),
                )
            records.append(record)
            row += 1
        return records
