"""Offline classification: a streaming Ray Data job over a directory or an S3 prefix.

    list files -> read bytes + decode (tasks, the one preprocessing) -> predict (actor pool, one model load
    per actor) -> write parquet / csv / jsonl

Every input file becomes exactly one output row, `path` and the prediction record every path shares
(`skin_ray.record`); a file that cannot be read or decoded is a row whose `error` says why, an image the
input gate refuses one whose `error_reason` is `out_of_distribution`. Results are written as the job
streams, a file at least every `flush_interval_s` (or `rows_per_file` rows), all with one schema
(`result_schema`), so the folder reads as one table, an interrupted job keeps what it finished and
`--resume` classifies only the files not yet in DEST.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow
import pyarrow.parquet
import ray

from skin_ray import storage
from skin_ray.bundle import read_metadata
from skin_ray.config import ClassifySettings, OutputFormat
from skin_ray.console import ActorRestartLines
from skin_ray.data import load_images
from skin_ray.preprocess import IMAGE_SUFFIXES
from skin_ray.record import WRITERS, record_schema

logger = logging.getLogger(__name__)

# --format -> its Ray Data reader (the writers are skin_ray.record.WRITERS)
READERS: dict[OutputFormat, Callable] = {
    "parquet": ray.data.read_parquet,
    "csv": ray.data.read_csv,
    "jsonl": ray.data.read_json,
}


def result_schema(class_names: Sequence[str]) -> pyarrow.Schema:
    """A result row: the file's `path` and `input_sha256` (of its bytes; null when it could not be read, as the
    service's audit trail names inputs), its prediction record and `explanation` (where its Grad-CAM overlay
    went with --explain, else null). Every file of every run of a job has exactly these columns."""
    return record_schema(class_names, before=("path", "input_sha256"), after=("explanation",))


RESULT_COLUMNS = tuple(result_schema(class_names=()).names)


class Classifier:
    """A Ray Data actor: loads the bundle once, then predicts every batch it is given."""

    def __init__(self, bundle: str | None, runtime: str, explain: str | None, actors: int):
        from skin_ray.predictor import Predictor
        from skin_ray.runtime import forward_threads, limit_tensorflow_threads

        # The pool's actors compute at once, on one node's cores where it fits: threads beyond an actor's share only
        # contend (2 actors on 2 cores: 73 img/s with 2 threads each, 81 with 1). Spread over several nodes, each
        # actor has more cores than this assumes; TF_NUM_INTRAOP_THREADS in the job's environment then sets it.
        threads = forward_threads(sharing=actors)
        limit_tensorflow_threads(threads)
        self.predictor = Predictor.from_bundle(bundle, runtime, threads)
        self.schema = result_schema(self.predictor.metadata.class_names)
        self.explain = explain

    def __call__(self, batch: dict[str, np.ndarray]) -> pyarrow.Table:
        records = self.predictor.records(batch["image"], batch["error"])
        overlays = self._overlays(batch, records) if self.explain else [None] * len(records)
        rows = [
            {"path": path, "input_sha256": digest or None, **record, "explanation": overlay}
            for path, digest, record, overlay in zip(batch["path"], batch["sha256"], records, overlays, strict=True)
        ]
        return pyarrow.Table.from_pylist(rows, schema=self.schema)

    def _overlays(self, batch: dict[str, np.ndarray], records: list[dict]) -> list[str | None]:
        """Write a Grad-CAM overlay for every image with a label; return where each went (None: no label)."""
        from skin_ray.overlay import overlay_png

        labelled = [i for i, record in enumerate(records) if record["label"] is not None]
        cancer = np.array([records[i]["label"] == self.predictor.metadata.positive_class for i in labelled], dtype=bool)
        heatmaps = self.predictor.explainer.heatmaps(batch["image"][labelled], cancer) if labelled else []
        overlays = [None] * len(records)
        for i, heatmap in zip(labelled, heatmaps, strict=True):
            png, _ = overlay_png(storage.read_bytes(batch["path"][i]), heatmap)
            overlays[i] = storage.join(self.explain, f"{batch['sha256'][i][:20]}.gradcam.png")  # named by content
            storage.write_bytes(overlays[i], png)
        return overlays


def read_results(output: str, fmt: str, columns: list[str] | None = None):
    """The rows already in `output` as a pandas DataFrame (empty when there are none)."""
    import pandas as pd

    suffix, read = WRITERS[fmt].suffix, READERS[fmt]
    try:
        has_results = any(p.endswith(suffix) for p in storage.list_files(output))
    except FileNotFoundError:
        has_results = False
    if not has_results:
        return pd.DataFrame(columns=columns or list(RESULT_COLUMNS))
    filesystem, path = storage.pyarrow_filesystem(output)
    frame = read(path, filesystem=filesystem, file_extensions=[suffix.lstrip(".")]).to_pandas()
    return frame[columns] if columns else frame


def build_pipeline(paths: list[str], settings: ClassifySettings) -> ray.data.Dataset:
    decoding = {"max_bytes": int(settings.max_file_mb * 2**20), "spec": read_metadata(settings.bundle).input_spec}
    files = ray.data.from_items(
        [{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths) // settings.batch_size, 1000))
    )
    files.set_name("classify")  # what its progress line is called
    return (
        files.map_batches(load_images, batch_size=settings.batch_size, fn_kwargs=decoding, num_cpus=0.5)
        .map_batches(
            Classifier,
            fn_constructor_args=(settings.bundle, settings.runtime, settings.explain, settings.workers),
            batch_size=settings.batch_size,
            compute=ray.data.ActorPoolStrategy(size=settings.workers),
            num_cpus=settings.cpus_per_actor,
        )
    )


class ResultFiles:
    """Writes the rows as they stream in: a file whenever `rows_per_file` rows are waiting or
    `flush_interval_s` passed since the last one, and the rest on exit, so a job killed at any point keeps
    all but its last few seconds. Files are named by run and number, never overwriting another run's."""

    def __init__(self, settings: ClassifySettings):
        self.suffix, self.write = WRITERS[settings.format]
        self.filesystem, self.directory = storage.pyarrow_filesystem(settings.output)
        self.rows_per_file, self.flush_interval_s = settings.rows_per_file, settings.flush_interval_s
        self.run, self.written, self.waiting, self.waiting_rows = uuid.uuid4().hex[:12], 0, [], 0
        self.last_flush = time.monotonic()

    def __enter__(self) -> ResultFiles:
        self.filesystem.create_dir(self.directory, recursive=True)
        return self

    def add(self, rows: pyarrow.Table) -> None:
        self.waiting.append(rows)
        self.waiting_rows += rows.num_rows
        if self.waiting_rows >= self.rows_per_file or time.monotonic() - self.last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        if self.waiting:
            name = f"{self.run}_{self.written:06d}{self.suffix}"
            # Written under a hidden name, then renamed: readers see whole files only, even after a kill (pandas
            # and pyarrow skip names starting with a dot; Ray Data and DuckDB globs ask for the suffix).
            partial = f"{self.directory}/.{name}.partial"
            with self.filesystem.open_output_stream(partial) as stream:
                self.write(pyarrow.concat_tables(self.waiting), stream)  # one schema: Classifier's
            self.filesystem.move(partial, f"{self.directory}/{name}")
            self.written += 1
        self.waiting, self.waiting_rows, self.last_flush = [], 0, time.monotonic()

    def __exit__(self, *exc_info) -> None:
        self.flush()  # an interrupted job keeps what it finished too


def check_output(settings: ClassifySettings) -> None:
    """Refuse an output that already holds results unless resuming, and a resumed Parquet folder whose files
    have other columns than this job would write (it would no longer read as one table). Reads a listing, a
    file footer and bundle.json: no Ray needed."""
    suffix = WRITERS[settings.format].suffix
    try:
        results = [p for p in storage.list_files(settings.output) if p.endswith(suffix)]
    except FileNotFoundError:
        return
    if results and not settings.resume:
        raise FileExistsError(
            f"{settings.output} already holds results ({len(results)} {suffix} files); pass --resume to classify "
            "only the files not in them, or choose another --output"
        )
    if results and settings.format == "parquet":
        filesystem, path = storage.pyarrow_filesystem(results[0])
        written = pyarrow.parquet.read_schema(path, filesystem=filesystem)
        schema = result_schema(read_metadata(settings.bundle).class_names)
        if not written.equals(schema):
            columns = lambda schema: {f"{field.name}: {field.type}" for field in schema}  # noqa: E731
            raise ValueError(
                f"{results[0]} was written with other columns than this job writes (differing: "
                f"{', '.join(sorted(columns(written) ^ columns(schema)))}), by another skin-ray version or a bundle of "
                "other classes; resume into another --output"
            )


def classify(settings: ClassifySettings) -> dict:
    """Run the job; return the summary (files, classified, errors by reason, elapsed, images/s)."""
    started = time.perf_counter()
    check_output(settings)
    files = storage.list_files(settings.source, IMAGE_SUFFIXES)
    done = set(read_results(settings.output, settings.format, ["path"])["path"])
    todo = [p for p in files if p not in done]
    logger.info(
        "%d image files in %s, %d already classified, %d to do", len(files), settings.source, len(files) - len(todo), len(todo)
    )
    if todo:
        restarts = ActorRestartLines("Classifier", "its batches are retried, no row is lost")
        with ResultFiles(settings) as results, restarts:
            for batch in build_pipeline(todo, settings).iter_batches(batch_size=None, batch_format="pyarrow"):
                results.add(batch)
    elapsed = time.perf_counter() - started
    results = read_results(settings.output, settings.format, ["path", "error_reason", "uncertain"])
    errors = Counter(reason for reason in results["error_reason"] if isinstance(reason, str) and reason)
    return {
        "files": len(files),
        "rows": len(results),
        "classified": int(len(results) - sum(errors.values())),
        "errors": dict(errors),  # by reason, out_of_distribution included
        "uncertain": int((results["uncertain"] == True).sum()),  # noqa: E712  (a column of True/False/None)
        "this_run": len(todo),
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(len(todo) / elapsed, 2) if todo else 0.0,
        "output": settings.output,
    }
