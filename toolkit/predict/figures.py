"""The figures of runs and evaluations, as PNG bytes (written to files, or embedded in report.html)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buffer.getvalue()


def curves_png(frame) -> bytes:
    """Loss and accuracy per epoch of both stages (a line where fine-tuning starts)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(frame) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in frame:
                ax.plot(x, frame[key], style, label=key)
        if "stage" in frame and (frame["stage"] == "finetune").any():
            ax.axvline((frame["stage"] == "head").sum() + 0.5, color="grey", lw=0.8)
        ax.set_xlabel("epoch (head, then fine-tune)")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def confusion_png(confusion: np.ndarray, class_names: Sequence[str]) -> bytes:
    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center",
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def reliability_png(probs: np.ndarray, labels: np.ndarray, calibrated: np.ndarray, bins: int = 10) -> bytes:
    """Accuracy against confidence per confidence bin, before and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, bins + 1)
    for p, name, style in ((probs, "raw", "o-"), (calibrated, "temperature-scaled", "s--")):
        confidence, correct = p.max(1), p.argmax(1) == labels
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = (confidence > lo) & (confidence <= hi)
            if mask.any():
                xs.append(confidence[mask].mean())
                ys.append(correct[mask].mean())
        ax.plot(xs, ys, style, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("calibration (validation split)")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def mistakes_png(paths, probs: np.ndarray, labels: np.ndarray, class_names, count: int = 16) -> bytes:
    """A grid of the most confident mistakes: the errors most worth a human look."""
    from PIL import Image

    plt = _pyplot()
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:count]
    cols = 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0, 0.5, "no mistakes", fontsize=14)
    for ax, i in zip(axes.ravel(), wrong):
        with Image.open(paths[i]) as im:
            im.thumbnail((256, 256))
            ax.imshow(np.asarray(im.convert("RGB")))
        ax.set_title(f"true {class_names[labels[i]]}\npred {class_names[predicted[i]]} ({probs[i, predicted[i]]:.2f})",
                     fontsize=9)
    fig.tight_layout()
    return _png(fig, dpi=80)
