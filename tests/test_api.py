"""The Python API: the same results as the command line, the saved model explained exactly, errors before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import toolkit
from toolkit.cli.main import main
from toolkit.core.errors import UserError


def test_run_predict_is_the_commands_csv(trained, tmp_path, capsys):
    data, run = trained
    assert main(["predict", "--model", str(run), "--images", str(data), "--out", str(tmp_path / "p.csv"),
                 "--all-probs"]) == 0
    written = pd.read_csv(tmp_path / "p.csv")
    frame = toolkit.load(run).predict(data, all_probs=True)
    assert list(frame.columns) == list(written.columns) and len(frame) == len(written) > 0
    assert frame["label"].tolist() == written["label"].tolist()
    probs = [c for c in frame.columns if c.startswith("prob_")]
    np.testing.assert_allclose(frame[probs].to_numpy(float), written[probs].to_numpy(float), atol=1e-6)


def test_the_saved_model_gives_predicts_probabilities_given_the_centre_crop_and_temperature(trained):
    """What the docs say: predict = softmax(log(model.keras(centre crop)) / T), T from calibration.json."""
    import keras
    import tensorflow as tf

    from toolkit.config.recipes import load_config
    from toolkit.data.pipeline import eval_image

    data, run = trained
    images = sorted(p for p in Path(data).rglob("*.jpg"))[:6]
    config = load_config(run / "recipe.toml")
    model = keras.models.load_model(run / "model.keras", safe_mode=True)
    temperature = json.loads((run / "calibration.json").read_text())["temperature"]
    assert temperature != 1.0  # else the test could not tell whether it is applied
    crops = tf.stack([eval_image(tf.io.read_file(str(p)), True, config.image_size, config.crop_fraction)
                      for p in images])
    raw = np.asarray(model(crops, training=False), np.float64)
    scaled = np.exp(np.log(np.clip(raw, 1e-12, 1)) / temperature)
    scaled /= scaled.sum(axis=1, keepdims=True)
    frame = toolkit.load(run).predict(images, all_probs=True)
    classes = json.loads((run / "classes.json").read_text())
    predicted = frame[[f"prob_{c}" for c in classes]].to_numpy(float)
    np.testing.assert_allclose(predicted, scaled, atol=1e-4)
    assert np.abs(predicted - raw).max() > 1e-3  # the file alone is not predict's answer


def test_evaluate_without_out_keeps_no_folder(trained, tmp_path, monkeypatch):
    data, run = trained
    monkeypatch.chdir(tmp_path)
    metrics = toolkit.load(run).evaluate(data)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] > 0 and len(metrics["accuracy_ci95"]) == 2
    assert list(tmp_path.iterdir()) == []
    written = toolkit.load(run).evaluate(data, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == written["accuracy"]


def test_bad_settings_and_folders_are_user_errors_before_any_folder(trained, tmp_path):
    data, run = trained
    with pytest.raises(UserError, match="head_epoch"):
        toolkit.finetune(data, tmp_path / "new", head_epoch=3)
    with pytest.raises(UserError, match="augment must be a dict"):
        toolkit.finetune(data, tmp_path / "new", augment=0.2)
    with pytest.raises(UserError, match="freeze"):
        toolkit.finetune(data, tmp_path / "new", freeze="sometimes")
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="Not a run folder"):
        toolkit.load(data)
    with pytest.raises(UserError, match="batch-size"):
        toolkit.load(run).predict(data, batch_size=0)
    with pytest.raises(UserError, match="top-k"):
        toolkit.load(run).predict(data, top_k=0)


def test_the_api_names_are_lazy_and_documented():
    import subprocess
    import sys

    code = ("import sys, toolkit; names = [toolkit.finetune, toolkit.load, toolkit.resume, toolkit.audit, toolkit.Run]; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; print(toolkit.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in toolkit.API:
        assert getattr(toolkit, name).__doc__, name
    with pytest.raises(AttributeError):
        toolkit.no_such_name  # noqa: B018
