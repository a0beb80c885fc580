"""The figures of runs and evaluations, as PNG bytes (written to files, or embedded in report.html).

Each reads well at every run size: markers and whole-number epochs (one epoch is one visible point), titles
that say what was measured on what, nothing clipped (``bbox_inches="tight"``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from toolkit.core.pictures import png_bytes, pyplot, short_name, thumbnail


def curve_labels(frame) -> tuple[str, str, str]:
    """(training line, validation line, x-axis label) for a history: a cross-validated run has held-out folds."""
    stages = set(frame["stage"]) if "stage" in frame else set()
    if stages == {"cv"}:
        return ("training folds", "held-out folds (out-of-fold)", "epoch (all fold heads train together)")
    x_label = "epoch (stage 1: head, then stage 2: fine-tuning)" if "finetune" in stages else "epoch"
    return ("training (augmented views)", "validation split", x_label)


def curves_png(frame) -> bytes:
    """Loss and accuracy per epoch of every stage (:func:`curves_figure`), PNG bytes."""
    return png_bytes(curves_figure(frame))


def curves_figure(frame):
    """Loss and accuracy per epoch of every stage (a line where fine-tuning starts); epochs are whole numbers, one
    epoch included, and each is marked."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(frame) + 1)
    train_label, val_label, x_label = curve_labels(frame)
    marker = 4 if len(frame) <= 60 else 0
    for ax, metric, title in zip(axes, ("loss", "accuracy"), ("loss (cross-entropy)", "accuracy")):
        for key, label, style in ((metric, train_label, "o-"), (f"val_{metric}", val_label, "s--")):
            if key in frame and frame[key].notna().any():
                ax.plot(x, frame[key], style, label=label, markersize=marker)
        if "stage" in frame and (frame["stage"] == "finetune").any():
            ax.axvline((frame["stage"] == "head").sum() + 0.5, color="grey", lw=0.8, ls=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, len(frame) + 0.5)
        ax.set_xlabel(x_label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], title: str = "confusion matrix") -> bytes:
    """Rows normalised (the colour is the share of the true class), each cell its count and share."""
    plt = pyplot()
    confusion = np.asarray(confusion)
    n = len(class_names)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = 2.5 + 0.55 * n
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    colour_bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    colour_bar.set_label("share of the true class")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    size = 8 if n <= 8 else 6
    for i in range(n):
        for j in range(n):
            if confusion[i, j] or i == j:
                ax.text(j, i, f"{confusion[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=size,
                        color="white" if share[i, j] > 0.5 else "black")
    return png_bytes(fig)


def reliability_png(probs: np.ndarray, labels: np.ndarray, calibrated: np.ndarray | None, source: str,
                    bins: int = 10) -> bytes:
    """Accuracy against confidence per confidence bin, before and after temperature scaling (``calibrated``; None:
    ``probs`` alone, already scaled); ``source`` says which predictions they are (the validation split, or the
    out-of-fold predictions of every image)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    edges = np.linspace(0, 1, bins + 1)
    lines = [(probs, "raw", "o-"), (calibrated, "temperature-scaled", "s--")] if calibrated is not None else \
        [(probs, "predicted probabilities", "o-")]
    for p, name, style in lines:
        confidence, correct = p.max(1), p.argmax(1) == labels
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = (confidence > lo) & (confidence <= hi)
            if mask.any():
                xs.append(confidence[mask].mean())
                ys.append(correct[mask].mean())
        ax.plot(xs, ys, style, label=name, markersize=4)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"calibration\n{source}, {len(labels)} images", fontsize=10)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, count: int = 16) -> np.ndarray:
    """Indices of the most confident mistakes, most confident first: the errors most worth a human look."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]


def mistake_caption(path: str, probs: np.ndarray, label: int, class_names: Sequence[str]) -> list[str]:
    """File name, true class, predicted class and its probability: the lines under a mistake's picture."""
    predicted = int(probs.argmax())
    return [short_name(path), f"true: {class_names[label]}",
            f"predicted: {class_names[predicted]} ({probs[predicted]:.2f})"]


def mistakes_png(paths, probs: np.ndarray, labels: np.ndarray, class_names, count: int = 16,
                 shown_paths=None) -> bytes:
    """A grid of the most confident mistakes, each with its file name, true and predicted class.

    ``paths`` are the files to draw (a converted copy for formats Pillow cannot read); ``shown_paths`` the names
    to print (the user's own files; default ``paths``)."""
    plt = pyplot()
    shown_paths = paths if shown_paths is None else shown_paths
    wrong = confident_mistakes(probs, labels, count)
    cols = min(4, max(1, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not len(wrong):
        axes[0, 0].text(0.5, 0.5, f"no mistakes on {len(labels)} images", ha="center", va="center", fontsize=12)
    for ax, i in zip(axes.ravel(), wrong):
        pixels = thumbnail(paths[i], 256)
        if pixels is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        else:
            ax.imshow(pixels)
        ax.set_title("\n".join(mistake_caption(str(shown_paths[i]), probs[i], labels[i], class_names)), fontsize=8)
    fig.suptitle(f"most confident mistakes: {len(wrong)} shown of {int((probs.argmax(1) != labels).sum())} on "
                 f"{len(labels)} images", fontsize=10)
    return png_bytes(fig, dpi=80)
