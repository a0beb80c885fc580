"""How good a multi-label classifier is, and where each label's yes begins.

* Thresholds: for each label, the probability at which the label is predicted (``p >= threshold``) is the one that
  maximises that label's F1 on the probabilities it is given, which must be out-of-fold (or otherwise held-out)
  probabilities: chosen on the images a head trained on, every threshold would look perfect. Among equally good
  thresholds the highest is taken (fewer false alarms for the same F1).
* Metrics (scikit-learn's): macro average precision (each label's AP, averaged over the labels: a rare label
  counts as much as a common one) with a 95 % percentile-bootstrap interval over images, micro average precision
  (every image-label pair pooled), per-label precision, recall and F1 at the thresholds, exact match (every label
  of the image right) and the Jaccard index (shared labels over labels in either, averaged over images).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from toolkit.core.uncertainty import CONFIDENCE


def choose_thresholds(targets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-label thresholds (labels,) maximising F1 of ``probabilities >= threshold`` against ``targets``; a label
    with no positive image gets 1.0 (predicted only at certainty)."""
    from sklearn.metrics import precision_recall_curve

    targets, probabilities = np.asarray(targets), np.asarray(probabilities, np.float64)
    out = np.ones(targets.shape[1])
    for label in range(targets.shape[1]):
        if not targets[:, label].any():
            continue
        precision, recall, thresholds = precision_recall_curve(targets[:, label], probabilities[:, label])
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        out[label] = float(thresholds[best].max())
    return out


def predicted(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 (images, labels): each label predicted where its probability reaches its threshold."""
    return (np.asarray(probabilities) >= np.asarray(thresholds)[None, :]).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class LabelResult:
    name: str
    support: int  # images holding the label
    average_precision: float
    threshold: float
    precision: float
    recall: float
    f1: float


@dataclasses.dataclass(frozen=True)
class MultiLabelMetrics:
    images: int
    macro_ap: float
    macro_ap_interval: tuple[float, float]
    micro_ap: float
    exact_match: float
    jaccard: float
    labels: tuple[LabelResult, ...]

    def describe(self) -> str:
        low, high = self.macro_ap_interval
        return (f"macro mAP {self.macro_ap:.4f} (95% CI {low:.2f}–{high:.2f}, {self.images} images), micro mAP "
                f"{self.micro_ap:.4f}, exact match {self.exact_match:.4f}, Jaccard {self.jaccard:.4f}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def macro_ap_interval(targets: np.ndarray, probabilities: np.ndarray, confidence: float = CONFIDENCE,
                      resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the macro average precision, images resampled; a resample in which a label
    has no positive image leaves that label out of its average."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    n = len(targets)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        t, p = targets[pick], probabilities[pick]
        present = t.any(axis=0)
        if present.any():
            values.append(average_precision_score(t[:, present], p[:, present], average="macro"))
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def evaluate_multilabel(targets: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray,
                        class_names: Sequence[str], resamples: int = 1000) -> MultiLabelMetrics:
    """Every metric of the module docstring for ``probabilities`` (images, labels) against ``targets`` (0/1)."""
    from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score, precision_recall_fscore_support

    targets, probabilities = np.asarray(targets), np.asarray(probabilities, np.float64)
    if targets.shape != probabilities.shape or targets.shape[1] != len(class_names):
        raise ValueError(f"targets {targets.shape}, probabilities {probabilities.shape} and {len(class_names)} class "
                         "names must agree")
    present = targets.any(axis=0)
    if not present.any():
        raise ValueError("no image holds any of the labels: average precision is undefined")
    decided = predicted(probabilities, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(targets, decided, average=None, zero_division=0)
    per_label_ap = [float(average_precision_score(targets[:, j], probabilities[:, j])) if present[j] else float("nan")
                    for j in range(targets.shape[1])]
    labels = tuple(LabelResult(name, int(support[j]), per_label_ap[j], float(thresholds[j]), float(precision[j]),
                               float(recall[j]), float(f1[j])) for j, name in enumerate(class_names))
    return MultiLabelMetrics(
        images=len(targets),
        macro_ap=float(np.nanmean(per_label_ap)),
        macro_ap_interval=macro_ap_interval(targets, probabilities, resamples=resamples),
        micro_ap=float(average_precision_score(targets, probabilities, average="micro")),
        exact_match=float(accuracy_score(targets, decided)),
        jaccard=float(jaccard_score(targets, decided, average="samples", zero_division=1)),
        labels=labels,
    )
