"""Offline drift: a Ray Data job comparing each period of a service's audit trail, or a classify job's results,
with a bundle's validation split (skin_ray.drift).

    list files -> read (audit lines as text, results by their format) -> the observations of the bundle's
    answers, keyed by period -> group by period -> compare each with the reference -> summary (and plots)

Only what the bundle answered counts: audit lines of status 200 and result rows without a decode error, of the
bundle's model version. A line that is not a JSON object is skipped and counted. Audit lines carry the image
statistics and the time; classify rows neither, so their comparison covers the record's statistics and rates,
over one period (`all`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import ray

from skin_ray import storage
from skin_ray.bundle import read_drift_reference, read_metadata
from skin_ray.config import DriftSettings
from skin_ray.drift import IMAGE_STATISTICS, RATES, STATISTICS, DriftReference, Observations, compare
from skin_ray.record import OUT_OF_DISTRIBUTION

AUDIT_SUFFIX = ".jsonl"
RESULT_READERS = {".parquet": ray.data.read_parquet, ".csv": ray.data.read_csv, ".json": ray.data.read_json}
PERIOD_END = {"day": 10, "hour": 13}  # where an ISO 8601 time is cut to name its day or hour
ONE_PERIOD = "all"
SKIPPED = ""  # the period of a line that could not be read
GROUP_PARTITIONS = 4


def _columns(observations: Observations, periods: list[str]) -> dict[str, np.ndarray]:
    return {"period": np.array(periods, dtype=object), **observations.values, **observations.flags}


def _no_image(count: int) -> dict[str, np.ndarray]:
    return {name: np.full(count, np.nan) for name in IMAGE_STATISTICS}


def audit_observations(batch: dict[str, np.ndarray], model_version: str, positive_class: str, by: str) -> dict:
    """The observations of a batch of audit lines (column `text`) answered by `model_version`, by period; a line
    that is not a JSON object is a row of its own with `skipped` 1 and no period."""
    records, images, periods, skipped = [], [], [], 0
    for text in batch["text"]:
        try:
            line = json.loads(text)
            if not isinstance(line, dict):
                raise ValueError("not an object")
        except ValueError:
            skipped += 1
            continue
        if line.get("status") != 200 or line.get("model_version") != model_version:
            continue
        image = line.get("image") if isinstance(line.get("image"), dict) else {}
        records.append(line)
        images.append([_number(image.get(name)) for name in IMAGE_STATISTICS])
        periods.append(str(line.get("time", ""))[: PERIOD_END[by]] or ONE_PERIOD)
    records += [{}] * skipped
    images += [[math.nan] * len(IMAGE_STATISTICS)] * skipped
    image = dict(zip(IMAGE_STATISTICS, np.array(images, dtype=np.float64).reshape(-1, len(IMAGE_STATISTICS)).T, strict=True))
    columns = _columns(Observations.of(_checked(records), image, positive_class), periods + [SKIPPED] * skipped)
    columns["skipped"] = np.array([0] * len(periods) + [1] * skipped, dtype=np.int64)
    return columns


def result_observations(batch: dict[str, np.ndarray], model_version: str, positive_class: str) -> dict:
    """The observations of a batch of classify rows answered by `model_version` (one period)."""
    keep = [
        i for i, (version, reason) in enumerate(zip(batch["model_version"], batch["error_reason"], strict=True))
        if version == model_version and (reason is None or reason == OUT_OF_DISTRIBUTION or _is_missing(reason))
    ]
    records = [{field: batch[field][i] for field in ("in_distribution", "ood_score", "cancer_probability", "uncertain", "label")}
               for i in keep]
    columns = _columns(Observations.of(_checked(records), _no_image(len(keep)), positive_class), [ONE_PERIOD] * len(keep))
    columns["skipped"] = np.zeros(len(keep), dtype=np.int64)
    return columns


def _is_missing(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _number(value) -> float:
    return float(value) if isinstance(value, int | float | np.floating) and not isinstance(value, bool) else math.nan


def _checked(records: list[dict]) -> list[dict]:
    """Records as `Observations.of` takes them: a value of the wrong type (the files are not trusted) is None."""
    flag = lambda value: value if isinstance(value, bool | np.bool_) else None  # noqa: E731
    return [
        {
            "in_distribution": flag(record.get("in_distribution")), "uncertain": flag(record.get("uncertain")),
            "ood_score": None if math.isnan(v := _number(record.get("ood_score"))) else v,
            "cancer_probability": None if math.isnan(p := _number(record.get("cancer_probability"))) else p,
            "label": record.get("label") if isinstance(record.get("label"), str) else None,
        }
        for record in records
    ]


def compare_period(group: dict[str, np.ndarray], reference: DriftReference) -> dict[str, np.ndarray]:
    """One row per statistic and rate compared for one period's observations (none for the lines skipped)."""
    period = str(group["period"][0])
    observations = Observations(
        values={name: group[name].astype(np.float64) for name in STATISTICS},
        flags={name: group[name].astype(np.float64) for name in RATES},
    )
    report = compare(observations, reference) if period != SKIPPED else {}
    return {
        "period": np.array([period] * len(report), dtype=object),
        "statistic": np.array(list(report), dtype=object),
        "distance": np.array([row["distance"] for row in report.values()]),
        "threshold": np.array([row["threshold"] for row in report.values()]),
        "images": np.array([row["images"] for row in report.values()], dtype=np.int64),
        "period_images": np.full(len(report), len(observations), dtype=np.int64),
    }


def drift_report(settings: DriftSettings) -> dict:
    """Run the job; the summary: per period and statistic the distance, its threshold and whether it drifted."""
    metadata = read_metadata(settings.bundle)
    reference = read_drift_reference(settings.bundle)
    if reference is None:
        raise ValueError(f"{settings.bundle or 'the shipped bundle'} has no drift reference; `skin-ray fit-safeguards` adds it")
    files = storage.list_files(settings.source)
    audit = [path for path in files if PurePosixPath(path).name.startswith("audit-") and path.endswith(AUDIT_SUFFIX)]
    filesystem, _ = storage.pyarrow_filesystem(settings.source)
    unqualified = lambda paths: [storage.pyarrow_filesystem(path)[1] for path in paths]  # noqa: E731
    versioned = {"model_version": metadata.model_version, "positive_class": metadata.positive_class}
    if audit:
        rows = ray.data.read_text(unqualified(audit), filesystem=filesystem).map_batches(
            audit_observations, fn_kwargs={**versioned, "by": settings.by}, batch_format="numpy"
        )
        kind = "audit"
    else:
        by_suffix = {suffix: [p for p in files if p.endswith(suffix)] for suffix in RESULT_READERS}
        suffix, results = max(by_suffix.items(), key=lambda item: len(item[1]))
        if not results:
            raise FileNotFoundError(f"no audit files (audit-*{AUDIT_SUFFIX}) or classify results below {settings.source}")
        read = RESULT_READERS[suffix](unqualified(results), filesystem=filesystem)
        columns = ["model_version", "error_reason", "in_distribution", "ood_score", "cancer_probability", "uncertain", "label"]
        rows = read.select_columns(columns).map_batches(result_observations, fn_kwargs=versioned, batch_format="numpy")
        kind = "classify results"
    rows = rows.materialize()
    skipped = int(rows.sum("skipped") or 0) if rows.count() else 0
    # A few partitions: Ray's default of 200 took 40 s for 4 periods of 60 lines on 2 cores.
    compared = rows.groupby("period", num_partitions=GROUP_PARTITIONS).map_groups(
        compare_period, fn_kwargs={"reference": reference}, batch_format="numpy"
    )
    summary = _summary(compared.take_all(), settings, metadata.model_version, kind, skipped)
    if settings.report:
        _write_report(summary, settings.report)
    return summary


def _summary(rows: list[dict], settings: DriftSettings, model_version: str, kind: str, skipped: int) -> dict:
    periods: dict[str, dict] = {}
    for row in sorted(rows, key=lambda row: (row["period"], row["statistic"])):
        period = periods.setdefault(row["period"], {"images": int(row["period_images"]), "statistics": {}})
        period["statistics"][row["statistic"]] = {
            "distance": round(float(row["distance"]), 4), "threshold": round(float(row["threshold"]), 4),
            "drifted": bool(row["distance"] > row["threshold"]), "images": int(row["images"]),
        }
    return {
        "source": settings.source, "kind": kind, "model_version": model_version, "by": settings.by,
        "skipped_lines": skipped, "periods": periods,
        "drifted": [f"{name} {statistic}" for name, period in periods.items()
                    for statistic, row in period["statistics"].items() if row["drifted"]],
    }


def _write_report(summary: dict, directory: str) -> None:
    """summary.json and drift.png: each statistic's distance per period against its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(directory).mkdir(parents=True, exist_ok=True)
    Path(directory, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    periods = list(summary["periods"])
    names = [name for name in (*STATISTICS, *RATES)
             if any(name in period["statistics"] for period in summary["periods"].values())]
    figure, axes = plt.subplots(len(names), 1, figsize=(8, 1.8 * max(1, len(names))), sharex=True, squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=True):
        rows = [summary["periods"][period]["statistics"].get(name) for period in periods]
        distance = [row["distance"] if row else np.nan for row in rows]
        threshold = [row["threshold"] if row else np.nan for row in rows]
        axis.plot(periods, distance, "o-", label="distance")
        axis.plot(periods, threshold, "--", color="grey", label="threshold")
        drifted = [i for i, row in enumerate(rows) if row and row["drifted"]]
        axis.plot([periods[i] for i in drifted], [distance[i] for i in drifted], "o", color="red", label="drifted")
        axis.set_ylabel(name, rotation=0, ha="right")
    axes[0, 0].legend(loc="upper left", fontsize="small")
    axes[0, 0].set_title(f"drift of {summary['model_version']} from its validation split, by {summary['by']}")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(Path(directory, "drift.png"), dpi=100)
    plt.close(figure)
