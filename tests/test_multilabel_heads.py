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


def shape_grids(sample_data, count: int, seed: int):
    """``count`` 2x2 grids (128 px) of the sample's shape photos holding 1-4 of its 4 shapes, and their targets."""
    from PIL import Image

    names = sorted(p.name for p in sample_data.iterdir() if p.is_dir())
    files = {n: sorted((sample_data / n).iterdir()) for n in names}
    rng = np.random.default_rng(seed)
    images, targets = np.zeros((count, 128, 128, 3), np.float32), np.zeros((count, len(names)), np.uint8)
    for i in range(count):
        held = rng.choice(len(names), size=rng.integers(1, 5), replace=False)
        cells = np.concatenate([held, rng.choice(held, size=4 - len(held))])
        rng.shuffle(cells)
        for position, c in enumerate(cells):
            y, x = divmod(position, 2)
            with Image.open(files[names[c]][rng.integers(len(files[names[c]]))]) as photo:
                images[i, y * 64:(y + 1) * 64, x * 64:(x + 1) * 64] = np.asarray(photo.convert("RGB").resize((64, 64)))
        targets[i, held] = 1
    return images, targets, names


def test_multi_label_fold_heads_learn_real_images_and_score_them_out_of_fold(sample_data):
    from toolkit import backbones
    from toolkit.data.multilabel import stratified_folds
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.train.folds import held_out, out_of_fold

    images, targets, names = shape_grids(sample_data, 90, seed=0)
    backbone = backbones.create("mobilenet_v2", input_shape=(128, 128, 3))
    maps = np.asarray(backbone.predict(images, verbose=0))[None]  # one view: (1, images, 4, 4, 1280)
    held = held_out(stratified_folds(targets, 3, seed=0), 3)
    heads = FoldHeads(3, len(names), dropout=0.2, multi_label=True)
    per_head = fit_fold_heads(heads, maps, targets, held, FoldSettings(lr=1e-3, label_smoothing=0.0, batch_size=16,
                                                                        epochs=30, patience=5, seed=0))
    oof = out_of_fold(per_head, held)
    seen = np.stack([per_head[i, ~held[i]].mean(axis=0) for i in range(len(targets))])
    unseen_result = evaluate_multilabel(targets, oof, choose_thresholds(targets, oof), names, resamples=200)
    assert unseen_result.macro_ap > 0.85, unseen_result.describe()  # 0.94 measured; chance is about 0.6
    assert unseen_result.macro_ap < evaluate_multilabel(targets, seen, np.full(4, 0.5), names, resamples=50).macro_ap + 1e-9
    with pytest.raises(ValueError, match=r"multi-label heads need an \(images, 4\) target matrix"):
        fit_fold_heads(heads, maps, targets.argmax(1), held, FoldSettings(epochs=1))


def test_per_label_temperatures_soften_over_confident_labels_and_keep_their_ranking():
    from toolkit.predict.label_calibration import apply_label_temperatures, binary_ece, binary_nll, calibrate_labels

    rng = np.random.default_rng(0)
    truth = np.clip(rng.beta([1, 2, 3], [3, 2, 1], size=(2000, 3)), 0.03, 0.97)  # each label's true probability
    targets = (rng.random(truth.shape) < truth).astype(np.uint8)  # drawn from it: `truth` is calibrated
    confident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth))))  # the same ranking, three times too sure
    fitted = calibrate_labels(confident, targets, ("a", "b", "c"))
    temperatures = np.asarray(list(fitted["temperatures"].values()))
    np.testing.assert_allclose(temperatures, 3.0, rtol=0.25)  # the temperature that undoes it
    assert fitted["nll_after"] < fitted["nll_before"]
    assert fitted["ece_after"] < fitted["ece_before"]
    scaled = apply_label_temperatures(confident, temperatures)
    for c in range(3):
        assert average_precision_score(targets[:, c], scaled[:, c]) == pytest.approx(
            average_precision_score(targets[:, c], confident[:, c]))
    assert binary_nll(scaled, targets) == pytest.approx(fitted["nll_after"])
    assert binary_ece(targets.astype(float), targets) == 0.0
    np.testing.assert_array_equal(apply_label_temperatures(confident, np.ones(3)), confident)


def test_label_weights_scale_each_labels_positive_term_of_the_binary_cross_entropy():
    from toolkit.train.fold_heads import PositiveWeightedBinaryCrossentropy

    rng = np.random.default_rng(1)
    y = (rng.random((6, 2, 3)) < 0.4).astype(np.float32)  # (batch, heads, classes)
    p = rng.uniform(0.05, 0.95, y.shape).astype(np.float32)
    loss = PositiveWeightedBinaryCrossentropy()
    unweighted = np.asarray(loss.call(y, p))
    np.testing.assert_allclose(unweighted, np.asarray(keras.losses.binary_crossentropy(y, p)), rtol=1e-5)
    w = np.asarray([1.0, 3.0, 0.5], np.float32)
    weighted = np.asarray(PositiveWeightedBinaryCrossentropy(w).call(y, p))
    want = -(w * y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=-1)
    np.testing.assert_allclose(weighted, want, rtol=1e-5)
    assert weighted.shape == (6, 2)
