"""The finetune job on real images: caching, two stages, resume, determinism, the gate, recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import kill_after_epochs
from toolkit.api import train
from toolkit.config.recipes import RecipeError, build_config, read_recipe
from toolkit.train.fit_data import class_weights
from toolkit.train.freeze import plan_freeze
from toolkit.train.run_state import AccuracyGateError
from toolkit.train.stages import stage_lr_multipliers

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
FAST = {"image_size": SIZE, "batch_size": 16, "head_epochs": 8, "finetune_epochs": 2, "cache_views": 2}


def _config(data, **overrides):
    return build_config(None, {"data": str(data), **FAST, **overrides})


def test_class_weights_switch_on_past_three_to_one():
    assert class_weights([100, 40], "auto") is None
    weights = class_weights([300, 50, 100], "auto")
    assert weights == pytest.approx({0: 450 / 900, 1: 450 / 150, 2: 450 / 300})
    assert class_weights([300, 50], "off") is None
    assert class_weights([10, 10], "on") == {0: 1.0, 1: 1.0}


def test_stage_learning_rates_decay_downwards():
    plan = plan_freeze("0.5", 10, 2, [f"s{i}" for i in range(6)])  # top 3 of 6 train
    mults = stage_lr_multipliers([0, 1, 2, 3, 3, 4, 5], plan, 0.5)
    assert mults == [0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("distributed", [False, True])
def test_layerwise_learning_rates_apply_with_and_without_a_strategy(distributed):
    """A multiplier of 0 holds a layer still; under tf.distribute the optimizer sees per-replica variables."""
    import keras
    import tensorflow as tf

    from toolkit.train.stages import LayerwiseAdam

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else tf.distribute.get_strategy()
    with strategy.scope():
        inputs = keras.Input((4,))
        low = keras.layers.Dense(4, name="low")
        high = keras.layers.Dense(2, name="high")
        model = keras.Model(inputs, high(low(inputs)))
        multipliers = {v.path: 0.0 for v in low.trainable_weights}
        model.compile(optimizer=LayerwiseAdam(multipliers=multipliers, learning_rate=0.1), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.fit(x, np.ones((16, 2), "float32"), epochs=1, batch_size=8, verbose=0)
    after = model.get_weights()
    for a, b in zip(before[:2], after[:2]):  # low: kernel, bias
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(before[2], after[2])  # high trained


def test_mixed_precision_computes_in_float16_and_leaves_the_global_policy_alone(sample_data, tmp_path):
    """--mixed-precision is meant for GPUs; here (CPU) it checks the wiring: float16 layers, float32
    probabilities, both stages train, and Keras' process-wide dtype policy is restored afterwards."""
    import keras

    result = train(_config(sample_data, freeze="stage7", finetune_epochs=1, mixed_precision=True),
                      out=tmp_path / "run", verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"
    model = keras.models.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    conv = model.get_layer("backbone").get_layer("head_conv")
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    images = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    probs = model.predict(images, verbose=0)
    assert probs.dtype == np.float32 and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.metrics["val_accuracy"] > 0.5  # 4 classes: well above chance after the head stage


@pytest.mark.slow
def test_feature_caching_reaches_the_same_accuracy_as_training_on_images(sample_data, tmp_path):
    cached = train(_config(sample_data, freeze="all", cv="off"), out=tmp_path / "cached", verbose=0)
    uncached = train(_config(sample_data, freeze="all", cache_features="off"), out=tmp_path / "images", verbose=0)
    assert (tmp_path / "cached" / "cache" / "features.npz").is_file()
    assert not (tmp_path / "images" / "cache").exists()
    a, b = cached.metrics["val_accuracy"], uncached.metrics["val_accuracy"]
    assert a >= 0.7 and b >= 0.7, (a, b)
    assert abs(a - b) <= 0.15, (a, b)


@pytest.mark.slow
def test_same_seed_same_run(sample_data, tmp_path):
    first = train(_config(sample_data, freeze="all", seed=3), out=tmp_path / "a", verbose=0)
    second = train(_config(sample_data, freeze="all", seed=3), out=tmp_path / "b", verbose=0)
    assert first.metrics["val_accuracy"] == second.metrics["val_accuracy"]
    assert first.metrics["val_loss"] == pytest.approx(second.metrics["val_loss"], abs=1e-6)
    h1 = (tmp_path / "a" / "history.csv").read_text()
    h2 = (tmp_path / "b" / "history.csv").read_text()
    assert h1 == h2


@pytest.mark.slow
def test_two_stages_train_only_the_unfrozen_stages(sample_data, tmp_path):
    import keras

    from toolkit import backbones

    result = train(_config(sample_data, freeze="stage7", finetune_epochs=2), out=tmp_path / "run", verbose=0)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert any(line.startswith("finetune,") for line in history) and any(line.startswith("head,") for line in history)
    assert result.plan.unfrozen == 1
    model = keras.models.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    final = [w.copy() for w in model.get_weights()]
    model.load_weights(tmp_path / "run" / "finetune.last.weights.h5")  # the model after stage 2
    pretrained = backbones.create("mobilenet_v2", input_shape=(SIZE, SIZE, 3))
    inner = model.get_layer("backbone")
    # frozen stage: unchanged; unfrozen stage: changed; its BatchNorm: unchanged
    np.testing.assert_array_equal(inner.get_layer("stage6_block16_project_conv").get_weights()[0],
                                  pretrained.get_layer("stage6_block16_project_conv").get_weights()[0])
    assert not np.array_equal(inner.get_layer("head_conv").get_weights()[0], pretrained.get_layer("head_conv").get_weights()[0])
    for a, b in zip(inner.get_layer("head_bn").get_weights(), pretrained.get_layer("head_bn").get_weights()):
        np.testing.assert_array_equal(a, b)
    # the saved classifier is the better stage's, by validation loss
    kept = "finetune.best" if result.metrics["kept_stage"] == "finetune" else "stage1"
    model.load_weights(tmp_path / "run" / f"{kept}.weights.h5")
    for a, b in zip(final, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1 of 7 stages unfrozen" in report and "## Problems found" in report
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_stage_2_that_does_not_help_is_not_kept(sample_data, tmp_path):
    import keras

    from toolkit import backbones

    # A learning rate far too high: fine-tuning wrecks the top stage, its validation loss never beats stage 1's.
    result = train(_config(sample_data, freeze="stage7", finetune_epochs=2, finetune_lr=50.0), out=tmp_path / "run",
                      verbose=0)
    assert result.metrics["kept_stage"] == "head"
    model = keras.models.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    pretrained = backbones.create("mobilenet_v2", input_shape=(SIZE, SIZE, 3))
    np.testing.assert_array_equal(model.get_layer("backbone").get_layer("head_conv").get_weights()[0],
                                  pretrained.get_layer("head_conv").get_weights()[0])
    assert result.metrics["val_accuracy"] == pytest.approx(result.metrics["head_val_accuracy"], abs=1e-6)
    assert "kept: the stage-1 classifier" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_resume_after_sigkill_loses_at_most_one_epoch(sample_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "toolkit.cli.main", "finetune", "--data", str(sample_data), "--out", str(run),
           "--image-size", str(SIZE), "--batch-size", "16", "--head-epochs", "3", "--freeze", "stage7",
           "--finetune-epochs", "5", "--finetune-lr", "0.0001", "--cache-views", "2"]
    state_file = run / "state.json"
    killed_after = kill_after_epochs(cmd, state_file, "finetune")
    assert not (run / "model.keras").exists()

    from toolkit.cli.main import main

    assert main(["finetune", "--resume", str(run)]) == 0
    state = json.loads(state_file.read_text())
    epochs = [row["epoch"] for row in state["finetune"]["history"]]
    assert epochs == sorted(set(epochs)) and epochs[0] == 1  # continued, nothing repeated
    assert len(epochs) >= killed_after
    assert state["finished"] and (run / "model.keras").is_file()
    assert [row["epoch"] for row in state["head"]["history"]] == sorted({row["epoch"] for row in state["head"]["history"]})


@pytest.mark.slow
def test_accuracy_gate_fails_the_run_but_keeps_the_model(sample_data, tmp_path, capsys):
    from toolkit.cli.main import main

    out = tmp_path / "gate"
    code = main(["finetune", "--data", str(sample_data), "--out", str(out), "--image-size", str(SIZE),
                 "--head-epochs", "1", "--freeze", "all", "--min-accuracy", "1.0", "--weights", "none"])
    assert code == 3
    assert "below --min-accuracy 1.0" in capsys.readouterr().err
    assert (out / "model.keras").is_file() and (out / "metrics.json").is_file()
    with pytest.raises(AccuracyGateError):
        train(_config(sample_data, freeze="all", head_epochs=1, weights="none", min_accuracy=1.0, cv="off"),
                 out=tmp_path / "gate2", verbose=0)


def test_recipes_shipped_parse_and_state_their_expected_result():
    from toolkit.config.recipes import RECIPE_DIR, recipe_names

    assert set(recipe_names()) >= {"quick", "small-data", "accurate"}
    for name in recipe_names():
        text = (RECIPE_DIR / f"{name}.toml").read_text()
        assert text.splitlines()[0].startswith("#"), name
        assert "toolkit finetune" in text and "Expected result" in text, name
        read_recipe(name)
    with pytest.raises(RecipeError, match=r"unknown recipe 'quik'. Did you mean 'quick'\?.*accurate, quick, small-data"):
        read_recipe("quik")


def test_recipe_errors_name_the_key_and_the_allowed_values(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('backbone = "mobilenet_v2"\nhead_epoch = 3\n')
    with pytest.raises(RecipeError, match=r"unknown key 'head_epoch'. Did you mean 'head_epochs'\?.*Allowed keys:"):
        read_recipe(bad)
    bad.write_text('batch_size = "big"\n')
    with pytest.raises(RecipeError, match=r"wrong type for batch_size. Received: batch_size='big'"):
        read_recipe(bad)
    bad.write_text('class_weights = "sometimes"\n')
    with pytest.raises(RecipeError, match=r"class_weights='sometimes'; allowed: auto, on, off"):
        build_config(bad, {"data": "x"})
    bad.write_text('[augment]\ncrop = "zoom"\n')
    with pytest.raises(RecipeError, match=r"\[augment\].*crop='zoom'"):
        build_config(bad, {"data": "x"})
    bad.write_text('[augment]\nflipp = true\n')
    with pytest.raises(RecipeError, match=r"unknown key 'flipp'. Did you mean 'flip'"):
        read_recipe(bad)
    with pytest.raises(RecipeError, match=r"unknown recipe 'quik'. Did you mean 'quick'"):
        build_config("quik", {"data": "x"})


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('backbone = "efficientnet_lite0"\nhead_epochs = 7\n[augment]\nflip = false\n')
    config = build_config(recipe, {"data": "d", "head_epochs": 2, "freeze": None})
    assert config.backbone == "efficientnet_lite0" and config.head_epochs == 2 and config.freeze == "auto"
    assert config.augment.flip is False
