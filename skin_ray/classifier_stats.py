"""Statistics of a binary classifier's quality on the Cancer probability, in plain numpy (named apart from Ray Serve's `metrics`).

Conventions: `y_true` is 1 for Cancer (the positive class) and 0 otherwise; `p_cancer` is the model's
Cancer probability; a case is called Cancer when `p_cancer >= threshold`.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def roc_auc(y_true: np.ndarray, p_cancer: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction)."""
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(p_cancer, dtype=np.float64))
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_interval(y_true: np.ndarray, p_cancer: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the ROC AUC by DeLong's method (normal approximation, clipped to [0, 1]).

    It says how far the AUC of a few hundred validation images could move by the luck of which images were
    drawn.
    """
    low, high = _delong_interval(y_true, [p_cancer], [1.0], level)
    return float(np.clip(low, 0.0, 1.0)), float(np.clip(high, 0.0, 1.0))  # np.clip keeps a NaN, max() would not


def roc_auc_difference_interval(
    y_true: np.ndarray, p_cancer_a: np.ndarray, p_cancer_b: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Confidence interval of AUC(a) - AUC(b) for two models scored on the same images (paired DeLong).

    Pairing removes the luck of the draw that both models share, so this is far narrower than comparing the
    two models' own intervals: an interval that excludes 0 means one model ranks these cases better.
    """
    return _delong_interval(y_true, [p_cancer_a, p_cancer_b], [1.0, -1.0], level)


def ece_difference_interval(
    y_true: np.ndarray, p_cancer_a: np.ndarray, p_cancer_b: np.ndarray, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval of ECE(a) - ECE(b) for two models scored on the same images, resampled together
    (ECE has no closed-form variance; a fixed seed makes the interval reproducible)."""
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(resamples):
        i = rng.integers(0, len(y_true), len(y_true))
        ece_a, ece_b = expected_calibration_error(y_true[i], p_cancer_a[i]), expected_calibration_error(y_true[i], p_cancer_b[i])
        differences.append(ece_a - ece_b)
    low, high = np.quantile(differences, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _delong_interval(y_true, scores: list[np.ndarray], weights: list[float], level: float) -> tuple[float, float]:
    """Normal interval of the weighted sum of the models' AUCs, from the covariance of their placements.

    A Cancer case's placement is the share of Non_Cancer cases it outranks, a Non_Cancer case's the share of
    Cancer cases that outrank it (ties count half); the AUC is the mean of either. Placements come
    from ranks, so this runs in O(n log n) on any number of images (Sun and Xu, 2014).
    """
    y_true = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos < 2 or n_neg < 2:
        return float("nan"), float("nan")
    positive_placements, negative_placements = [], []
    for p_cancer in scores:
        p_cancer = np.asarray(p_cancer, dtype=np.float64)
        ranks = _average_ranks(p_cancer)
        positive_placements.append((ranks[y_true] - _average_ranks(p_cancer[y_true])) / n_neg)
        negative_placements.append(1.0 - (ranks[~y_true] - _average_ranks(p_cancer[~y_true])) / n_pos)
    weights = np.asarray(weights)
    estimate = float(weights @ np.mean(positive_placements, axis=1))
    covariance = np.atleast_2d(np.cov(positive_placements)) / n_pos + np.atleast_2d(np.cov(negative_placements)) / n_neg
    half_width = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(max(0.0, float(weights @ covariance @ weights)))
    return estimate - half_width, estimate + half_width


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Tied values share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def roc_curve(y_true: np.ndarray, p_cancer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every distinct threshold, from (0, 0) to (1, 1)."""
    y_true = np.asarray(y_true).astype(bool)
    thresholds = np.r_[np.inf, np.unique(p_cancer)[::-1]]
    tpr = np.array([(p_cancer[y_true] >= t).mean() for t in thresholds])
    fpr = np.array([(p_cancer[~y_true] >= t).mean() for t in thresholds])
    return fpr, tpr


def confusion(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float) -> dict[str, int]:
    y_true = np.asarray(y_true).astype(bool)
    called = np.asarray(p_cancer) >= threshold
    return {
        "tp": int((called & y_true).sum()),
        "fn": int((~called & y_true).sum()),
        "fp": int((called & ~y_true).sum()),
        "tn": int((~called & ~y_true).sum()),
    }


def expected_calibration_error(y_true: np.ndarray, p_cancer: np.ndarray, bins: int = 10) -> float:
    """ECE of the Cancer probability: over `bins` equal-width bins, the case-weighted mean of
    |observed Cancer rate - mean predicted probability|."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p_cancer = np.asarray(p_cancer, dtype=np.float64)
    which = np.minimum((p_cancer * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * abs(y_true[in_bin].mean() - p_cancer[in_bin].mean())
    return float(total / len(y_true))


def reliability(y_true: np.ndarray, p_cancer: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: mean predicted probability, observed Cancer rate, count (empty bins dropped)."""
    which = np.minimum((np.asarray(p_cancer) * bins).astype(int), bins - 1)
    rows = [
        (p_cancer[which == b].mean(), np.asarray(y_true)[which == b].mean(), int((which == b).sum()))
        for b in range(bins)
        if (which == b).any()
    ]
    predicted, observed, counts = (np.array(column) for column in zip(*rows, strict=True))
    return predicted, observed, counts


def threshold_for_sensitivity(y_true: np.ndarray, p_cancer: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (y_true, p_cancer) is at least `target`."""
    positives = np.sort(np.asarray(p_cancer)[np.asarray(y_true).astype(bool)])[::-1]
    if len(positives) == 0:
        raise ValueError("no Cancer cases to choose a threshold on")
    needed = max(1, math.ceil(target * len(positives)))
    return below(positives[needed - 1], p_cancer)


def below(boundary: float, values: np.ndarray) -> float:
    """Halfway from `boundary` (one of `values`) to the next lower of `values`: a cut that keeps every value at
    or above `boundary` on its side, also when the values are recomputed on another CPU. A cut at a value
    itself would leave that case at float noise from it (seen: 3.6e-7, a Cancer image that fell below)."""
    lower = np.asarray(values)[np.asarray(values) < boundary]
    return float((boundary + lower.max()) / 2) if len(lower) else float(boundary)


def binomial_tails(n: int, p: float) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(n, p) and every k = 0..n+1, in one reverse cumulative sum of the pmf."""
    if p <= 0.0 or p >= 1.0:
        return (np.arange(n + 2) <= (n if p >= 1.0 else 0)).astype(float)
    j = np.arange(n + 1)
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1)))))
    log_choose = log_factorial[n] - log_factorial[j] - log_factorial[n - j]
    pmf = np.exp(log_choose + j * math.log(p) + (n - j) * math.log1p(-p))
    return np.minimum(1.0, np.append(np.cumsum(pmf[::-1])[::-1], 0.0))


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(binomial_tails(n, p)[min(max(k, 0), n + 1)])


def sensitivity_quantile(k: int, n: int, q: float) -> float:
    """The q-quantile of the sensitivity on new cases at the k-th highest of n Cancer scores: Beta(k, n+1-k),
    whose CDF at x is P(Binomial(n, x) >= k); found by bisection."""
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_tail(n, middle, k) < q else (low, middle)
    return (low + high) / 2


def threshold_keeping_sensitivity(
    y_true: np.ndarray, p_cancer: np.ndarray, target: float, confidence: float
) -> tuple[float, dict]:
    """The highest threshold whose sensitivity on new cases of the same kind is at least `target` with
    probability `confidence`, and a description of the choice for bundle.json.

    At the k-th highest of n Cancer scores the sensitivity on the population the cases came from is
    Beta(k, n+1-k) distributed, whatever the scores' distribution (order statistics of exchangeable cases),
    so it falls below `target` with probability P(Binomial(n, target) >= k). The rule takes the smallest k
    for which that is at most 1 - confidence; when even k = n is not enough (too few cases), it takes n and
    reports the confidence reached. Fitting the sensitivity exactly (`threshold_for_sensitivity`) falls short
    on new cases about half of the time.
    """
    y_true = np.asarray(y_true).astype(bool)
    positives = np.sort(np.asarray(p_cancer)[y_true])[::-1]
    n = len(positives)
    if n == 0:
        raise ValueError("no Cancer cases to choose a threshold on")
    tails = binomial_tails(n, target)
    enough = np.flatnonzero(tails[1 : n + 1] <= 1 - confidence)
    k = int(enough[0]) + 1 if len(enough) else n
    threshold = below(positives[k - 1], p_cancer)
    exact_fit = threshold_for_sensitivity(y_true, p_cancer, target)
    negatives = np.asarray(p_cancer)[~y_true]

    def specificity(at: float) -> float:
        return float((negatives < at).mean()) if len(negatives) else float("nan")

    return threshold, {
        "rule": "lower confidence bound: just below the k-th highest Cancer score, k the fewest for which the "
        "sensitivity on new cases is below the target with probability at most 1 - confidence (Beta(k, n+1-k))",
        "target_sensitivity": target,
        "confidence_reached": float(1 - tails[k]),
        "cancers": n,
        "cancers_at_or_above": int((positives >= threshold).sum()),
        "expected_sensitivity": k / (n + 1),
        "sensitivity_ci95": (sensitivity_quantile(k, n, 0.025), sensitivity_quantile(k, n, 0.975)),
        "specificity": specificity(threshold),
        "exact_fit_threshold": exact_fit,
        "exact_fit_specificity": specificity(exact_fit),
    }


def threshold_within_strata(
    y_true: np.ndarray, p_cancer: np.ndarray, strata, target: float, threshold: float
) -> tuple[float, dict]:
    """`threshold`, lowered where needed so that every stratum (a data source) with Cancer cases keeps at least
    `target` sensitivity on its own cases: a model can meet a promise overall by one source's easy cancers while
    missing another's. Returns the threshold and, per stratum, its cases and the threshold it alone would take."""
    y_true, p_cancer, strata = np.asarray(y_true).astype(bool), np.asarray(p_cancer), np.asarray(strata, dtype=str)
    per_stratum = {}
    for stratum in sorted(set(strata[y_true].tolist())):
        positives = np.sort(p_cancer[y_true & (strata == stratum)])[::-1]
        own = below(positives[max(1, math.ceil(target * len(positives))) - 1], p_cancer)  # between two of all cases
        per_stratum[stratum] = {"cancers": len(positives), "exact_fit_threshold": own}
        threshold = min(threshold, own)
    return float(threshold), per_stratum


def summary(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float) -> dict[str, float | int | tuple[float, float]]:
    """The headline figures at `threshold`: n, accuracy, roc_auc (with its 95% interval), sensitivity,
    specificity, ece."""
    counts = confusion(y_true, p_cancer, threshold)
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    return {
        "n": int(len(y_true)),
        "accuracy": (counts["tp"] + counts["tn"]) / max(1, len(y_true)),
        "roc_auc": roc_auc(y_true, p_cancer),
        "roc_auc_ci95": roc_auc_interval(y_true, p_cancer),
        "sensitivity": counts["tp"] / positives if positives else float("nan"),
        "specificity": counts["tn"] / negatives if negatives else float("nan"),
        "threshold": float(threshold),
        "ece": expected_calibration_error(y_true, p_cancer),
        **counts,
    }


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a share `successes`/`n` (nan, nan without cases)."""
    if n == 0:
        return float("nan"), float("nan")
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # It holds the share and lies within [0, 1]; at 0 or n successes rounding strays past either by 1e-16.
    return float(min(max(centre - half, 0.0), share)), float(max(min(centre + half, 1.0), share))


def by_group(y_true: np.ndarray, p_cancer: np.ndarray, threshold: float, values) -> dict[str, dict]:
    """The figures of each group of images (`values`, one per image: a source, a diagnosis, a sex): its size,
    sensitivity and specificity at `threshold` with 95% Wilson intervals, and its ROC AUC where it has both classes."""
    y_true, p_cancer, values = np.asarray(y_true).astype(bool), np.asarray(p_cancer), np.asarray(values, dtype=str)
    figures = {}
    for value in sorted(set(values.tolist())):
        chosen = values == value
        truth, called = y_true[chosen], p_cancer[chosen] >= threshold
        cancers, benign = int(truth.sum()), int((~truth).sum())
        detected, cleared = int((called & truth).sum()), int((~called & ~truth).sum())
        figures[value or "(none)"] = {
            "n": int(chosen.sum()), "cancers": cancers,
            "sensitivity": detected / cancers if cancers else None,
            "sensitivity_ci95": wilson_interval(detected, cancers) if cancers else None,
            "specificity": cleared / benign if benign else None,
            "specificity_ci95": wilson_interval(cleared, benign) if benign else None,
            "roc_auc": roc_auc(truth.astype(np.int64), p_cancer[chosen]) if cancers and benign else None,
        }
    return figures


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


def log_odds(p: np.ndarray) -> np.ndarray:
    """The inverse of `sigmoid`, in float64, finite for probabilities of exactly 0 or 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_platt(y_true: np.ndarray, logit_gap: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Fit (a, c) so that sigmoid(a * logit_gap + c) is calibrated, by Newton's method on the log loss.

    `logit_gap` is log p(Cancer) - log p(Non_Cancer). Platt scaling rather than temperature alone because
    class-weighted training also shifts the prior, which a temperature cannot undo. A calibration must keep
    the ranking, so when the best slope is not positive (a model no better than chance) the slope is pinned
    near zero and only the offset is fitted: every case then gets about the base rate.
    """
    x = np.asarray(logit_gap, dtype=np.float64)
    scale, offset = _newton_log_loss(y_true, np.stack([x, np.ones_like(x)], axis=1), iterations)
    if scale > 0:
        return float(scale), float(offset)
    scale = 1e-3
    (offset,) = _newton_log_loss(y_true, np.ones((len(x), 1)), iterations, base=scale * x)
    return scale, float(offset)


def _newton_log_loss(y_true, design: np.ndarray, iterations: int, base: np.ndarray | float = 0.0) -> np.ndarray:
    """Parameters w minimising the log loss of sigmoid(base + design @ w)."""
    y = np.asarray(y_true, dtype=np.float64)
    params = np.zeros(design.shape[1])
    params[0] = 1.0 if design.shape[1] == 2 else 0.0
    for _ in range(iterations):
        p = sigmoid(base + design @ params)
        gradient = design.T @ (p - y)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(design.shape[1])
        step = np.linalg.solve(hessian, gradient)
        params -= step
        if np.abs(step).max() < 1e-9:
            break
    return params
