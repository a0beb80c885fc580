"""The report sections that runs, cross-validated runs, ensembles and evaluations share: metrics per class, the
confusion matrix, calibration, the most confident mistakes and the files that were skipped
(see :mod:`toolkit.core.html_page` for the page itself)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from toolkit.core import html_page as hp
from toolkit.core.pictures import thumbnail_jpeg
from toolkit.core.uncertainty import describe, plural
from toolkit.predict.figures import confident_mistakes, confusion_png, mistake_caption, reliability_png

MISTAKES_SHOWN = 24


def metrics_section(measured: dict[str, Any], source: str, title: str = "Accuracy") -> hp.Section:
    """Accuracy with its interval and count, macro F1, and precision/recall/F1 per class; ``source`` says on which
    images (``"the validation split"``, ``"out-of-fold predictions of every image"``, ``"test/"``)."""
    top5 = f"; top-5 accuracy {measured['top5_accuracy']:.4f}" if "top5_accuracy" in measured else ""
    summary = (f"Accuracy {describe(measured['accuracy'], measured['n'], measured['accuracy_ci95'])} on {source}"
               f"{top5}; macro F1 {measured['macro_f1']:.4f}.")
    rows = [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in measured["per_class"].items()]
    return hp.Section("metrics", title, hp.paragraph(summary) + hp.table(
        ["class", "precision", "recall", "F1", "images"], rows))


def confusion_section(measured: dict[str, Any], source: str) -> hp.Section:
    png = confusion_png(np.asarray(measured["confusion_matrix"]), measured["class_names"],
                        f"{source}, {measured['n']} images")
    return hp.Section("confusion", "Confusion matrix", hp.paragraph(
        "Rows are the true classes; each cell holds its count and its share of the row.", "note")
        + hp.figure(png, "confusion matrix"))


def calibration_section(probs: np.ndarray, labels: np.ndarray, calibrated: np.ndarray | None, source: str,
                        words: str) -> hp.Section:
    """The reliability diagram, raw and temperature-scaled, with ``words`` on how the temperature was fitted."""
    return hp.Section("calibration", "Calibration", hp.paragraph(words) + hp.figure(
        reliability_png(probs, labels, calibrated, source), "reliability diagram"))


def mistakes_section(paths: Sequence[str], decode_paths: Sequence[str], probs: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str], source: str, count: int = MISTAKES_SHOWN) -> hp.Section:
    """The most confident mistakes as thumbnails, each with file name, true and predicted class and probability."""
    wrong = confident_mistakes(probs, labels, count)
    total = int((probs.argmax(1) != labels).sum())
    thumbs = [hp.Thumb(thumbnail_jpeg(decode_paths[i]), mistake_caption(paths[i], probs[i], labels[i], class_names)
                       + [str(paths[i])]) for i in wrong]
    head = hp.paragraph(f"{plural(total, 'mistake')} on {source} ({len(labels)} images); the "
                        f"{len(wrong)} most confident first.", "note") if total else ""
    return hp.Section("mistakes", "Most confident mistakes", head + hp.gallery(
        thumbs, f"No mistakes on {source} ({plural(len(labels), 'image')})."))


def problems_section(problems: Sequence) -> hp.Section:
    """Files skipped, warned about or handled automatically (``toolkit.data.discovery.Problem`` rows)."""
    if not problems:
        return hp.Section("problems", "Problems found", hp.paragraph("None: every file was usable as it is."))
    counts = {s: sum(p.severity == s for p in problems) for s in ("skipped", "warning", "info")}
    summary = (f"{plural(counts['skipped'], 'file')} skipped, {plural(counts['warning'], 'warning')}, "
               f"{counts['info']} handled automatically.")
    rows = [[p.severity, p.path, p.reason] for p in problems]
    return hp.Section("problems", "Problems found", hp.paragraph(summary) + hp.table(
        ["severity", "file", "reason"], rows, [p.severity for p in problems]))
