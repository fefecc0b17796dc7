"""The one scoring loop over a labelled dataset (a `pixel_dataset` or `image_dataset`), which calibration, the
training epochs' validation, the safeguards' fit and `evaluate` all run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def scored_batches(dataset, score: Callable, keep: Callable[[dict], np.ndarray] | None = None) -> Iterator[tuple[dict, object]]:
    """Each batch of `dataset` (its rows that `keep` selects; every row by default; a batch left empty is skipped)
    and `score` of their images: the `pixels` column (uint8) where the dataset has one, else `image` (the model
    input)."""
    for batch in dataset.iter_batches(batch_size=64):
        if keep is not None:
            selected = keep(batch)
            if not selected.any():
                continue
            batch = {name: column[selected] for name, column in batch.items()}
        yield batch, score(batch["pixels"] if "pixels" in batch else batch["image"])


def cancer_scores(dataset, probabilities: Callable, positive_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(1 where a row is Cancer, else 0; its Cancer probability) for every row of `dataset`, `probabilities`
    giving a batch's class probabilities."""
    truth, p_cancer = [], []
    for batch, scores in scored_batches(dataset, probabilities):
        truth.append(batch["label"] == positive_index)
        p_cancer.append(np.asarray(scores)[:, positive_index])
    return np.concatenate(truth).astype(np.int64), np.concatenate(p_cancer)
