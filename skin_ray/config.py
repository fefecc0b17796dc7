"""Settings of every command, as pydantic models with defaults that run on a laptop.

The same fields are reachable from Python, from `skin-ray` flags (generated from these models: each field's
description is its --help) and, for serving, from the Serve config's `args` (deployments/serve_config.yaml).
A parameter naming a model bundle (directory or s3:// prefix) is called `bundle` everywhere. Importing this
module is cheap: no TensorFlow, no Ray.
"""

from __future__ import annotations

import math
import os
import re
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from skin_ray.preprocess import IMAGE_SIZE, InputSpec

TARGET_SENSITIVITY = 0.90  # for Cancer, on validation: what a bundle's decision threshold must keep

# Each choice is listed once, here; the modules that act on a choice key their tables by these names.
Arch = Literal["default", "plain", "seed"]
OutputFormat = Literal["parquet", "csv", "jsonl"]
Layout = Literal["fused", "split"]
EvaluationSplit = Literal["all", "validation"]
Runtime = Literal["auto", "float32"]

PRIMARY_VERSION = "default"  # the name of a served bundle given without one
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _bundle_field(description: str = "bundle directory or s3:// prefix (default: the shipped model)"):
    # `model` was this parameter's name before 0.2; Serve configs written then still load.
    return Field(None, description=description, validation_alias=AliasChoices("bundle", "model"))


def _runtime_field():
    return Field(
        "auto", description="auto: the faster runtime `skin-ray optimize` validated for the bundle, where this machine "
        "can run it (else the Keras network, said once); float32: the bundle's Keras network itself, the reference",
    )


class Settings(BaseModel):
    """Unknown fields are errors: a misspelt YAML key or keyword must not be ignored silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ThresholdSettings(Settings):
    """How a command that makes a bundle chooses its decision threshold on the validation split."""

    target_sensitivity: float = Field(
        TARGET_SENSITIVITY, gt=0, lt=1, description="Cancer sensitivity the decision threshold must keep on new images"
    )
    sensitivity_confidence: float = Field(
        0.95, gt=0, lt=1, description="probability that the sensitivity on new images of the kind validated on is at "
        "least --target-sensitivity (a lower confidence bound; 0.5 about fits the validation split exactly)",
    )


class GateSettings(Settings):
    """What a command that fits an input gate fits it against, beside the images it generates."""

    outliers: str | None = Field(
        None, description="folder (or s3:// prefix) of real images that are not dermoscopy, one sub-folder per kind, "
        "with an optional SOURCES.tsv (file, repository): the input gate is fitted against them too, and its figures "
        "are measured leaving each source out",
    )


class TrainingRecipe(ThresholdSettings, GateSettings):
    """What training a network takes, whatever its targets: labels (`train`) or a teacher's (`distill`)."""

    arch: Arch = Field(
        "default", description="default (ours, residual), plain (ours, plain stages) or seed (the original notebook CNN)"
    )
    input_size: int = Field(
        IMAGE_SIZE, ge=32, description="side of the network's square input in pixels (the ISIC images are 224); "
        "the bundle records it and every command that uses the bundle decodes images to it",
    )
    workers: int = Field(2, ge=1, description="Ray Train workers (MultiWorkerMirroredStrategy replicas)")
    epochs: int = Field(40, ge=1, description="passes over the training split")
    batch_size: int = Field(32, ge=1, description="global batch size, split evenly across workers")
    learning_rate: float = Field(2e-3, gt=0, description="peak AdamW learning rate (warm-up, then cosine decay)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    seed: int = Field(0, description="random seed for initialisation and augmentation")
    storage_path: str = Field("~/skin_ray_runs", description="Ray Train run and checkpoint storage (local path or s3://)")
    run_name: str | None = Field(None, description="name of the run under --storage-path (default: arch and time)")
    max_failures: int = Field(3, ge=0, description="restarts from the last checkpoint after a worker dies")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved for each worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="PACK, or SPREAD to place workers on different nodes"
    )
    resources_timeout_s: float = Field(
        120.0, gt=0, description="give up if the workers' CPUs are not free within this many seconds"
    )
    precision: Literal["float32", "mixed_bfloat16"] = Field(
        "float32", description="mixed_bfloat16: the network computes in bfloat16 (weights stay float32), about 1.35x "
        "faster per step on CPUs with AMX or AVX512-BF16 (measured here); other CPUs emulate bfloat16",
    )
    decode_every_epoch: bool = Field(
        False, description="decode the images again every epoch instead of once per run (which keeps their pixels, "
        "87 KB an image, in Ray's object store): for training sets the object store and its spill cannot hold",
    )

    @property
    def input_spec(self) -> InputSpec:
        """How the run decodes its images: the bundle it writes records it."""
        return InputSpec(self.input_size)

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainingRecipe:
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        return self


# Data trees, one or more: a single one (as YAML and keywords named it before several were taken) is a list of one.
DataTrees = Annotated[list[str], BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


def _moved_data_field():
    return Field(None, description="the bundle's labelled image trees, in the order it recorded them, if they moved "
                 "since it was trained")


class TrainSettings(TrainingRecipe):
    """`skin-ray train`."""

    data: DataTrees = Field(description="labelled image trees, one or more: directories or s3://bucket/prefix, each with "
                            "Cancer/ and Non_Cancer/; their images are read as one set")
    output: str = Field(description="where to write the bundle (directory or s3:// prefix)")
    metadata: list[str] = Field([], description="CSV tables of per-image metadata, as ROOT=TABLE (the table's `file`, "
                                "`relpath` or `path` column is relative to ROOT, one of the data trees) or TABLE inside "
                                "its tree; their group column keeps a lesion's images on one side of the split")
    group_column: str = Field("lesion_id", min_length=1, description="the metadata column naming each image's lesion "
                              "(or any group that must not straddle the split)")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="share of groups (lesions; without metadata, distinct "
                                       "images) held out, chosen by digest")
    subset: str | None = Field(None, description="train only on images inside sub-folders of this name, e.g. Training")

    @field_validator("data")
    @classmethod
    def _some_data(cls, data: list[str]) -> list[str]:
        if not data:
            raise ValueError("name at least one labelled image tree")
        return data


class DistillSettings(TrainingRecipe):
    """`skin-ray distill`: a network trained on a teacher bundle's soft targets and the labels, on the
    teacher's own split."""

    teacher: str = Field(description="the bundle to learn from (directory or s3:// prefix), e.g. an ensemble")
    input_size: int | None = Field(None, ge=32, description="the student's input size: the teacher's (the default), "
                                   "since both see the same augmented images")
    output: str = Field(description="where to write the bundle (directory or s3:// prefix)")
    data: DataTrees | None = _moved_data_field()
    temperature: float = Field(
        2.0, gt=0, description="softens the teacher's and the student's probabilities in the distillation loss"
    )
    teacher_weight: float = Field(
        0.7, ge=0, le=1, description="share of the loss from the teacher's soft targets; the rest from the labels"
    )


class EnsembleSettings(ThresholdSettings, GateSettings):
    """`skin-ray ensemble`."""

    members: list[str] = Field(description="two or more bundles (directories or s3:// prefixes)")
    output: str = Field(description="where to write the ensemble bundle")
    data: DataTrees | None = _moved_data_field()

    @field_validator("members")
    @classmethod
    def _two_or_more(cls, members: list[str]) -> list[str]:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two bundles")
        return members


class FitSafeguardsSettings(GateSettings):
    """`skin-ray fit-safeguards`."""

    bundle: str = Field(
        description="bundle directory or s3:// prefix, rewritten in place (bundle.json, input_gate.npz, drift_reference.npz)"
    )
    data: DataTrees | None = _moved_data_field()


class OptimizeSettings(Settings):
    """`skin-ray optimize`."""

    bundle: str = Field(description="bundle directory or s3:// prefix, rewritten in place (bundle.json, analysis.onnx)")
    data: DataTrees | None = _moved_data_field()


class EvaluateSettings(Settings):
    """`skin-ray evaluate`."""

    data: DataTrees = Field(description="labelled image trees, one or more (directories or s3:// prefixes), scored as one "
                            "set; with several, the summary also has each tree's figures (`by_source`)")
    bundle: str | None = _bundle_field()
    report: str | None = Field(None, description="directory for summary.json, roc.png, confusion.png and calibration.png")
    subset: str | None = Field(None, description="evaluate only images inside sub-folders of this name, e.g. Testing")
    split: EvaluationSplit = Field(
        "all", description="validation: only the images the bundle's content-hash split held out from its training"
    )
    runtime: Runtime = _runtime_field()


class PredictSettings(Settings):
    """`skin-ray predict`."""

    images: list[str] = Field(
        min_length=1, description="image files or folders (searched recursively); local or s3:// (a prefix ends in /)"
    )
    bundle: str | None = _bundle_field()
    runtime: Runtime = _runtime_field()


class ExplainSettings(PredictSettings):
    """`skin-ray explain`."""

    output: str = Field(description="directory for the overlays")


class ClassifySettings(Settings):
    """`skin-ray classify`."""

    source: str = Field(description="directory or s3://bucket/prefix, searched recursively for images")
    output: str = Field(description="directory or s3:// prefix for the results")
    bundle: str | None = _bundle_field()
    runtime: Runtime = _runtime_field()
    format: OutputFormat = Field("parquet", description="parquet, csv or jsonl")
    batch_size: int = Field(32, ge=1, description="images per model call")
    workers: int = Field(2, ge=1, description="classifier actors; each loads the model once")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="fractional, so a Serve replica or a trainer elsewhere cannot starve the pool"
    )
    max_file_mb: float = Field(50.0, gt=0, description="files larger than this become error rows without being read")
    rows_per_file: int = Field(5000, ge=1, description="most rows in one output file")
    flush_interval_s: float = Field(
        10.0, gt=0, description="write the rows finished so far at least this often: what a killed job can lose"
    )
    resume: bool = Field(False, description="skip files already present in the output's results")
    explain: str | None = Field(
        None, description="directory or s3:// prefix for a Grad-CAM overlay of every classified image, named in the "
        "`explanation` column (a gradient pass and a second read per image)",
    )


class DriftSettings(Settings):
    """`skin-ray drift`."""

    source: str = Field(description="directory or s3:// prefix of audit files (audit-*.jsonl) or classify results")
    bundle: str | None = _bundle_field(
        "the bundle whose answers to compare with its validation split: only lines and rows of its model version "
        "count (default: the shipped model)"
    )
    by: Literal["day", "hour"] = Field("day", description="one comparison per UTC day or hour of the audit lines' time "
                                       "(classify results have no time: one period)")
    report: str | None = Field(None, description="directory for summary.json and drift.png (distance per period and statistic)")


class ServeSettings(Settings):
    """The app builder's arguments: the same fields in `deployments/serve_config.yaml`, `skin-ray serve`
    flags and Python."""

    bundle: list[str] = Field(
        [], description="a bundle to serve as [NAME=]URI (directory or s3:// prefix); repeat for several versions, the "
        "first is the primary; a bare URI is named `default`; none: the shipped model",
        validation_alias=AliasChoices("bundle", "model"),
    )
    traffic: dict[str, float] = Field(
        {}, description="NAME=PERCENT,... summing to 100: the share of requests each version answers, sticky per caller "
        "(API key name, else X-Client-ID); default: all to the primary",
    )
    shadow: dict[str, float] = Field(
        {}, description="NAME[=PERCENT],...: versions sent a copy of that share (default 100) of the /predict requests "
        "after their answer; compared with the answer and counted, never returned",
    )
    runtime: Runtime = _runtime_field()
    layout: Layout = Field(
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
    max_image_megapixels: float = Field(
        30.0, gt=0, description="largest image accepted, in millions of pixels (ISIC dermoscopy reaches 27); refused "
        "before decoding (400 too_many_pixels)",
    )
    max_concurrent_explanations: int = Field(
        2, ge=1, description="/explain requests in progress per Ingress replica (each a gradient pass); beyond, 503"
    )
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
    min_replicas: int = Field(1, ge=1, description="Ingress replicas (and SkinModel replicas per version, split) at least")
    max_replicas: int = Field(
        1, ge=1, description="replicas at most; above --min-replicas, Serve adds and removes replicas to follow the load"
    )
    target_ongoing_requests: float = Field(
        32, gt=0, description="requests in progress per Ingress replica the autoscaler aims for (a replica batches "
        "many at once)",
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="how long the load must stay above target before a replica is added")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long it must stay below before one is removed")
    autoscaling_window_s: float = Field(
        30.0, gt=0, description="the load the autoscaler compares with the target: requests in progress averaged over "
        "this many seconds (a short window follows the load sooner, and a burst too)",
    )
    audit: str | None = Field(
        None, description="directory or s3:// prefix for the audit trail: a JSON line per image answered or refused "
        "(who, which version, the input's sha256, the answer, the status)",
    )
    audit_flush_s: float = Field(1.0, gt=0, description="audit lines are written at least this often: what a crash can lose")
    audit_rotate_mb: float = Field(64.0, gt=0, description="a local audit file is closed and a new one begun at this size")
    audit_rotate_s: float = Field(3600.0, gt=0, description="... or at this age (on S3 each write is an object of its own)")
    audit_required: bool = Field(
        False, description="answer 503 rather than answer unaudited while the audit trail cannot be written"
    )
    drift_window: int = Field(
        500, ge=0, description="images per version each Ingress replica compares with the bundle's validation split "
        "for the drift gauges (ray_skin_ray_drift_*); 0: none",
    )
    api_keys: str | None = Field(
        None, validate_default=True, description="file of API keys, one NAME:SECRET a line (default: "
        "SKIN_RAY_API_KEYS_FILE); every route but the page, /healthz and the API docs then needs a key",
    )
    allow_unauthenticated: bool = Field(
        False, description="serve without API keys on an address other than loopback (anyone who can connect may use it)"
    )
    rate_limit_per_key: float | None = Field(
        None, gt=0, description="requests a second each API key may make, per Ingress replica (429 beyond it)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_environment(cls, path: str | None) -> str | None:
        return path or os.environ.get("SKIN_RAY_API_KEYS_FILE") or None

    @field_validator("bundle", mode="before")
    @classmethod
    def _one_or_several(cls, bundle: str | list[str] | None) -> list[str]:
        return [] if bundle is None else [bundle] if isinstance(bundle, str) else bundle

    @field_validator("traffic", "shadow", mode="before")
    @classmethod
    def _shares_from_text(cls, shares: str | dict | None, info) -> dict:
        """`a=90,b=10` (a flag's text) as {a: 90, b: 10}; a shadow named without a share takes every request."""
        if not isinstance(shares, str):
            return shares or {}
        parsed = {}
        for entry in filter(None, (part.strip() for part in shares.split(","))):
            name, sep, percent = entry.partition("=")
            if not sep and info.field_name == "traffic":
                raise ValueError(f"{entry!r}: write NAME=PERCENT")
            parsed[name.strip()] = percent.strip() if sep else 100
        return parsed

    @model_validator(mode="after")
    def _replicas_in_order(self) -> ServeSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"--max-replicas {self.max_replicas} is below --min-replicas {self.min_replicas}")
        return self

    @model_validator(mode="after")
    def _versions_add_up(self) -> ServeSettings:
        versions = self.versions()  # raises for a malformed or repeated name
        for field, shares in (("traffic", self.traffic), ("shadow", self.shadow)):
            if unknown := sorted(set(shares) - set(versions)):
                raise ValueError(f"{field} names {', '.join(unknown)}, not among the bundles ({', '.join(versions)})")
            if not all(0 <= share <= 100 for share in shares.values()):
                raise ValueError(f"{field}: each share is a percentage, 0 to 100")
        if self.traffic and not math.isclose(sum(self.traffic.values()), 100):
            raise ValueError(f"traffic shares add up to {sum(self.traffic.values()):g}, not 100")
        if answering := sorted(name for name in self.shadow if self.weights().get(name)):
            raise ValueError(f"{', '.join(answering)}: a version that takes traffic cannot also be a shadow")
        return self

    def versions(self) -> dict[str, str | None]:
        """Each version's name and bundle (None: the shipped model), the primary first."""
        if not self.bundle:
            return {PRIMARY_VERSION: None}
        versions: dict[str, str | None] = {}
        for entry in self.bundle:
            name, sep, uri = entry.partition("=")
            if not sep or not VERSION_NAME.fullmatch(name):  # a bare URI (which may hold '=' itself)
                name, uri = PRIMARY_VERSION, entry
            if name in versions:
                raise ValueError(f"two bundles are named {name!r}: name them NAME=URI")
            versions[name] = uri
        return versions

    def weights(self) -> dict[str, float]:
        """The share of requests each version answers: --traffic, or all to the primary."""
        return {name: share for name, share in self.traffic.items() if share} or {next(iter(self.versions())): 100.0}
