"""Backbone registry: metadata agrees with the built models, names resolve, errors help."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit import backbones
from toolkit.backbones.registry import Stage, stage_boundaries
from toolkit.backbones.units import units


@pytest.mark.parametrize("name", backbones.names())
def test_registry_metadata_matches_the_built_model(name):
    spec = backbones.get_spec(name)
    model = backbones.create(name, weights=None)
    assert model.input_shape == (None, None, None, 3)  # raw RGB, any size, no top
    assert model.count_params() == spec.params
    ends = backbones.stage_end_indices(model, spec)
    assert len(ends) == len(spec.stages) and ends == sorted(set(ends))
    assert ends[-1] == len(units(model)) - 1  # the stages cover every unit the freeze plan switches
    if spec.feature_layer:
        assert model.get_layer(spec.feature_layer).output is model.output
    # Preprocessing lives inside: the first layer after the input is not a conv on raw pixels
    # but the normalisation (or the family's own rescaling).
    assert spec.weights_source in ("offline-torch", "keras-imagenet")


def test_offline_backbone_has_imagenet_statistics_inside():
    model = backbones.create("mobilenet_v2", weights=None)
    pre = model.get_layer("preprocess")
    grey = np.full((1, 4, 4, 3), 255 * 0.456, dtype=np.float32)  # the green channel mean
    assert abs(float(pre(grey)[0, 0, 0, 1])) < 1e-5


def test_unknown_backbone_gets_did_you_mean():
    with pytest.raises(backbones.UnknownBackboneError, match=r"Did you mean 'mobilenet_v2'") as info:
        backbones.get_spec("mobilenetv2")
    assert "backbone='mobilenetv2'" in str(info.value)
    with pytest.raises(ValueError, match="Available: mobilenet_v2"):
        backbones.create("no_such_net")


def test_stage_boundaries_are_found_by_name_and_checked():
    names = ["image", "stem_conv", "s1_a", "s1_b", "s2_a", "auto_7"]
    stages = (Stage("one", "s1_"), Stage("two", "s2_"))
    assert stage_boundaries(names, stages) == [3, 5]  # the last stage runs to the end
    with pytest.raises(ValueError, match="no layer name starts with 's3_'"):
        stage_boundaries(names, (Stage("one", "s1_"), Stage("three", "s3_"), Stage("two", "s2_")))
    with pytest.raises(ValueError, match="out of order"):
        stage_boundaries(names, (Stage("two", "s2_"), Stage("one", "s1_"), Stage("end", "auto")))


def test_keras_imagenet_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty cache: Keras must download
    available, where = backbones.weights_available("mobilenet_v3_large")
    assert not available and where == "download needed"
    try:
        model = backbones.create("mobilenet_v3_large")
    except backbones.WeightsUnavailableError as exc:
        message = str(exc)
        assert "mobilenet_v2" in message and "efficientnet_lite0" in message and "--weights PATH" in message
    else:  # a machine with network access downloads them: that is fine too
        assert model.count_params() == backbones.get_spec("mobilenet_v3_large").params


def test_weights_path_round_trip(tmp_path):
    model = backbones.create("efficientnet_lite0", weights=None)
    rng = np.random.default_rng(0)
    layer = model.get_layer("head_conv")
    layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    path = tmp_path / "lite0.weights.h5"
    model.save_weights(path)
    loaded = backbones.create("efficientnet_lite0", weights=path)
    np.testing.assert_array_equal(loaded.get_layer("head_conv").get_weights()[0], layer.get_weights()[0])
    with pytest.raises(FileNotFoundError, match="weights='"):
        backbones.create("efficientnet_lite0", weights=tmp_path / "missing.weights.h5")


def test_the_preprocessing_choices_of_the_settings_are_the_backbones_own():
    """The settings list them without importing the backbones (instant --help); both lists must agree."""
    from toolkit.backbones.external import PREPROCESS_CHOICES
    from toolkit.config import settings

    assert settings.PREPROCESS_CHOICES == PREPROCESS_CHOICES
