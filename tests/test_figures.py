"""Figures: audit.png captions stay inside their columns; training curves count whole epochs, one included."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from toolkit.data.audit_report import gallery_figure
from toolkit.predict.figures import curves_figure


@pytest.mark.parametrize("count", [1, 2, 7])
def test_captions_of_neighbouring_findings_never_overlap(sample_data, count):
    images = sorted((sample_data / "square").iterdir())[:7]
    findings = pd.DataFrame({
        "path": [str(p) for p in images],
        "issue": ["outlier", "label", "near_duplicate"] * 2 + ["outlier"],
        "given_label": ["square"] * 7,
        "suggested_label": ["a very long suggested class name"] * 7,
        "score": [0.79] * 7,
        "duplicate_of": [str(images[0])] * 7,
        "note": ["far from every other image of every class in the data"] * 7,
    }).head(count)
    fig = gallery_figure(findings)
    renderer = fig.canvas.get_renderer()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == count
    for ax in titled:  # a caption no wider than its column
        column = fig.bbox.width / min(6, count)
        assert ax.title.get_window_extent(renderer).width <= column, ax.get_title()
    boxes = [ax.title.get_window_extent(renderer) for ax in titled]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 45])
def test_training_curves_have_whole_epoch_ticks_and_a_marker_per_epoch(epochs):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"loss": rng.random(epochs), "val_loss": rng.random(epochs),
                          "accuracy": rng.random(epochs), "val_accuracy": rng.random(epochs)})
    fig = curves_figure(frame)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert len(ax.lines) == 2 and all(line.get_marker() not in (None, "None", "") for line in ax.lines)
        assert all(len(line.get_xdata()) == epochs for line in ax.lines)
