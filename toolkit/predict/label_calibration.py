"""Calibration of a multi-label run, one temperature per label.

Each label's probability is a sigmoid of its own logit, so each label gets its own temperature T_c, fitted on the
out-of-fold probabilities by minimising that label's binary cross-entropy: p' = sigmoid(logit(p) / T_c). The
ranking of images within a label never changes (average precision is unchanged); the decision thresholds are chosen
after it, on the calibrated probabilities. The calibration error is counted over every (image, label) decision.
"""

from __future__ import annotations

import numpy as np

from toolkit.predict.calibration import minimise_temperature

EPS = 1e-7


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_label_temperatures(probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) / T) per label (column)."""
    temperatures = np.asarray(temperatures, np.float64)
    if np.all(temperatures == 1.0):
        return probs
    return (1.0 / (1.0 + np.exp(-logit(probs) / temperatures))).astype(np.asarray(probs).dtype)


def binary_nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy over every (image, label)."""
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    t = np.asarray(targets, np.float64)
    return float(-(t * np.log(p) + (1 - t) * np.log1p(-p)).mean())


def binary_ece(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Σ_b (n_b / n) |share of positives_b − mean probability_b| over equal-width bins of every (image, label)."""
    p, t = np.asarray(probs, np.float64).ravel(), np.asarray(targets, np.float64).ravel()
    which = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(t[mask].mean() - p[mask].mean())
    return float(ece)


def calibrate_labels(probs: np.ndarray, targets: np.ndarray, class_names) -> dict:
    """Fit one temperature per label; report binary NLL and ECE before and after."""
    temperatures = np.asarray([minimise_temperature(lambda t, c=c: binary_nll(
        apply_label_temperatures(probs[:, [c]], np.asarray([t])), targets[:, [c]])) for c in range(probs.shape[1])])
    scaled = apply_label_temperatures(probs, temperatures)
    return {
        "temperatures": {name: float(t) for name, t in zip(class_names, temperatures)},
        "rule": "one temperature per label, sigmoid(logit(p) / T), fitted on the out-of-fold probabilities",
        "nll_before": binary_nll(probs, targets),
        "nll_after": binary_nll(scaled, targets),
        "ece_before": binary_ece(probs, targets),
        "ece_after": binary_ece(scaled, targets),
        "n": int(len(targets)),
    }
