"""Shared fixtures: one real local Ray per session, a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skin_ray.testing import free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Several TensorFlow processes share two cores during the tests.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "2")
# The tests' own Ray listens on loopback only. Without token auth there, the Ray CLIs the tests start
# (`ray job submit`, `serve run`) and the Ray they talk to agree, whatever the shell exported.
os.environ["RAY_AUTH_MODE"] = "disabled"


def pytest_collection_modifyitems(items):
    """Mark `ray` every test that starts the session's Ray (every fixture that does depends on ray_context);
    tests that start Ray or a service in a subprocess carry the mark themselves. `-m "not ray"` is the fast
    tier."""
    for item in items:
        if "ray_context" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback; the standard AWS variables point every process at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="test-key-id",
        AWS_SECRET_ACCESS_KEY="test-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_context(s3_endpoint):
    """The session's local Ray, with Serve's fast path as `skin-ray` starts it. Started after the S3 variables
    are set, so its workers inherit them."""
    import ray

    from skin_ray.runtime import MIN_LOCAL_CPUS, use_serve_fast_path

    use_serve_fast_path()
    # Metrics exported each second, not every ten: tests that read the service's gauges wait for the next export.
    # (The session's Ray only: the `skin-ray` processes the tests start run Ray as shipped.)
    context = ray.init(num_cpus=MIN_LOCAL_CPUS, include_dashboard=True, _system_config={"metrics_report_interval_ms": 1000})
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_context):
    import ray

    return ray


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh, empty bucket named after the test."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def lesion_tree(tmp_path_factory) -> Path:
    """A learnable two-class tree: 120 generated images per class."""
    from skin_ray.testing import write_lesion_tree

    return write_lesion_tree(tmp_path_factory.mktemp("lesions"), per_class=120)


def _write_untrained_bundle(path: Path, size: int, model_version: str) -> Path:
    """A bundle around a freshly initialised default model taking `size`-pixel images."""
    import keras

    from skin_ray.bundle import BundleMetadata, save_bundle
    from skin_ray.model import make_model
    from skin_ray.preprocess import preprocessing_id

    keras.utils.set_random_seed(1)
    metadata = BundleMetadata(
        model_version=model_version,
        arch="default",
        class_names=["Cancer", "Non_Cancer"],
        positive_class="Cancer",
        threshold=0.5,
        target_sensitivity=0.9,
        metrics={},
        training={},
        data={},
        input_size=[size, size, 3],
        preprocessing=preprocessing_id(size),
    )
    save_bundle(make_model("default", size), metadata, str(path))
    return path


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> Path:
    """A bundle around a freshly initialised default model: fast, for mechanics that need any bundle."""
    from skin_ray.preprocess import IMAGE_SIZE

    return _write_untrained_bundle(tmp_path_factory.mktemp("bundle") / "untrained", IMAGE_SIZE, "untrained-test")


@pytest.fixture(scope="session")
def small_input_bundle(tmp_path_factory) -> Path:
    """The untrained bundle at another input size (96 pixels): every path must decode to the bundle's size."""
    return _write_untrained_bundle(tmp_path_factory.mktemp("bundle") / "untrained-96", 96, "untrained-96-test")


@pytest.fixture(scope="session")
def optimized_bundle(untrained_bundle, tmp_path_factory) -> Path:
    """A copy of the untrained bundle carrying its faster runtime, accepted on generated lesions."""
    import shutil

    from skin_ray.bundle import load_bundle
    from skin_ray.optimize import add_runtime
    from skin_ray.testing import generated_validation

    path = tmp_path_factory.mktemp("optimized") / "untrained"
    shutil.copytree(untrained_bundle, path)
    images, is_cancer = generated_validation(170, count=96)
    add_runtime(load_bundle(str(path)), str(path), [(images, is_cancer)])
    return path


@pytest.fixture(scope="session")
def shipped():
    """A Predictor of the shipped bundle's Keras network (the reference its recorded figures describe), loaded once
    for the session."""
    from skin_ray.predictor import Predictor

    return Predictor.from_bundle(runtime="float32")


@pytest.fixture(scope="session")
def guarded_bundle(small_input_bundle, tmp_path_factory) -> Path:
    """The untrained 96-pixel bundle with an input gate, an uncertainty margin and a drift reference fitted on
    generated lesions (160 as its training split, 120 as its validation split), as a bundle made from a real split
    gets them, for tests of the prediction record's safeguards and of drift."""
    import shutil

    import numpy as np

    from skin_ray.bundle import write_safeguards
    from skin_ray.drift import image_statistics
    from skin_ray.finalize import SafeguardInputs, fit_safeguards_on, outlier_inputs
    from skin_ray.predictor import Predictor
    from skin_ray.preprocess import image_megapixels, to_model_input
    from skin_ray.testing import encode, guarded_bundle_lesions

    path = tmp_path_factory.mktemp("guarded") / "bundle"
    shutil.copytree(small_input_bundle, path)
    labels, images = guarded_bundle_lesions()
    files = [encode(image) for image in images]
    predictor = Predictor.from_bundle(str(path))
    pixels = np.stack([predictor.decode_pixels(data) for data in files])
    analysis = predictor.analyse(to_model_input(pixels))
    train, validation = slice(0, 160), slice(160, None)
    outliers, kinds, sources = outlier_inputs(predictor.analyse, pixels[train][::8])
    image = image_statistics(pixels[validation], np.array([image_megapixels(data) for data in files[validation]]))
    metadata = predictor.metadata
    inputs = SafeguardInputs(
        analysis.gate_inputs.take(train), labels[train], np.arange(160), outliers, kinds, sources,
        analysis.gate_inputs.take(validation),
        np.array([f"generated/{i}.jpg" for i in range(160, len(files))]), labels[validation] == 0,
        analysis.probabilities[validation, 0], None, image,
    )
    gate, metadata.input_gate, metadata.uncertainty, drift = fit_safeguards_on(inputs, metadata.threshold)
    write_safeguards(metadata, gate, drift, str(path))
    return path
