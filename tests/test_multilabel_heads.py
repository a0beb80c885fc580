"""Multi-label heads and metrics: log-sum-exp pooling, sigmoid NIN and fold heads, thresholds chosen for F1 on the
probabilities given, and the metrics against scikit-learn's own."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from toolkit.backbones.head import FoldHeads, LogSumExpPooling2D, NINHead
from toolkit.predict.multilabel_metrics import choose_thresholds, evaluate_multilabel, predicted


def maps(seed=0, shape=(4, 7, 7, 6)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def test_log_sum_exp_pooling_lies_between_average_and_max_and_tends_to_each():
    x = maps()
    cells = x.reshape(len(x), -1, x.shape[-1]).astype(np.float64)
    for r in (0.5, 5.0, 50.0):
        got = np.asarray(LogSumExpPooling2D(r)(x))
        want = (np.log(np.mean(np.exp(r * cells), axis=1))) / r
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert (got >= cells.mean(axis=1) - 1e-5).all() and (got <= cells.max(axis=1) + 1e-5).all()
    np.testing.assert_allclose(np.asarray(LogSumExpPooling2D(1e-3)(x)), cells.mean(axis=1), atol=0.05)
    np.testing.assert_allclose(np.asarray(LogSumExpPooling2D(1e3)(x)), cells.max(axis=1), atol=np.log(49) / 1e3 + 1e-4)
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(ValueError, match="sharpness must be a number"):
            LogSumExpPooling2D(bad)


def test_a_multi_label_head_saves_and_loads_in_safe_mode_with_the_same_outputs(tmp_path):
    head = NINHead(3, dropout=0.0, multi_label=True)
    model = head.on_features((7, 7, 6))
    x = maps()
    probabilities = np.asarray(model(x))
    assert ((probabilities > 0) & (probabilities < 1)).all()
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # independent sigmoids, not a softmax
    model.save(tmp_path / "head.keras")
    loaded = keras.models.load_model(tmp_path / "head.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), probabilities, atol=1e-6)
    assert not head.is_linear and NINHead(3).is_linear  # log-sum-exp does not commute with the 1x1 conv


@pytest.mark.parametrize("bottleneck", [0, 8])
def test_multi_label_fold_heads_are_k_independent_sigmoid_heads(bottleneck):
    heads = FoldHeads(3, 4, bottleneck=bottleneck, dropout=0.0, multi_label=True)
    model = heads.on_features((7, 7, 6))
    x = maps(1)
    per_fold = np.asarray(model(x))
    assert per_fold.shape == (4, 3, 4) and ((per_fold > 0) & (per_fold < 1)).all()
    for k in range(3):
        single = NINHead(4, bottleneck, dropout=0.0, multi_label=True)
        one = single.on_features((7, 7, 6))
        weights = iter(heads.head_weights(k))
        for layer in single.layers[:-2]:
            if layer.weights:
                layer.set_weights([next(weights) for _ in layer.weights])
        np.testing.assert_allclose(np.asarray(one(x)), per_fold[:, k], atol=1e-5)


def test_thresholds_maximise_each_labels_f1_and_prefer_the_highest_among_equals():
    rng = np.random.default_rng(0)
    targets = (rng.random((80, 4)) < [0.5, 0.2, 0.1, 0.0]).astype(np.uint8)
    probabilities = np.clip(targets * 0.35 + rng.random((80, 4)) * 0.65, 0, 1).round(2)
    thresholds = choose_thresholds(targets, probabilities)
    for label in range(3):
        candidates = np.unique(probabilities[:, label])
        scores = {t: f1_score(targets[:, label], probabilities[:, label] >= t, zero_division=0) for t in candidates}
        best = max(scores.values())
        assert scores[thresholds[label]] == pytest.approx(best)
        assert thresholds[label] == max(t for t, f in scores.items() if np.isclose(f, best))
    assert thresholds[3] == 1.0  # a label no image holds: predicted only at certainty
    tie = choose_thresholds(np.array([[1], [0], [1]]), np.array([[0.9], [0.2], [0.6]]))
    assert tie[0] == 0.6  # F1 1.0 there; 0.2 predicts the negative image too (F1 0.8)
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
    equal = choose_thresholds(np.array([[0], [1], [0], [0], [0], [1]]), scores)
    assert equal[0] == 0.8  # F1 0.5 at 0.8 and at 0.4: the higher one, with fewer false alarms


def test_metrics_agree_with_scikit_learn_and_are_perfect_for_perfect_scores():
    rng = np.random.default_rng(1)
    targets = (rng.random((60, 3)) < 0.4).astype(np.uint8)
    targets[0] = 1
    probabilities = np.clip(targets * 0.4 + rng.random((60, 3)) * 0.6, 0, 1)
    thresholds = np.array([0.5, 0.6, 0.7])
    result = evaluate_multilabel(targets, probabilities, thresholds, ("a", "b", "c"), resamples=200)
    assert result.macro_ap == pytest.approx(average_precision_score(targets, probabilities, average="macro"))
    assert result.micro_ap == pytest.approx(average_precision_score(targets, probabilities, average="micro"))
    decided = predicted(probabilities, thresholds)
    assert result.exact_match == pytest.approx((decided == targets).all(axis=1).mean())
    inter, union = (decided & targets).sum(axis=1), (decided | targets).sum(axis=1)
    assert result.jaccard == pytest.approx(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())
    for j, label in enumerate(result.labels):
        assert label.f1 == pytest.approx(f1_score(targets[:, j], decided[:, j]))
        assert label.support == targets[:, j].sum() and label.threshold == thresholds[j]
    low, high = result.macro_ap_interval
    assert low < result.macro_ap < high and high - low < 0.3
    perfect = evaluate_multilabel(targets, targets.astype(float), np.full(3, 0.5), ("a", "b", "c"), resamples=50)
    assert (perfect.macro_ap, perfect.micro_ap, perfect.exact_match, perfect.jaccard) == (1.0, 1.0, 1.0, 1.0)
    assert "macro mAP" in result.describe() and "60 images" in result.describe()
