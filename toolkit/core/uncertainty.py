"""The uncertainty every reported accuracy carries: a 95 % interval over the images it was measured on.

An accuracy on n images is a binomial proportion; its Wilson score interval (scipy's
``binomtest(...).proportion_ci(method="wilson")``) keeps close to its nominal coverage even for
the small n and the accuracies near 1 that small-data runs give, where the textbook
``p ± 1.96 sqrt(p(1-p)/n)`` collapses to a zero-width interval at p = 1.

An AUROC (how well a score tells two groups of images apart) is the Mann-Whitney U statistic over
the pairs of one image from each group; its interval is scipy's percentile bootstrap, each group
resampled on its own (:func:`auroc_interval`). The difference between two models' accuracies on the
same images (float against int8) is paired: its interval resamples images, each with both models'
answers (:func:`difference_interval`); only the images on which the two disagree move it.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def accuracy_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for ``correct`` right out of ``n``."""
    from scipy.stats import binomtest

    if n <= 0:
        return (0.0, 1.0)
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def describe(accuracy: float, n: int, interval: tuple[float, float]) -> str:
    """``0.9583 (95% CI 0.86-0.99, 48 images)``: an accuracy with its uncertainty, for people."""
    return f"{accuracy:.4f} (95% CI {interval[0]:.2f}–{interval[1]:.2f}, {n} images)"


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``1 class``, ``4 classes``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{count} {noun}s"


def describe_change(drop: float, interval: tuple[float, float]) -> str:
    """An accuracy change with its paired interval, in the direction it went: ``0.8 points lower (95% CI -0.5 to
    2.4)``, ``0.7 points higher (95% CI -0.5 to 1.9)``; ``drop`` and ``interval`` are fractions, positive = lower."""
    points, low, high = 100 * drop, 100 * interval[0], 100 * interval[1]
    if round(points, 1) == 0:
        return f"the same accuracy (95% CI of the change {_points(-high, True)} to {_points(-low, True)} points)"
    if points > 0:
        return f"{_points(points)} points lower (95% CI {_points(low)} to {_points(high)})"
    return f"{_points(-points)} points higher (95% CI {_points(-high)} to {_points(-low)})"


def _points(value: float, sign: bool = False) -> str:
    """One decimal, never ``-0.0``; with ``sign`` a ``+`` on positive values."""
    value = round(value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{value:+.1f}" if sign and value else f"{value:.1f}"


def auroc(negatives, positives, axis: int = -1):
    """The probability that a positive's score is above a negative's (ties count a half): the area under the ROC
    curve, as ``sklearn.metrics.roc_auc_score``; along ``axis``, so that the bootstrap can vectorise it."""
    from scipy.stats import mannwhitneyu

    positives, negatives = np.asarray(positives), np.asarray(negatives)
    return mannwhitneyu(positives, negatives, axis=axis).statistic / (positives.shape[axis] * negatives.shape[axis])


def auroc_interval(negatives, positives, confidence: float = CONFIDENCE, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """(low, high) of the percentile-bootstrap interval of :func:`auroc`, negatives and positives resampled apart
    (the groups' sizes are fixed by the experiment, as the known and unknown test images are)."""
    if min(len(negatives), len(positives)) < 2:
        return (0.0, 1.0)
    return _percentile_bootstrap((negatives, positives), auroc, False, confidence, resamples, seed)


def _mean_difference(first, second, axis: int = -1):
    return np.mean(first, axis=axis) - np.mean(second, axis=axis)


def difference_interval(first_correct, second_correct, confidence: float = CONFIDENCE, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """(low, high) of the paired percentile-bootstrap interval of accuracy(first) - accuracy(second), from each
    image's right (1) or wrong (0) under the two models."""
    if len(first_correct) < 2:
        return (-1.0, 1.0)
    return _percentile_bootstrap((first_correct, second_correct), _mean_difference, True, confidence, resamples, seed)


def _percentile_bootstrap(samples, statistic, paired: bool, confidence: float, resamples: int,
                          seed: int) -> tuple[float, float]:
    """scipy's percentile-bootstrap interval of a vectorised ``statistic`` of ``samples`` (resampled together
    when ``paired``, each on its own otherwise), seeded, in batches of 200 resamples to bound the memory."""
    from scipy.stats import bootstrap

    ci = bootstrap(tuple(np.asarray(x, float) for x in samples), statistic, n_resamples=resamples,
                   confidence_level=confidence, method="percentile", vectorized=True, paired=paired,
                   rng=np.random.default_rng(seed), batch=200).confidence_interval
    return (float(ci.low), float(ci.high))
