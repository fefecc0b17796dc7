"""`skin-ray evaluate`: a bundle's metrics on a labelled image tree, with ROC, confusion and calibration plots."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow

from skin_ray import classifier_stats
from skin_ray.config import EvaluateSettings
from skin_ray.data import discover_sources, image_dataset, in_validation
from skin_ray.predictor import Predictor
from skin_ray.record import WRITERS, record_schema
from skin_ray.scoring import scored_batches

logger = logging.getLogger(__name__)


def evaluate(settings: EvaluateSettings) -> dict:
    """Score every image below `settings.data` (decoding runs in parallel on Ray Data); return the summary
    figures.

    `split="validation"` scores only the images the bundle's split held out: those it recorded as its validation
    images, or for a bundle that recorded only its training images, those its content-hash rule holds out.
    Undecodable files are counted in `errors` and left out of the figures; images the bundle was trained on are
    counted in `seen_in_training`, with a warning, because they flatter it. The figures score the model on every
    decodable image, including those its input gate would refuse (`out_of_distribution` counts them);
    `certain_accuracy` is the accuracy of the predictions not flagged uncertain. With `report`, every image's
    prediction record goes to predictions.jsonl.
    """
    data, split = settings.data, settings.split
    predictor = Predictor.from_bundle(settings.bundle, settings.runtime)
    meta = predictor.metadata
    validation_fraction = meta.training.get("validation_fraction")
    if split == "validation" and validation_fraction is None:
        raise ValueError(f"{predictor.bundle.uri} does not record its validation split; use --split all")
    images = discover_sources(data, class_names=tuple(meta.class_names), subset=settings.subset)
    source_of = dict(zip(images.paths, images.sources(), strict=True))
    dataset = image_dataset(images, meta.input_spec)
    dataset.set_name("evaluate")  # what its progress line is called
    left_out, scored_contents = Counter(), set()

    def scored(batch: dict) -> np.ndarray:
        """The rows to score: decoded, and in the validation split when only it is scored; counts the rest."""
        ok = batch["error"] == ""
        left_out["errors"] += int((~ok).sum())
        for path, reason in zip(batch["path"][~ok], batch["error"][~ok], strict=True):
            logger.warning("left out %s: %s", path, reason)
        if split == "validation":
            in_split = validation_rows(batch["sha256"], ok, predictor.bundle.validation_digests, validation_fraction,
                                       scored_contents)
            left_out["held_out"] += int((ok & ~in_split).sum())
            ok &= in_split
        return ok

    y_true, p_cancer, records, sources, seen = [], [], [], [], 0
    for batch, analysis in scored_batches(dataset, predictor.analyse, keep=scored):
        seen += sum(digest in predictor.bundle.train_digests for digest in batch["sha256"])
        sources += [source_of[path] for path in batch["path"]]
        y_true.append(batch["label"] == meta.positive_index)
        p_cancer.append(analysis.probabilities[:, meta.positive_index])
        for path, label, record in zip(
            batch["path"], batch["label"], predictor.to_records(analysis, [""] * len(batch["path"])), strict=True
        ):
            records.append({"path": path, "true_label": meta.class_names[label], **record})
    if not records:
        raise ValueError(
            f"no image below {', '.join(data)} is left to score"
            + (" in the bundle's validation split" if split == "validation" else "")
        )
    y_true = np.concatenate(y_true).astype(np.int64)
    p_cancer = np.concatenate(p_cancer)
    summary = {
        **classifier_stats.summary(y_true, p_cancer, meta.threshold),
        **_safeguard_figures(records),
        "errors": left_out["errors"],
        "seen_in_training": seen,
        "split": split,
        "model_version": meta.model_version,
        "runtime": predictor.analyse.runtime,
        "data": data,
    }
    if split == "validation":
        summary["not_in_validation"] = left_out["held_out"]  # byte-identical copies of a scored image included
    if len(data) > 1:
        summary["by_source"] = classifier_stats.by_group(y_true, p_cancer, meta.threshold, sources)
    if seen:
        logger.warning(
            "%d of the %d images scored were in %s's training split, so these figures flatter it; "
            "--split validation scores only the images it held out", seen, summary["n"], meta.model_version,
        )
    elif not predictor.bundle.train_digests:
        logger.info("%s does not record its training images; overlap with them was not checked", meta.model_version)
    if settings.report:
        write_report(y_true, p_cancer, summary, Path(settings.report))
        schema = record_schema(meta.class_names, before=("path", "true_label"))
        with open(Path(settings.report, "predictions.jsonl"), "wb") as out:
            WRITERS["jsonl"].write(pyarrow.Table.from_pylist(records, schema=schema), out)
    return summary


def _safeguard_figures(records: list[dict]) -> dict:
    """How many images the input gate refused, how many predictions were flagged uncertain, and the accuracy
    of the rest (None where the bundle has no gate or margin)."""
    gated = [record for record in records if record["in_distribution"] is not None]
    judged = [record for record in records if record["uncertain"] is not None]
    certain = [record for record in judged if not record["uncertain"]]
    return {
        "out_of_distribution": sum(not record["in_distribution"] for record in gated) if gated else None,
        "uncertain": sum(record["uncertain"] for record in judged) if judged else None,
        "certain_accuracy": sum(r["label"] == r["true_label"] for r in certain) / len(certain) if certain else None,
    }



def validation_rows(
    digests, readable: np.ndarray, recorded: frozenset, validation_fraction: float, scored: set
) -> np.ndarray:
    """Which rows `--split validation` scores: readable, in the bundle's validation split (its `recorded` digests,
    or the content-hash rule for a bundle that recorded none), and not a byte-identical copy of one already scored
    (the split holds one file per content, so a copy in another tree would count one image twice). The digests
    scored are added to `scored`."""
    rows = np.zeros(len(readable), dtype=bool)
    for row, digest in enumerate(digests):
        in_split = digest in recorded if recorded else in_validation(digest, validation_fraction)
        if readable[row] and in_split and digest not in scored:
            scored.add(digest)
            rows[row] = True
    return rows

def write_report(y_true: np.ndarray, p_cancer: np.ndarray, summary: dict, report_dir: Path) -> None:
    """summary.json, roc.png, confusion.png and calibration.png in `report_dir`; every plot says what was
    scored (n, model version, data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    threshold = summary["threshold"]
    data = ", ".join(Path(tree).name for tree in summary["data"])
    data += ", its validation split" if summary["split"] == "validation" else ""
    scored = f"{data}: n={summary['n']} ({summary['tp'] + summary['fn']} Cancer)\nmodel {summary['model_version']}"

    def save(fig, ax, title: str, name: str) -> None:
        ax.set_title(f"{title}\n{scored}", fontsize=9)
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 5))
    fpr, tpr = classifier_stats.roc_curve(y_true, p_cancer)
    ax.plot(fpr, tpr, label=f"ROC AUC {summary['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.scatter([1 - summary["specificity"]], [summary["sensitivity"]], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (Cancer)")
    ax.legend(loc="lower right")
    save(fig, ax, "ROC", "roc.png")

    fig, ax = plt.subplots(figsize=(4.5, 4))
    grid = np.array([[summary["tp"], summary["fn"]], [summary["fp"], summary["tn"]]])
    ax.imshow(grid, cmap="Blues")
    for (row, col), count in np.ndenumerate(grid):
        ax.text(col, row, str(count), ha="center", va="center", color="white" if count > grid.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called Cancer", "called Non_Cancer"])
    ax.set_yticks([0, 1], ["Cancer", "Non_Cancer"])
    save(fig, ax, f"Confusion at threshold {threshold:.3f}", "confusion.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    predicted, observed, counts = classifier_stats.reliability(y_true, p_cancer)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.plot(predicted, observed, "o-", label=f"ECE {summary['ece']:.3f}")
    for x, y, n in zip(predicted, observed, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted Cancer probability", ylabel="observed Cancer rate")
    ax.legend(loc="upper left")
    save(fig, ax, "Calibration (10 bins)", "calibration.png")
