"""The ROC AUC and its confidence intervals against their definitions (plain numpy, no Ray)."""

import numpy as np
import pytest

from skin_ray import classifier_stats
from skin_ray.testing import threshold_miss_rates


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and overlapping, rounded (so tied) scores of an imperfect classifier."""
    rng = np.random.default_rng(seed)
    y_true = rng.random(n) < 0.45
    return y_true, np.round(rng.random(n) * 0.6 + 0.4 * y_true, 2)


def test_roc_auc_is_the_share_of_correctly_ordered_pairs():
    y_true, p_cancer = scores(300)
    pos, neg = p_cancer[y_true], p_cancer[~y_true]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert classifier_stats.roc_auc(y_true, p_cancer) == pytest.approx(pairwise, abs=1e-12)


def test_roc_auc_interval_matches_the_bootstrap():
    y_true, p_cancer = scores(400)
    low, high = classifier_stats.roc_auc_interval(y_true, p_cancer)
    rng = np.random.default_rng(1)
    resampled = [classifier_stats.roc_auc(y_true[i], p_cancer[i]) for i in rng.integers(0, len(y_true), (1000, len(y_true)))]
    boot_low, boot_high = np.percentile(resampled, [2.5, 97.5])
    assert low < classifier_stats.roc_auc(y_true, p_cancer) < high
    assert (high - low) == pytest.approx(boot_high - boot_low, rel=0.15)
    assert low == pytest.approx(boot_low, abs=0.01) and high == pytest.approx(boot_high, abs=0.01)
    # Four times the cases, half the width.
    big_low, big_high = classifier_stats.roc_auc_interval(*scores(1600))
    assert (big_high - big_low) == pytest.approx((high - low) / 2, rel=0.2)


def test_roc_auc_difference_interval_matches_the_paired_bootstrap():
    y_true, p_a = scores(400)
    p_b = np.round(p_a + np.random.default_rng(2).normal(0, 0.06, len(p_a)), 2)  # a noisier copy of model a
    low, high = classifier_stats.roc_auc_difference_interval(y_true, p_a, p_b)
    rng = np.random.default_rng(3)
    differences = [
        classifier_stats.roc_auc(y_true[i], p_a[i]) - classifier_stats.roc_auc(y_true[i], p_b[i])
        for i in rng.integers(0, len(y_true), (1000, len(y_true)))
    ]
    boot_low, boot_high = np.percentile(differences, [2.5, 97.5])
    assert 0 < low < high  # the noisier copy ranks worse, and pairing sees it
    assert low == pytest.approx(boot_low, abs=0.005) and high == pytest.approx(boot_high, abs=0.005)
    # Unpaired, the two models' own intervals overlap: only the paired interval tells them apart.
    assert classifier_stats.roc_auc_interval(y_true, p_b)[1] > classifier_stats.roc_auc_interval(y_true, p_a)[0]
    assert classifier_stats.roc_auc_difference_interval(y_true, p_a, p_a) == (0.0, 0.0)


def test_roc_auc_interval_needs_both_classes():
    assert np.isnan(classifier_stats.roc_auc_interval(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1]))).all()


@pytest.mark.parametrize("n", [7, 100, 108, 300])
def test_wilson_interval_holds_its_share_and_stays_within_zero_and_one(n):
    """At every count, the interval holds the observed share and never leaves [0, 1] (at 0 or n the textbook
    formula's ends stray past them by rounding)."""
    for successes in range(n + 1):
        low, high = classifier_stats.wilson_interval(successes, n)
        assert 0.0 <= low <= successes / n <= high <= 1.0, (successes, n, low, high)


def test_binomial_tail_and_sensitivity_quantile_match_their_definitions():
    from math import comb

    for n, p, k in ((10, 0.3, 4), (25, 0.9, 24), (7, 0.5, 0), (7, 0.5, 8)):
        exact = sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert classifier_stats.binomial_tail(n, p, k) == pytest.approx(exact, abs=1e-12)
    # Every tail at once, as the threshold rule reads them: from 1 at k = 0 down to 0 past n.
    for p in (0.0, 0.37, 0.9, 1.0):
        tails = classifier_stats.binomial_tails(40, p)
        exact = [sum(comb(40, j) * p**j * (1 - p) ** (40 - j) for j in range(k, 41)) for k in range(42)]
        np.testing.assert_allclose(tails, exact, atol=1e-12)
    # Beta(1, 1) is uniform; Beta(n, 1) has the CDF x^n.
    assert classifier_stats.sensitivity_quantile(1, 1, 0.3) == pytest.approx(0.3, abs=1e-9)
    assert classifier_stats.sensitivity_quantile(5, 5, 0.05) == pytest.approx(0.05 ** (1 / 5), abs=1e-9)


def test_the_lower_bound_keeps_its_sensitivity_on_unseen_cases_where_the_exact_fit_does_not():
    """Scores of a classifier as good as ours (ROC AUC about 0.95), 554 cases as in our validation split."""
    rng = np.random.default_rng(1)
    y_true = rng.random(554) < 0.47
    p_cancer = classifier_stats.sigmoid(rng.normal(np.where(y_true, 1.6, -1.6), 1.2))
    rates = threshold_miss_rates(y_true, p_cancer, 0.9, trials=400)
    assert 0.3 < rates["exact_fit"] < 0.7  # about half of the time, as the issue measured
    assert rates["lower_bound"] < rates["exact_fit"] / 3, rates


def test_threshold_rule_describes_its_promise_and_its_price():
    y_true, p_cancer = scores(600, seed=3)
    threshold, rule = classifier_stats.threshold_keeping_sensitivity(y_true, p_cancer, 0.9, 0.95)
    assert rule["confidence_reached"] >= 0.95 and rule["sensitivity_ci95"][0] < 0.9 < rule["expected_sensitivity"]
    assert threshold <= rule["exact_fit_threshold"] and rule["specificity"] <= rule["exact_fit_specificity"]
    assert rule["cancers_at_or_above"] == (p_cancer[y_true] >= threshold).sum()
    # Too few cases for the confidence asked: every case above the threshold, and the confidence reached said.
    threshold, rule = classifier_stats.threshold_keeping_sensitivity(y_true[:20], p_cancer[:20], 0.9, 0.95)
    lowest_cancer = p_cancer[:20][y_true[:20]].min()
    assert (p_cancer[:20] >= threshold).sum() == (p_cancer[:20] >= lowest_cancer).sum() and rule["confidence_reached"] < 0.95


def test_a_threshold_lies_between_two_cases_not_on_one():
    """A cut at a case's own score leaves that case at float noise from it: recomputed on another CPU, the
    shipped model's boundary Cancer image scored 3.6e-7 below its threshold and became a false negative."""
    y_true, p_cancer = scores(600, seed=4)
    threshold, _ = classifier_stats.threshold_keeping_sensitivity(y_true, p_cancer, 0.9, 0.95)
    gap = np.abs(p_cancer - threshold).min()
    assert gap > 1e-6 and gap == pytest.approx(np.diff(np.sort(p_cancer))[np.searchsorted(np.sort(p_cancer), threshold) - 1] / 2)
    assert classifier_stats.below(0.5, np.array([0.2, 0.5, 0.9])) == 0.35
    assert classifier_stats.below(0.2, np.array([0.2, 0.5])) == 0.2


def test_ece_difference_interval_is_paired():
    rng = np.random.default_rng(5)
    p_cancer = rng.random(600)
    y_true = rng.random(600) < p_cancer  # calibrated by construction
    assert classifier_stats.ece_difference_interval(y_true, p_cancer, p_cancer) == (0.0, 0.0)
    overconfident = classifier_stats.sigmoid(3 * classifier_stats.log_odds(p_cancer))
    low, high = classifier_stats.ece_difference_interval(y_true, overconfident, p_cancer)
    ece = classifier_stats.expected_calibration_error
    difference = ece(y_true, overconfident) - ece(y_true, p_cancer)
    assert 0 < low < difference < high
