"""The freeze plan as a pure function, and what applying it does to a real backbone."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit import backbones
from toolkit.backbones.head import BACKBONE, NINHead, build_classifier
from toolkit.train.freeze import AUTO_RULE, apply_plan, plan_freeze

STAGES = tuple(f"stage{i}" for i in range(1, 8))


def test_auto_plan_is_monotone_in_data_size_and_stage_aligned():
    for classes in (2, 10, 50):
        previous = -1
        for per_class in (5, 50, 199, 200, 350, 599, 600, 1500, 1999, 2000, 10000):
            plan = plan_freeze("auto", per_class * classes, classes, STAGES)
            assert isinstance(plan.unfrozen, int) and 0 <= plan.unfrozen <= len(STAGES)
            assert plan.unfrozen >= previous, (classes, per_class)
            previous = plan.unfrozen
            assert plan == plan_freeze("auto", per_class * classes, classes, STAGES)  # pure
    assert plan_freeze("auto", 245, 2, STAGES).head_only  # hymenoptera: 122 per class
    assert plan_freeze("auto", 3068, 10, STAGES).unfrozen == 3  # clothing-small: top third of 7
    assert plan_freeze("auto", 2000 * 3, 3, STAGES).unfrozen == 7
    assert [t for t, _, _ in AUTO_RULE] == sorted((t for t, _, _ in AUTO_RULE), reverse=True)


def test_plan_logs_the_decision_in_words():
    text = plan_freeze("auto", 245, 2, STAGES).describe()
    assert text == "auto: 245 training images, 2 classes, 122 per class (rule: < 200 per class) → head only; 0 of 7 stages unfrozen"


def test_manual_modes():
    assert plan_freeze("all", 10**6, 2, STAGES).unfrozen == 0
    assert plan_freeze("none", 10, 2, STAGES).unfrozen == 7
    assert plan_freeze("0.3", 10, 2, STAGES).unfrozen == 3  # rounded up to whole stages
    assert plan_freeze(0.0, 10, 2, STAGES).unfrozen == 0
    assert plan_freeze("stage6", 10, 2, STAGES).unfrozen == 2
    with pytest.raises(ValueError, match=r"freeze='stage9'.*Allowed: auto, all, none.*stage1, stage2"):
        plan_freeze("stage9", 10, 2, STAGES)
    with pytest.raises(ValueError, match=r"freeze='1.5'"):
        plan_freeze("1.5", 10, 2, STAGES)


@pytest.fixture(scope="module")
def classifier():
    spec = backbones.get_spec("mobilenet_v2")
    backbone = backbones.create("mobilenet_v2", input_shape=(96, 96, 3))
    model = build_classifier(backbone, NINHead(3, dropout=0.0), (96, 96, 3))
    inner = model.get_layer(BACKBONE)
    ends = backbones.stage_boundaries([layer.name for layer in inner.layers], spec.stages)
    return model, inner, ends


def test_apply_plan_freezes_at_stage_boundaries_and_keeps_batchnorm_frozen(classifier):
    import keras

    model, inner, ends = classifier
    plan = plan_freeze("stage6", 10, 2, STAGES)
    apply_plan(inner, ends, plan)
    cut = ends[4]  # end of stage5: everything up to it is frozen
    for index, layer in enumerate(inner.layers):
        if not layer.weights:
            continue
        expected = index > cut and not isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == expected, layer.name
    assert inner.get_layer("stage6_block14_expand_conv").trainable
    assert not inner.get_layer("stage5_block13_project_conv").trainable


def test_batchnorm_runs_in_inference_mode_even_when_training(classifier):
    import keras

    model, inner, ends = classifier
    apply_plan(inner, ends, plan_freeze("none", 10, 2, STAGES))
    bn = inner.get_layer("stage6_block14_expand_bn")
    before = [w.copy() for w in bn.get_weights()]
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    # With dropout 0, a training-mode call equals the inference call only if BN uses its moving statistics.
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), atol=1e-5)
    model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
    model.train_on_batch(x, np.eye(3)[[0, 1, 2, 0]])
    for a, b in zip(before, bn.get_weights()):
        np.testing.assert_array_equal(a, b)  # neither moving statistics nor gamma/beta moved
    conv = inner.get_layer("stage6_block14_expand_conv")
    assert conv.trainable
    # What guarantees inference mode is trainable=False on the BatchNorm layers: in Keras 3's
    # functional API the outer call's `training` overrides the `training=False` recorded when the
    # backbone was called (keras/src/models/functional.py operation_fn). The recipe switch
    # train_batchnorm=True must therefore really put them in training mode:
    apply_plan(inner, ends, plan_freeze("none", 10, 2, STAGES), train_batchnorm=True)
    assert not np.allclose(model(x, training=True), model(x, training=False), atol=1e-3)
    apply_plan(inner, ends, plan_freeze("none", 10, 2, STAGES))  # restore for other tests
