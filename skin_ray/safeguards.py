"""What a prediction needs before a clinician can rely on it: an input gate and an uncertainty flag.

Both are fitted on a bundle's own content-hash split when the bundle is made, recorded in the bundle, and
applied to every prediction by `Predictor.records`:

- **Input gate**: the Mahalanobis distance of an image's pooled features (the classifier's input) to the
  nearer class mean, with one covariance shared by the classes (Lee et al., 2018), all fitted on the
  training split as the model saw it (with the training augmentation's zoom-out onto skin). Feature-space
  distances separate out-of-distribution images far better than softmax
  confidence in dermoscopy (Pacheco et al., 2020): the model's probabilities are confident on photos of
  cats. The threshold keeps `GATE_TPR` of the validation images; past it the label is withheld.
- **Uncertainty**: a prediction is uncertain when its calibrated log-odds lie within `margin` of the
  decision threshold's, or when an ensemble's members disagree on the label. The margin is the smallest
  for which the validation predictions left certain reach `CERTAIN_ACCURACY`. It needs nothing but the
  calibrated probability, so a single network gets it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skin_ray import metrics

GATE_TPR = 0.95  # share of in-distribution (validation) images the gate must let through
CERTAIN_ACCURACY = 0.95  # accuracy the predictions not flagged uncertain must reach on validation
SHRINKAGE = 0.1  # of the covariance towards its mean variance: 2,083 images estimate 512x512 poorly


@dataclass(frozen=True)
class InputGate:
    means: np.ndarray  # (classes, features)
    precision: np.ndarray  # (features, features), the inverse of the shared covariance
    threshold: float  # largest accepted score

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of `features` to the nearer class mean."""
        classes, width = self.means.shape
        centred = (features[:, None, :].astype(np.float64) - self.means[None]).reshape(-1, width)
        return ((centred @ self.precision.astype(np.float64)) * centred).sum(axis=1).reshape(-1, classes).min(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"gate_means": self.means, "gate_precision": self.precision}


def fit_input_gate(train_features: np.ndarray, train_labels: np.ndarray, validation_features: np.ndarray) -> InputGate:
    """Class means and a shrunk shared covariance from the training split; the threshold from validation."""
    features = train_features.astype(np.float64)
    classes = np.unique(train_labels)
    means = np.stack([features[train_labels == c].mean(axis=0) for c in classes])
    residuals = features - means[np.searchsorted(classes, train_labels)]
    covariance = residuals.T @ residuals / max(1, len(features) - len(classes))
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    # float32 halves the bundle's share (a 512-feature ensemble: 1 MB); the threshold is set with what is stored.
    gate = InputGate(means.astype(np.float32), np.linalg.inv(covariance).astype(np.float32), threshold=np.inf)
    threshold = float(np.quantile(gate.scores(validation_features), GATE_TPR))
    return InputGate(means, gate.precision, threshold)


def uncertainty_margin(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float, members_disagree: np.ndarray) -> float:
    """The smallest log-odds margin around the threshold leaving certain predictions CERTAIN_ACCURACY accurate."""
    distance = np.abs(metrics.log_odds(p_cancer) - metrics.log_odds(threshold))
    correct = (p_cancer >= threshold) == (y_true == 1)
    for margin in np.unique(np.concatenate([[0.0], distance])):
        certain = (distance >= margin) & ~members_disagree
        if certain.any() and correct[certain].mean() >= CERTAIN_ACCURACY:
            return metrics.below(margin, distance)  # a cut between two cases, not at one
    return float(distance.max())


def is_uncertain(p_cancer: np.ndarray, threshold: float, margin: float, members_disagree: np.ndarray) -> np.ndarray:
    return (np.abs(metrics.log_odds(p_cancer) - metrics.log_odds(threshold)) < margin) | members_disagree


def members_disagree(member_cancer: np.ndarray | None, threshold: float, count: int) -> np.ndarray:
    """Whether an ensemble's members (columns of `member_cancer`) call different labels; all False for a
    single network (None)."""
    if member_cancer is None:
        return np.zeros(count, dtype=bool)
    calls = member_cancer >= threshold
    return calls.any(axis=1) & ~calls.all(axis=1)


def describe(
    gate: InputGate, margin: float, y_true: np.ndarray, p_cancer: np.ndarray, threshold: float, disagree: np.ndarray
) -> tuple[dict, dict]:
    """bundle.json's `input_gate` and `uncertainty`: what was fitted, how, and its validation figures."""
    flagged = is_uncertain(p_cancer, threshold, margin, disagree)
    correct = (p_cancer >= threshold) == (y_true == 1)
    input_gate = {
        "method": "Mahalanobis distance of the classifier's input features to the nearer class mean, shared "
        f"covariance shrunk by {SHRINKAGE}; fitted on the training split and its images zoomed out onto skin",
        "threshold": gate.threshold,
        "validation_tpr": GATE_TPR,
    }
    uncertainty = {
        "method": "calibrated log-odds within `margin` of the threshold's, or ensemble members calling different labels",
        "margin": margin,
        "validation": {
            "flagged": float(flagged.mean()),
            "certain_accuracy": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "certain_accuracy_target": CERTAIN_ACCURACY,
            "accuracy": float(correct.mean()),
            "members_disagree": float(disagree.mean()),
        },
    }
    return input_gate, uncertainty
