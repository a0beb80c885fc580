"""Temperature scaling (Guo et al., 2017) and expected calibration error, in numpy.

The classifier outputs softmax probabilities p; its logits are log p up to a
per-image constant, so a temperature T rescales them as softmax(log p / T).
T is fitted on the validation split by minimising the negative log-likelihood
(a convex problem in 1/T); predictions and evaluations then use it. T > 1
softens over-confident probabilities, T < 1 sharpens timid ones, and the
predicted class never changes.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row-wise."""
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs, EPS, 1.0)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0)).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Σ_b (n_b / n) |accuracy_b − confidence_b| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the validation NLL of softmax(log p / T)."""
    return minimise_temperature(lambda t: nll(apply_temperature(probs, t), labels))


def minimise_temperature(loss) -> float:
    """The T in [0.05, 20] minimising ``loss(T)`` (golden-section search on log T; the NLL is convex in 1/T)."""
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(float(np.exp(a))), loss(float(np.exp(b)))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(float(np.exp(b)))
    return float(np.exp((lo + hi) / 2))


def calibrate(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Fit T and report NLL and ECE before and after."""
    temperature = fit_temperature(probs, labels)
    scaled = apply_temperature(probs, temperature)
    return {
        "temperature": temperature,
        "nll_before": nll(probs, labels),
        "nll_after": nll(scaled, labels),
        "ece_before": expected_calibration_error(probs, labels),
        "ece_after": expected_calibration_error(scaled, labels),
        "n": int(len(labels)),
    }
