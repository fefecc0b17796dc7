"""The versioned model bundle: what every job needs to use a trained model correctly.

A bundle is a directory, local or under an `s3://` prefix:

    model.keras     the Keras model (inference graph only; calibration folded into its last layer)
    bundle.json     format version, class names in output-index order, positive class, input size,
                    preprocessing id, decision threshold, validation metrics, training config, data
                    fingerprint, creation time, package version
    train_images.sha256
                    the content hash of every training image, one per line (optional): how `evaluate`
                    knows which of the images it scores the model has seen
    input_gate.npz  the input gate's class means and precision matrix at each depth, its evidence range and head
                    (optional; its method, threshold and figures are in bundle.json, see skin_ray/safeguards.py)
    drift_reference.npz
                    each drift statistic's values on the validation split (optional; the rates are in
                    bundle.json, see skin_ray/drift.py)
    analysis.onnx   the analysis pass exported for a faster runtime (optional; written by `skin-ray optimize`,
                    which records in bundle.json the runtime, its digest, the CPU features it needs and how
                    closely it matched the Keras network on the validation split, see skin_ray/optimize.py)

Loading refuses bundles of another format or preprocessing recipe, and uses Keras safe mode, so a bundle
cannot run arbitrary code.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import skin_ray
from skin_ray import storage
from skin_ray.data import POSITIVE_CLASS
from skin_ray.drift import DriftReference
from skin_ray.preprocess import InputSpec, preprocessing_id
from skin_ray.safeguards import InputGate

if TYPE_CHECKING:  # Keras is imported where a model is loaded: reading a bundle's description needs no TensorFlow
    import keras

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "bundle.json"
TRAIN_DIGESTS_FILE = "train_images.sha256"
VALIDATION_DIGESTS_FILE = "validation_images.sha256"
GATE_FILE = "input_gate.npz"
DRIFT_FILE = "drift_reference.npz"
ANALYSIS_FILE = "analysis.onnx"
# All a bundle may hold: what loading fetches.
BUNDLE_FILES = (MODEL_FILE, METADATA_FILE, TRAIN_DIGESTS_FILE, VALIDATION_DIGESTS_FILE, GATE_FILE, DRIFT_FILE, ANALYSIS_FILE)
DEFAULT_BUNDLE = str(Path(__file__).parent / "bundles" / "default")


class BundleError(ValueError):
    pass


@dataclass
class BundleMetadata:
    model_version: str
    arch: str
    class_names: list[str]
    positive_class: str
    threshold: float
    target_sensitivity: float
    metrics: dict
    training: dict
    data: dict
    # Height, width and channels of the network's input, what callers decode images to (`input_spec`), and the
    # recipe's name for it; loading checks both.
    input_size: list[int]
    preprocessing: str
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    package_version: str = skin_ray.__version__
    input_gate: dict | None = None  # method, threshold, validation figures; None: no gate
    uncertainty: dict | None = None  # method, margin, validation figures; None: no flag
    drift_reference: dict | None = None  # method, rates, sizes; None: nothing to compare drift with
    runtime: dict | None = None  # name, digests, CPU features, validation figures; None: the Keras network only

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def image_size(self) -> int:
        """The side of the square images the network takes, in pixels (`decode_pixels`' `size`)."""
        return self.input_size[0]

    @property
    def input_spec(self) -> InputSpec:
        """How every job makes an image into this bundle's input."""
        return InputSpec(self.image_size)


def describe_bundle(
    model: keras.Model, arch: str, split, threshold: float, target_sensitivity: float, bundle_metrics: dict,
    training: dict,
) -> BundleMetadata:
    """The bundle.json of a calibrated model trained on `split` (a `skin_ray.data.Split`); its version names
    the architecture, the day and the weights."""
    weights_digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()
    input_size = list(model.input_shape[1:])
    return BundleMetadata(
        model_version=f"{arch}-{time.strftime('%Y%m%d')}-{weights_digest[:10]}",
        arch=arch,
        class_names=list(split.train.class_names),
        positive_class=POSITIVE_CLASS,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        metrics=bundle_metrics,
        training=training,
        data=split.describe(),
        input_size=input_size,
        preprocessing=preprocessing_id(input_size[0]),
    )


@dataclass
class Bundle:
    model: keras.Model
    metadata: BundleMetadata
    uri: str
    train_digests: frozenset[str] = frozenset()  # empty when the bundle does not record them
    validation_digests: frozenset[str] = frozenset()  # likewise; recorded since splits are grouped by lesion
    gate: InputGate | None = None
    drift: DriftReference | None = None
    model_sha256: str = ""  # of model.keras as loaded: a runtime records the model it was exported from
    analysis_graph: bytes | None = None  # analysis.onnx, when bundle.json names a runtime


def save_bundle(
    model: keras.Model, metadata: BundleMetadata, uri: str, digests: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
    gate: InputGate | None = None, drift: DriftReference | None = None,
) -> None:
    """Write a bundle; `digests`, the content hashes of its training and validation images, record its split, so
    that later commands find it again without re-deriving the grouping."""
    with tempfile.TemporaryDirectory() as staging:
        model.save(Path(staging, MODEL_FILE))
        for name, recorded in zip((TRAIN_DIGESTS_FILE, VALIDATION_DIGESTS_FILE), digests, strict=True):
            if recorded:
                Path(staging, name).write_text("".join(f"{digest}\n" for digest in sorted(recorded)))
        _write_description(staging, metadata, gate, drift)
        storage.upload_dir(staging, uri)


def write_safeguards(metadata: BundleMetadata, gate: InputGate, drift: DriftReference | None, uri: str) -> None:
    """Rewrite an existing bundle's bundle.json, input gate and drift reference; its model file stays as it is."""
    with tempfile.TemporaryDirectory() as staging:
        _write_description(staging, metadata, gate, drift)
        storage.upload_dir(staging, uri)


def write_runtime(metadata: BundleMetadata, graph: bytes, uri: str) -> None:
    """Add an exported analysis graph to an existing bundle, with the bundle.json describing it (`metadata.runtime`)."""
    with tempfile.TemporaryDirectory() as staging:
        Path(staging, ANALYSIS_FILE).write_bytes(graph)
        _write_description(staging, metadata, None, None)
        storage.upload_dir(staging, uri)


def _write_description(directory: str, metadata: BundleMetadata, gate: InputGate | None, drift: DriftReference | None) -> None:
    if drift is not None:
        metadata.drift_reference = drift.describe()
        np.savez(Path(directory, DRIFT_FILE), **drift.arrays())
    Path(directory, METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
    if gate is not None:
        np.savez(Path(directory, GATE_FILE), **gate.arrays())


def load_bundle(uri: str | None = None, safeguards: bool = True) -> Bundle:
    """Load the bundle at `uri` (a local directory or S3 prefix); the shipped default when None. Without
    `safeguards`, its input gate and drift reference are not read (for refitting them)."""
    uri = uri or DEFAULT_BUNDLE
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory() as local:
            storage.download_files(uri, BUNDLE_FILES, local)  # never what else the prefix holds
            return _load_local(local, uri, safeguards)
    return _load_local(uri, uri, safeguards)


def read_metadata(uri: str | None = None) -> BundleMetadata:
    """The bundle.json of the bundle at `uri` (the shipped default when None), checked, without its model:
    for what only needs the description (the input size to decode to, say)."""
    uri = uri or DEFAULT_BUNDLE
    return _read_metadata(uri, uri)


def read_drift_reference(uri: str | None = None) -> DriftReference | None:
    """The drift reference of the bundle at `uri` without its model (None when it has none)."""
    uri = uri or DEFAULT_BUNDLE
    metadata = read_metadata(uri)
    if metadata.drift_reference is None:
        return None
    return _drift_reference(storage.read_bytes(storage.join(uri, DRIFT_FILE)), metadata, uri)


def _drift_reference(data: bytes, metadata: BundleMetadata, uri: str) -> DriftReference:
    try:
        with np.load(io.BytesIO(data)) as arrays:
            return DriftReference.load(arrays, metadata.drift_reference)
    except (KeyError, ValueError, OSError) as exc:
        raise BundleError(f"{uri}: its {DRIFT_FILE} does not hold the drift reference ({exc}); `skin-ray fit-safeguards` "
                          "refits it") from None


def _read_metadata(location: str, uri: str) -> BundleMetadata:
    """The checked bundle.json at `location`, the bundle at `uri` or a local copy of it."""
    try:
        raw = json.loads(storage.read_bytes(storage.join(location, METADATA_FILE)))
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{uri} is not a model bundle: {METADATA_FILE} is missing") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{uri} has bundle format {raw.get('format_version')}, this version reads {FORMAT_VERSION}")
    try:
        metadata = BundleMetadata(**raw)
    except TypeError as exc:  # a field missing or unknown
        raise BundleError(f"{uri}: its {METADATA_FILE} is not one this version reads ({exc})") from None
    if metadata.runtime is not None:
        _check_runtime(metadata.runtime, uri)
    if metadata.preprocessing != (recipe := metadata.input_spec.preprocessing):
        raise BundleError(
            f"{uri} was trained with preprocessing {metadata.preprocessing!r}, this version has {recipe!r} for its input size"
        )
    return metadata


RUNTIME_FIELDS = {"name": str, "sha256": str, "model_sha256": str, "cpu_features": list, "validation": dict, "bounds": dict}
CPU_FEATURE = re.compile(r"[a-z0-9_]{1,32}")  # a flag as /proc/cpuinfo names it


def _check_runtime(runtime, uri: str) -> None:
    """Refuse a bundle.json whose `runtime` is not what `skin-ray optimize` writes (its fields are compared with
    files and this CPU's flags, so their types and sizes are checked first)."""
    if not isinstance(runtime, dict):
        raise BundleError(f"{uri}: its bundle.json's runtime is not an object; `skin-ray optimize` rewrites it")
    problems = [name for name, kind in RUNTIME_FIELDS.items() if not isinstance(runtime.get(name), kind)]
    if not problems:
        features = runtime["cpu_features"]
        if len(features) > 16 or not all(isinstance(f, str) and CPU_FEATURE.fullmatch(f) for f in features):
            problems.append("cpu_features")
        problems += [name for name in ("sha256", "model_sha256") if not re.fullmatch(r"[0-9a-f]{64}", runtime[name])]
    if problems:
        raise BundleError(f"{uri}: its bundle.json's runtime is malformed ({', '.join(problems)}); "
                          "`skin-ray optimize` rewrites it")


def _load_local(directory: str, uri: str, safeguards: bool) -> Bundle:
    metadata = _read_metadata(directory, uri)
    import keras

    from skin_ray.model import ShadesOfGray  # noqa: F401  (registers the custom layer for loading)

    model_bytes = Path(directory, MODEL_FILE).read_bytes()
    model = keras.saving.load_model(Path(directory, MODEL_FILE), compile=False, safe_mode=True)
    if list(model.input_shape[1:]) != metadata.input_size:
        raise BundleError(f"{uri}: its network takes {model.input_shape[1:]} inputs, its bundle.json says {metadata.input_size}")
    train_digests, validation_digests = (
        frozenset(Path(directory, name).read_text().split()) if Path(directory, name).is_file() else frozenset()
        for name in (TRAIN_DIGESTS_FILE, VALIDATION_DIGESTS_FILE)
    )
    gate = None
    if safeguards and metadata.input_gate is not None:
        if not Path(directory, GATE_FILE).is_file():
            raise BundleError(f"{uri} describes an input gate but {GATE_FILE} is missing; `skin-ray fit-safeguards` refits it")
        try:
            with np.load(Path(directory, GATE_FILE)) as arrays:
                gate = InputGate.from_arrays(arrays, metadata.input_gate["threshold"])
        except (KeyError, ValueError, OSError) as exc:
            raise BundleError(f"{uri}: its {GATE_FILE} does not hold this version's input gate ({exc}); "
                              "`skin-ray fit-safeguards` refits it") from None
    drift = None
    if safeguards and metadata.drift_reference is not None:
        if not Path(directory, DRIFT_FILE).is_file():
            raise BundleError(
                f"{uri} describes a drift reference but {DRIFT_FILE} is missing; `skin-ray fit-safeguards` refits it"
            )
        drift = _drift_reference(Path(directory, DRIFT_FILE).read_bytes(), metadata, uri)
    graph_path = Path(directory, ANALYSIS_FILE)
    graph = graph_path.read_bytes() if metadata.runtime is not None and graph_path.is_file() else None
    return Bundle(model=model, metadata=metadata, uri=uri, train_digests=train_digests,
                  validation_digests=validation_digests, gate=gate, drift=drift,
                  model_sha256=hashlib.sha256(model_bytes).hexdigest(), analysis_graph=graph)
