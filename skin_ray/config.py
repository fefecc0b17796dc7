"""Settings for each job, as typed models with defaults that run on a laptop.

The same fields are reachable from Python, from `skin-ray` flags (generated from these definitions) and,
for serving, from the Serve config's `args` (deployments/serve_config.yaml). Importing this module is cheap:
no TensorFlow, no Ray.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

TARGET_SENSITIVITY = 0.90  # for Cancer, on validation: what a bundle's decision threshold must keep


def _setting(default, help: str):
    """A dataclass field whose `help` is what `skin-ray --help` shows for it; MISSING makes it required."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything `skin-ray train` can set."""

    data: str = _setting(MISSING, "labelled image tree: a directory or s3://bucket/prefix with Cancer/ and Non_Cancer/")
    output: str = _setting(MISSING, "where to write the bundle (directory or s3:// prefix)")
    arch: str = _setting("default", "default (ours, residual), plain (ours, plain stages) or seed (the original notebook CNN)")
    workers: int = _setting(2, "Ray Train workers (MultiWorkerMirroredStrategy replicas)")
    epochs: int = _setting(40, "passes over the training split")
    batch_size: int = _setting(32, "global batch size, split evenly across workers")
    learning_rate: float = _setting(2e-3, "peak AdamW learning rate (warm-up, then cosine decay)")
    weight_decay: float = _setting(1e-4, "AdamW weight decay")
    seed: int = _setting(0, "random seed for initialisation and augmentation")
    validation_fraction: float = _setting(0.2, "share of distinct images held out, chosen by content hash")
    target_sensitivity: float = _setting(TARGET_SENSITIVITY, "Cancer sensitivity the decision threshold must keep on validation")
    subset: str | None = _setting(None, "train only on images inside sub-folders of this name, e.g. Training")
    storage_path: str = _setting("~/skin_ray_runs", "Ray Train run and checkpoint storage (local path or s3://)")
    run_name: str | None = _setting(None, "name of the run under --storage-path (default: arch and time)")
    max_failures: int = _setting(3, "restarts from the last checkpoint after a worker dies")
    cpus_per_worker: float = _setting(1.0, "CPUs reserved for each worker")
    placement_strategy: str = _setting("PACK", "PACK, or SPREAD to place workers on different nodes")
    resources_timeout_s: float = _setting(120.0, "give up if the workers' CPUs are not free within this many seconds")

    def __post_init__(self):
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")


@dataclass
class ClassifyConfig:
    """Everything `skin-ray classify` can set."""

    source: str = _setting(MISSING, "directory or s3://bucket/prefix, searched recursively for images")
    output: str = _setting(MISSING, "directory or s3:// prefix for the results")
    model: str | None = _setting(None, "bundle directory or s3:// prefix (default: the shipped model)")
    format: str = _setting("parquet", "parquet, csv or jsonl")
    batch_size: int = _setting(32, "images per model call")
    workers: int = _setting(2, "classifier actors; each loads the model once")
    cpus_per_actor: float = _setting(0.5, "fractional, so a Serve replica or a trainer elsewhere cannot starve the pool")
    max_file_mb: float = _setting(50.0, "files larger than this become error rows without being read")
    rows_per_file: int = _setting(5000, "most rows in one output file")
    flush_interval_s: float = _setting(10.0, "write the rows finished so far at least this often: what a killed job can lose")
    resume: bool = _setting(False, "skip files already present in the output's results")
    explain: str | None = _setting(
        None, "directory or s3:// prefix for a Grad-CAM overlay of every classified image, named in the `explanation` "
        "column (a gradient pass and a second read per image)",
    )

    def __post_init__(self):
        if self.format not in ("parquet", "csv", "jsonl"):
            raise ValueError(f"--format must be parquet, csv or jsonl, not {self.format!r}")


class ServeSettings(BaseModel):
    """The app builder's arguments: the same fields in `deployments/serve_config.yaml`, `skin-ray serve`
    flags and Python."""

    model: str | None = Field(None, description="bundle directory or s3:// prefix; None = the shipped model")
    layout: Literal["fused", "split"] = Field(
        "fused",
        description="fused: one deployment decodes, batches and predicts (fastest on one node); split: Ingress "
        "replicas decode and batch, SkinModel replicas predict (decoding and the model scale apart on a cluster)",
    )
    max_batch_size: int = Field(32, ge=1, description="most images in one forward pass")
    batch_wait_timeout_s: float = Field(
        0.1, ge=0, description="longest a batch waits for images still being decoded (it never waits when none are)"
    )
    decode_threads: int = Field(2, ge=1, description="threads decoding uploads in each Ingress replica")
    max_pending_images: int = Field(
        256, ge=1, description="images decoding or waiting for the model per Ingress replica; beyond it, 503"
    )
    max_upload_mb: float = Field(10.0, gt=0, description="largest request body accepted")
    max_batch_files: int = Field(16, ge=1, description="most files in one /predict/batch request")
    upload_timeout_s: float = Field(
        60.0, gt=0, description="longest a request body may take to arrive; a slower one is cut with 408"
    )
    max_concurrent_uploads: int = Field(
        128, ge=1, description="request bodies in progress per Ingress replica beyond which each new one cuts the "
        "slowest of them (408)",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on a stop or a redeploy, how long a replica goes on finishing the requests it "
        "received (new ones get 503) before it is stopped",
    )


_SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside a checkout of this repository


class Locations(BaseModel):
    """Where the tests and benchmarks find what does not ship with the package. Each field is overridden by
    the environment variable SKIN_RAY_<FIELD>, e.g. SKIN_RAY_DATA=/data/skin_isic."""

    data: Path = Field(
        _SHARED / "datasets" / "skin_isic",
        description="the labelled ISIC images (Cancer/, Non_Cancer/): real-data tests skip and benchmarks fall "
        "back to generated images without them",
    )
    kuberay_schemas: Path = Field(
        _SHARED / "schemas" / "kuberay", description="KubeRay's CRD schemas: the manifest validation test skips without them"
    )
    peers: Path = Field(_SHARED / "peers", description="the peer-server harness that `serve_bench.py --peers` runs")

    @classmethod
    def from_environment(cls) -> Locations:
        return cls(**{name: os.environ[var] for name in cls.model_fields if (var := f"SKIN_RAY_{name.upper()}") in os.environ})
