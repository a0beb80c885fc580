"""The uncertainty every reported accuracy carries: a 95 % interval over the images it was measured on.

An accuracy on n images is a binomial proportion; its Wilson score interval (scipy's
``binomtest(...).proportion_ci(method="wilson")``) keeps close to its nominal coverage even for
the small n and the accuracies near 1 that small-data runs give, where the textbook
``p ± 1.96 sqrt(p(1-p)/n)`` collapses to a zero-width interval at p = 1.
"""

from __future__ import annotations

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
