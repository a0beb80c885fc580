"""Every accuracy carries a 95 % interval: its coverage where the true accuracy is known."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.core.uncertainty import accuracy_interval, describe


@pytest.mark.parametrize("true_accuracy, n", [(0.8, 40), (0.95, 48), (0.6, 200)])
def test_the_interval_covers_the_true_accuracy_95_percent_of_the_time(true_accuracy, n):
    """2000 simulated validation sets of n images, each image right with the true accuracy."""
    rng = np.random.default_rng(0)
    correct = rng.binomial(n, true_accuracy, size=2000)
    covered = np.mean([lo <= true_accuracy <= hi for lo, hi in (accuracy_interval(int(k), n) for k in correct)])
    assert 0.90 <= covered <= 0.98, covered  # Wilson: close to 95 %, a little under at some (p, n)


def test_the_interval_is_honest_at_the_edges_and_shrinks_with_more_images():
    low, high = accuracy_interval(48, 48)
    assert high == pytest.approx(1.0) and 0.92 < low < 0.93  # all 48 right: still not "1.0 +- 0"
    narrow, wide = accuracy_interval(400, 500), accuracy_interval(40, 50)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2.5
    assert describe(0.9583, 48, accuracy_interval(46, 48)) == "0.9583 (95% CI 0.86–0.99, 48 images)"


def test_the_auroc_interval_covers_the_true_auroc_and_agrees_with_scikit_learn():
    """300 simulated known/unknown score sets (normal scores one sd apart: true AUROC = Phi(1 / sqrt 2))."""
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score

    from toolkit.core.uncertainty import auroc, auroc_interval

    rng, truth = np.random.default_rng(0), norm.cdf(1 / np.sqrt(2))
    known, unknown = rng.normal(0, 1, (300, 60)), rng.normal(1, 1, (300, 25))
    intervals = [auroc_interval(k, u, resamples=500, seed=i) for i, (k, u) in enumerate(zip(known, unknown))]
    covered = np.mean([lo <= truth <= hi for lo, hi in intervals])
    assert 0.88 <= covered <= 0.99, covered  # percentile bootstrap: near 95 %, a little under at small n
    labels = np.r_[np.zeros(60), np.ones(25)]
    assert auroc(known[0], unknown[0]) == pytest.approx(roc_auc_score(labels, np.r_[known[0], unknown[0]]))
    ties = np.r_[known[0].round(), unknown[0].round()]  # ties count a half, as in scikit-learn
    assert auroc(ties[:60], ties[60:]) == pytest.approx(roc_auc_score(labels, ties))
    low, high = intervals[0]
    assert low < auroc(known[0], unknown[0]) < high and auroc_interval(known[0], unknown[0] + 100) == (1.0, 1.0)


def test_the_paired_difference_interval_covers_the_true_drop_and_is_paired():
    """300 simulated test sets of 200 images: a float model right on 85 %; its int8 copy gets 4 % of those wrong
    and 10 % of the others right, so the true drop is 0.85 * 0.04 - 0.15 * 0.10 = 1.9 points."""
    from toolkit.core.uncertainty import difference_interval

    rng, truth = np.random.default_rng(0), 0.85 * 0.04 - 0.15 * 0.10
    first = rng.random((300, 200)) < 0.85
    second = np.where(first, rng.random(first.shape) >= 0.04, rng.random(first.shape) < 0.10)
    intervals = [difference_interval(f, s, resamples=500, seed=i) for i, (f, s) in enumerate(zip(first, second))]
    covered = np.mean([lo <= truth <= hi for lo, hi in intervals])
    assert 0.88 <= covered <= 0.985, covered  # paired: only the images the two disagree on move it
    low, high = intervals[0]
    assert low <= first[0].mean() - second[0].mean() <= high and high - low < 0.09  # unpaired: 0.14 wide
    assert difference_interval(first[0], first[0]) == (0.0, 0.0)  # identical answers: no difference at all


def test_changes_and_counts_are_worded_in_the_direction_they_went():
    from toolkit.core.uncertainty import describe_change

    assert describe_change(0.008, (-0.005, 0.024)) == "0.8 points lower (95% CI -0.5 to 2.4)"
    assert describe_change(-0.0066, (-0.019, 0.005)) == "0.7 points higher (95% CI -0.5 to 1.9)"
    assert describe_change(0.0, (-0.003, 0.005)) == "the same accuracy (95% CI of the change -0.5 to +0.3 points)"
    assert describe_change(0.0, (0.0, 0.0)) == "the same accuracy (95% CI of the change 0.0 to 0.0 points)"
    assert describe_change(0.0004, (-0.0004, 0.012)) == "the same accuracy (95% CI of the change -1.2 to 0.0 points)"


def test_plurals_of_counted_nouns():
    from toolkit.core.uncertainty import plural

    assert [plural(1, "image"), plural(0, "image"), plural(2, "outlier")] == ["1 image", "0 images", "2 outliers"]
    assert [plural(1, "class"), plural(4, "class"), plural(3, "near-duplicate pair")] == [
        "1 class", "4 classes", "3 near-duplicate pairs"]
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
