"""Every accuracy carries a 95 % interval: its coverage where the true accuracy is known."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.uncertainty import accuracy_interval, describe


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
