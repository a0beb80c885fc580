"""What a multi-label run and a multi-label evaluation show: the estimate and each label's results, the images
with the worst decisions, and the predictions as a CSV (``labels`` joined by ``;`` and every label's probability).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from toolkit.core import html_page as hp
from toolkit.core.pictures import short_name, thumbnail_jpeg
from toolkit.core.uncertainty import plural
from toolkit.data.discovery import SEPARATOR
from toolkit.predict.multilabel_metrics import MultiLabelMetrics, predicted

MISTAKES_SHOWN = 24


def joined(row: np.ndarray, class_names: Sequence[str]) -> str:
    """The classes of a 0/1 row, joined as a ``labels`` cell is written."""
    return SEPARATOR.join(name for name, on in zip(class_names, row) if on)


def estimate_line(metrics: dict[str, Any]) -> str:
    """The run's estimate for people, with its interval and count (``toolkit finetune`` prints it)."""
    e = metrics["estimate"]
    low, high = e["macro_ap_interval"]
    return (f"expected macro mAP on new images: {e['macro_ap']:.4f} (95% CI {low:.2f}–{high:.2f}), "
            f"{metrics['folds']}-fold cross-validation over {e['images']} images (each scored by "
            f"{metrics['estimate_heads']} heads that never saw it; the model averages {metrics['heads']}); "
            f"micro mAP {e['micro_ap']:.4f}, exact match {e['exact_match']:.4f}, Jaccard {e['jaccard']:.4f} at the "
            "chosen thresholds")


def predictions_table(paths: Sequence[str], probs: np.ndarray, thresholds: np.ndarray, class_names: Sequence[str],
                      targets: np.ndarray | None = None):
    """One row per image: path, (true ``labels``,) predicted ``labels``, ``prob_<class>`` for every class."""
    import pandas as pd

    decided = predicted(probs, thresholds)
    columns = {"path": [str(p) for p in paths]}
    if targets is not None:
        columns["true_labels"] = [joined(t, class_names) for t in targets]
    columns["labels"] = [joined(d, class_names) for d in decided]
    columns |= {f"prob_{name}": probs[:, c].astype(float) for c, name in enumerate(class_names)}
    return pd.DataFrame(columns)


def predictions_frame(paths: Sequence[str], probs: np.ndarray, thresholds: np.ndarray, class_names: Sequence[str],
                      errors: dict[str, str]):
    """``toolkit predict``'s rows for a multi-label run, one per input path: ``path``, ``labels`` (every label at or
    above its threshold, joined by ``;``; empty when none), ``prob_<class>`` for every class, and ``error`` (why an
    unreadable file has no prediction)."""
    import pandas as pd

    from toolkit.data.discovery import printable

    readable = [p for p in paths if p not in errors]
    table = predictions_table(readable, probs, thresholds, class_names)
    table["path"] = [printable(p) for p in readable]
    table["error"] = ""
    unreadable = [p for p in paths if p in errors]
    if not unreadable:
        return table
    failed = pd.DataFrame({"path": [printable(p) for p in unreadable], "labels": "",
                           "error": [errors[p] for p in unreadable]})
    position = {p: i for i, p in enumerate(paths)}
    order = np.argsort([position[p] for p in readable + unreadable], kind="stable")  # the rows in the input's order
    return pd.concat([table, failed], ignore_index=True).iloc[order].reset_index(drop=True).reindex(
        columns=table.columns)


def csv_text(frame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


def labels_section(measured: MultiLabelMetrics, source: str, thresholds_from: str) -> hp.Section:
    """The estimate with its interval and count, then per label: images, average precision, threshold, precision,
    recall and F1 at it."""
    summary = f"{measured.describe()} on {source}. Each label is predicted at or above its threshold, {thresholds_from}."
    rows = [[r.name, r.support, r.average_precision, r.threshold, r.precision, r.recall, r.f1] for r in measured.labels]
    return hp.Section("labels", "Labels", hp.paragraph(summary) + hp.table(
        ["label", "images", "average precision", "threshold", "precision", "recall", "F1"], rows))


def worst_decisions(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, count: int) -> np.ndarray:
    """Images with at least one wrong label, the one whose wrong decision is farthest past its threshold first."""
    decided = predicted(probs, thresholds)
    wrong = decided != targets
    margin = np.where(wrong, np.abs(probs - thresholds[None, :]), -1.0).max(axis=1)
    order = np.argsort(-margin, kind="stable")
    return order[margin[order] >= 0][:count]


def mistake_lines(path: str, probs: np.ndarray, target: np.ndarray, thresholds: np.ndarray,
                  class_names: Sequence[str]) -> list[str]:
    decided = probs >= thresholds
    missed = [f"{class_names[c]} ({probs[c]:.2f})" for c in np.flatnonzero(target.astype(bool) & ~decided)]
    extra = [f"{class_names[c]} ({probs[c]:.2f})" for c in np.flatnonzero(~target.astype(bool) & decided)]
    lines = [short_name(path), f"true: {joined(target, class_names) or '(none)'}"]
    lines += [f"missed: {', '.join(missed)}"] if missed else []
    lines += [f"extra: {', '.join(extra)}"] if extra else []
    return lines


def mistakes_section(paths: Sequence[str], decode_paths: Sequence[str], probs: np.ndarray, targets: np.ndarray,
                     thresholds: np.ndarray, class_names: Sequence[str], source: str,
                     count: int = MISTAKES_SHOWN) -> hp.Section:
    """Images with wrong labels as thumbnails: the true labels, the labels missed and the labels predicted in
    excess, each with its probability."""
    shown = worst_decisions(probs, targets, thresholds, count)
    total = int((predicted(probs, thresholds) != targets).any(axis=1).sum())
    thumbs = [hp.Thumb(thumbnail_jpeg(decode_paths[i]), mistake_lines(paths[i], probs[i], targets[i], thresholds,
                                                                       class_names) + [str(paths[i])]) for i in shown]
    head = hp.paragraph(f"{plural(total, 'image')} of {len(targets)} with at least one wrong label on {source}; the "
                        f"{len(shown)} farthest from their thresholds first.", "note") if total else ""
    return hp.Section("mistakes", "Images with wrong labels", head + hp.gallery(
        thumbs, f"Every label right on {source} ({plural(len(targets), 'image')})."))
