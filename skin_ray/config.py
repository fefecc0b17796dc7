"""Settings for each job, as typed models with defaults that run on a laptop.

The same fields are reachable from Python, from `skin-ray` flags (generated from these definitions) and,
for serving, from the Serve config's `args` (deployments/serve_config.yaml). Importing this module is cheap:
no TensorFlow, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field


@dataclass
class TrainConfig:
    """Everything `skin-ray train` can set. Defaults run on a laptop."""

    data: str
    output: str
    arch: str = "default"
    workers: int = 2
    epochs: int = 40
    batch_size: int = 32  # global: split evenly across workers
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    validation_fraction: float = 0.2
    target_sensitivity: float = 0.90
    subset: str | None = None  # train only on images inside sub-folders of this name, e.g. "Training"
    storage_path: str = "~/skin_ray_runs"  # Ray Train checkpoints; local path or s3://
    run_name: str | None = None
    max_failures: int = 3  # restarts from the last checkpoint after a worker dies
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # SPREAD places workers on different nodes
    resources_timeout_s: float = 120.0  # fail rather than wait forever for workers' CPUs

    def __post_init__(self):
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")


@dataclass
class ClassifyConfig:
    """Everything `skin-ray classify` can set."""

    source: str
    output: str
    model: str | None = None  # bundle; None = the shipped model
    format: str = "parquet"  # parquet, csv or jsonl
    batch_size: int = 32
    workers: int = 2  # classifier actors (each loads the model once)
    cpus_per_actor: float = 0.5  # fractional, so a Serve replica or trainer elsewhere cannot starve the pool
    max_file_mb: float = 50.0  # larger files become error rows without being read
    rows_per_file: int = 5000  # output file granularity: what an interruption can lose per writer
    resume: bool = False  # skip files already in the output

    def __post_init__(self):
        if self.format not in ("parquet", "csv", "jsonl"):
            raise ValueError(f"--format must be parquet, csv or jsonl, not {self.format!r}")


class ServeSettings(BaseModel):
    """The app builder's arguments: the same fields in `deployments/serve_config.yaml`, `skin-ray serve`
    flags and Python."""

    model: str | None = Field(None, description="bundle directory or s3:// prefix; None = the shipped model")
    max_batch_size: int = Field(32, ge=1, description="largest batch the model replica forms")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    max_upload_mb: float = Field(10.0, gt=0, description="largest request body accepted")
    max_batch_files: int = Field(16, ge=1, description="most files in one /predict/batch request")
