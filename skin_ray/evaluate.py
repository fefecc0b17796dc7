"""`skin-ray evaluate`: a bundle's metrics on a labelled image tree, with ROC, confusion and calibration plots."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from skin_ray import metrics
from skin_ray.data import discover, image_dataset
from skin_ray.predictor import Predictor

logger = logging.getLogger(__name__)


def evaluate(data: str, model: str | None = None, report_dir: str | None = None, subset: str | None = None) -> dict:
    """Score every image below `data` (decoding runs in parallel on Ray Data); return the summary figures.

    Undecodable files are counted in `errors` and left out of the figures.
    """
    predictor = Predictor.from_bundle(model)
    meta = predictor.metadata
    images = discover(data, class_names=tuple(meta.class_names), subset=subset)
    positive = meta.positive_index
    y_true, p_cancer, errors = [], [], 0
    for batch in image_dataset(images).iter_batches(batch_size=64):
        ok = batch["error"] == ""
        errors += int((~ok).sum())
        for path, reason in zip(batch["path"][~ok], batch["error"][~ok]):
            logger.warning("left out %s: %s", path, reason)
        if ok.any():
            y_true.append(batch["label"][ok] == positive)
            p_cancer.append(predictor.cancer_probabilities(batch["image"][ok]))
    y_true = np.concatenate(y_true).astype(np.int64)
    p_cancer = np.concatenate(p_cancer)
    summary = {**metrics.summary(y_true, p_cancer, meta.threshold), "errors": errors, "model_version": meta.model_version}
    if report_dir:
        write_plots(y_true, p_cancer, meta.threshold, Path(report_dir))
    return summary


def write_plots(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float, report_dir: Path) -> None:
    """roc.png, confusion.png and calibration.png in `report_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    summary = metrics.summary(y_true, p_cancer, threshold)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fpr, tpr = metrics.roc_curve(y_true, p_cancer)
    ax.plot(fpr, tpr, label=f"ROC AUC {summary['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.scatter([1 - summary["specificity"]], [summary["sensitivity"]], color="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity (Cancer)", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(report_dir / "roc.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    grid = np.array([[summary["tp"], summary["fn"]], [summary["fp"], summary["tn"]]])
    ax.imshow(grid, cmap="Blues")
    for (row, col), count in np.ndenumerate(grid):
        ax.text(col, row, str(count), ha="center", va="center", color="white" if count > grid.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called Cancer", "called Non_Cancer"])
    ax.set_yticks([0, 1], ["Cancer", "Non_Cancer"])
    ax.set_title(f"Confusion at threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(report_dir / "confusion.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    predicted, observed, counts = metrics.reliability(y_true, p_cancer)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.plot(predicted, observed, "o-", label=f"ECE {summary['ece']:.3f}")
    for x, y, n in zip(predicted, observed, counts):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="predicted Cancer probability", ylabel="observed Cancer rate", title="Calibration (10 bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(report_dir / "calibration.png", dpi=120)
    plt.close(fig)
