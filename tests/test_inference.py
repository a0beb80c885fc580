"""Prediction: TTA geometry, ensembles, CSV, calibration, evaluation, CAM, export."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from tests.browser import rendered
from toolkit.data.pipeline import eval_image, resize
from toolkit.predict.calibration import apply_temperature, calibrate, expected_calibration_error, fit_temperature, nll
from toolkit.predict.inference import predict_ensemble, predict_member, tta_views
from toolkit.predict.members import ModelMismatchError, load_models


def _png_bytes(array: np.ndarray) -> tf.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return tf.constant(buffer.getvalue())


@pytest.fixture(scope="module")
def synthetic():
    """100 x 140 image whose pixel (y, x) encodes its own coordinates: any crop is recognisable."""
    yy, xx = np.mgrid[0:100, 0:140]
    return np.stack([yy * 2, xx, np.full_like(xx, 77)], -1).astype(np.uint8)


def test_tta_crop_geometry(synthetic):
    data = _png_bytes(synthetic)
    size, fraction = 32, 0.8
    side = round(100 * fraction)  # crop side on the original: fraction of the shorter side
    expect = {
        "tl": synthetic[:side, :side], "tr": synthetic[:side, 140 - side:], "bl": synthetic[100 - side:, :side],
        "br": synthetic[100 - side:, 140 - side:], "c": synthetic[10:10 + side, 30:30 + side],
    }
    want = {k: resize(tf.constant(v), size).numpy() for k, v in expect.items()}
    none = tta_views(data, False, size, "none", fraction).numpy()
    np.testing.assert_allclose(none[0], eval_image(data, False, size, fraction).numpy())
    np.testing.assert_allclose(none[0], want["c"], atol=1e-4)
    flip = tta_views(data, False, size, "flip", fraction).numpy()
    np.testing.assert_allclose(flip[1], flip[0][:, ::-1])
    five = tta_views(data, False, size, "5crop", fraction).numpy()
    for view, key in zip(five, ("tl", "tr", "bl", "br", "c")):
        np.testing.assert_allclose(view, want[key], atol=1e-4, err_msg=key)
    ten = tta_views(data, False, size, "10crop", fraction).numpy()
    assert ten.shape == (10, size, size, 3)
    np.testing.assert_allclose(ten[:5], five)
    np.testing.assert_allclose(ten[5:], five[:, :, ::-1])
    full = tta_views(data, False, size, "full", fraction).numpy()
    assert full.shape == (1, 40, 56, 3)  # shorter side 32 / 0.8 = 40, aspect kept


def test_calibration_lowers_nll_and_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += 1.0  # a weak signal...
    logits *= 4.0  # ...reported with far too much confidence
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    result = calibrate(probs, labels)
    assert result["temperature"] > 2.0
    assert result["nll_after"] < result["nll_before"] and result["ece_after"] < result["ece_before"] / 2
    scaled = apply_temperature(probs, result["temperature"])
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))  # never changes the prediction
    assert fit_temperature(scaled, labels) == pytest.approx(1.0, abs=0.05)
    perfect = np.eye(c)[labels] * 0.999 + 0.001 / c
    assert expected_calibration_error(perfect, labels) < 0.01
    assert nll(perfect, labels) < 0.01


# ----------------------------------------------------------------------------- trained runs


@pytest.fixture(scope="module")
def runs_trained(sample_data, tmp_path_factory):
    from toolkit.api import train
    from toolkit.config.recipes import build_config

    root = tmp_path_factory.mktemp("models")
    common = {"data": str(sample_data), "freeze": "all", "image_size": 96, "head_epochs": 12, "cache_views": 2}
    a = train(build_config(None, {**common, "seed": 1}), out=root / "a", verbose=0).path
    b = train(build_config(None, {**common, "seed": 2, "backbone": "efficientnet_lite0"}), out=root / "b", verbose=0).path
    three = root / "three-classes"
    for cls in ("circle", "square", "star"):
        (three / cls).mkdir(parents=True)
        for f in sorted((Path(sample_data) / cls).iterdir())[:10]:
            (three / cls / f.name).write_bytes(f.read_bytes())
    c = train(build_config(None, {**common, "data": str(three), "head_epochs": 2}), out=root / "c", verbose=0).path
    return a, b, c


def _files(sample_data, n=6):
    paths = sorted(str(p) for p in Path(sample_data).rglob("*.jpg"))[::10][:n]
    return paths, [True] * len(paths)


@pytest.mark.slow
def test_ensemble_is_the_weighted_mean_and_mismatched_classes_are_refused(runs_trained, sample_data):
    a, b, c = runs_trained
    paths, jpeg = _files(sample_data)
    members = load_models([a, b], weights=[3.0, 1.0])
    pa = predict_member(members[0], paths, jpeg)
    pb = predict_member(members[1], paths, jpeg)
    np.testing.assert_allclose(predict_ensemble(members, paths, jpeg), 0.75 * pa + 0.25 * pb, atol=1e-6)
    np.testing.assert_allclose(pa.sum(1), 1.0, atol=1e-5)
    calibration = json.loads((Path(a) / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and "ece_before" in calibration and "ece_after" in calibration
    with pytest.raises(ModelMismatchError, match=r"\['triangle'\]"):
        load_models([a, c])


@pytest.mark.slow
def test_ten_crop_batches_views_and_agrees_with_itself(runs_trained, sample_data):
    a, _, _ = runs_trained
    member = load_models([a])[0]
    paths, jpeg = _files(sample_data)
    probs = {mode: predict_member(member, paths, jpeg, mode) for mode in ("none", "flip", "5crop", "10crop", "full")}
    for mode, p in probs.items():
        assert p.shape == (len(paths), 4) and np.allclose(p.sum(1), 1, atol=1e-5), mode
    # 10-crop is the mean of the 5 crops and their mirrors: the mean of the 5crop and the mirrored 5crop
    assert np.abs(probs["10crop"] - probs["5crop"]).max() < 0.5


@pytest.mark.slow
def test_predict_csv_columns_and_unreadable_rows(runs_trained, sample_data, tmp_path, capsys):
    from toolkit.cli.main import main

    a, b, _ = runs_trained
    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted(Path(sample_data).rglob("*.jpg"))[::20]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(a), "--model", str(b), "--images", str(images), "--tta", "flip",
                 "--top-k", "2", "--all-probs", "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["path", "label", "probability", "top1_label", "top1_prob", "top2_label", "top2_prob",
                                   "prob_circle", "prob_square", "prob_star", "prob_triangle", "error"]
    broken = frame[frame.path.str.endswith("broken.jpg")].iloc[0]
    assert "HTML" in broken.error and broken.label == ""
    good = frame[frame.error == ""]
    assert len(good) == len(frame) - 1
    np.testing.assert_allclose(good[[c for c in frame.columns if c.startswith("prob_")]].astype(float).sum(1), 1, atol=1e-5)
    assert (good.label == good.top1_label).all()
    assert main(["predict", "--model", str(a), "--images", str(images), "--out", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_writes_every_report(runs_trained, sample_data, tmp_path):
    from toolkit.predict.evaluate import evaluate

    a, _, _ = runs_trained
    m = evaluate([str(a)], str(sample_data), tmp_path / "eval", verbose=0)
    for key in ("accuracy", "n", "class_names", "per_class", "confusion_matrix", "ece"):
        assert key in m
    assert m["n"] == 96 and np.asarray(m["confusion_matrix"]).sum() == 96  # every image: 4 classes x 24
    assert set(m["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
    for name in ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv", "mistakes.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    dom = rendered(tmp_path / "eval" / "report.html", {"metrics", "confusion", "calibration", "mistakes", "problems"},
                   tmp_path)
    assert f"{sample_data} (all of its images)" in dom and "96 images" in dom


@pytest.mark.slow
def test_cam_peaks_on_the_object(runs_trained, tmp_path):
    """A circle drawn at a known place on a plain background: the CAM's peak lies on it."""
    from PIL import ImageDraw

    from toolkit.predict.explain import class_activation_map, explain
    from toolkit.predict.members import load_member

    member = load_member(runs_trained[0])
    hits = 0
    for cy, cx in ((40, 40), (40, 120), (120, 40), (120, 120)):
        img = Image.new("RGB", (160, 160), (128, 128, 128))
        ImageDraw.Draw(img).ellipse([cx - 30, cy - 30, cx + 30, cy + 30], fill=(200, 40, 40))
        cam, index, _ = class_activation_map(member, np.asarray(img), "circle")
        y, x = np.unravel_index(np.argmax(cam), cam.shape)
        hits += (y - cy) ** 2 + (x - cx) ** 2 <= 45**2
    assert hits >= 3, hits
    img.save(tmp_path / "one.png")
    written = explain(str(runs_trained[0]), [str(tmp_path / "one.png")], tmp_path / "cams")
    assert len(written) == 1
    with Image.open(written[0]) as picture:  # the overlay at the image's resolution, a labelled band below it
        assert picture.size[0] == 160 and picture.size[1] > 160
        band = np.asarray(picture.convert("RGB"))[160:]
    assert (band < 100).all(axis=2).sum() > 50, "no caption text drawn in the band"
    assert (np.abs(band.astype(int) - band.mean(axis=2, keepdims=True)) > 60).any(), "no colour scale in the band"


def _run_exported(fmt: str, target, x: np.ndarray) -> np.ndarray:
    """Probabilities of an exported file, each in its own runtime."""
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(target))  # held: its variables live as long as it does
        return np.asarray(loaded.serve(tf.constant(x)))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]  # no preprocessing constants as extra inputs
        return session.run(None, {"image": x})[0]
    interpreter = tf.lite.Interpreter(model_path=str(target))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite", "onnx"])
def test_exported_models_give_what_predict_gives(runs_trained, sample_data, tmp_path, fmt):
    """The whole predictor travels: the exported file, on the centre crop, gives `predict`'s probabilities,
    the run's temperature included (stated tolerance: 1e-4 on probabilities)."""
    from toolkit.deploy.export import export
    from toolkit.predict.members import load_member

    member = load_member(runs_trained[0])
    assert member.temperature != 1.0  # so the check covers the temperature
    paths, jpeg = _files(sample_data, 4)
    want = predict_member(member, paths, jpeg, "none")
    x = np.stack([eval_image(tf.io.read_file(p), j, 96).numpy() for p, j in zip(paths, jpeg)])
    target = export(str(runs_trained[0]), fmt, tmp_path / fmt)
    np.testing.assert_allclose(_run_exported(fmt, target, x), want, atol=1e-4)
    assert json.loads((tmp_path / fmt / "classes.json").read_text()) == list(member.class_names)
    if fmt == "savedmodel":  # --image-size: the fully convolutional classifier at another size
        bigger = export(str(runs_trained[0]), fmt, tmp_path / "at128", image_size=128)
        x128 = np.stack([eval_image(tf.io.read_file(p), j, 128).numpy() for p, j in zip(paths, jpeg)])
        assert _run_exported(fmt, bigger, x128).shape == (4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite-int8", "tflite-fp16"])
def test_quantized_exports_measure_themselves(runs_trained, sample_data, tmp_path, fmt, monkeypatch):
    from toolkit.deploy import quantize
    from toolkit.deploy.export import export
    from toolkit.predict.evaluate import evaluation_split

    kind = fmt.split("-")[1]
    monkeypatch.setattr(quantize, "CALIBRATION_IMAGES", 10)  # the sample's few images: three different draws
    target = export(str(runs_trained[0]), fmt, tmp_path / fmt, data=str(sample_data))
    report = json.loads((tmp_path / fmt / "export.json").read_text())
    assert report["images"] == 96 and report[f"{kind}_bytes"] == target.stat().st_size
    assert report["size_ratio"] < (0.35 if kind == "int8" else 0.6)  # int8 weights: a quarter; fp16: a half
    assert report["float_latency_ms"] > 0 and report[f"{kind}_latency_ms"] > 0
    # the recorded accuracy is what the exported file itself gives on those images, in the TFLite interpreter
    split, _, _ = evaluation_split(sample_data)
    x = np.stack([eval_image(tf.io.read_file(p), j, 96).numpy() for p, j in zip(split.decode_paths, split.is_jpeg)])
    probs = _run_exported("tflite", target, x)
    assert report[f"{kind}_accuracy"] == pytest.approx((probs.argmax(1) == np.asarray(split.labels)).mean())
    low, high = report["accuracy_drop_ci95"]  # the drop's paired interval: the same images under both models
    assert report["accuracy_drop"] == pytest.approx(report["float_accuracy"] - report[f"{kind}_accuracy"])
    assert low <= report["accuracy_drop"] <= high and high - low <= 0.5
    if kind == "fp16":  # float16 weights barely move the probabilities
        assert report["top1_agreement"] >= 0.98 and report["max_probability_difference"] < 0.05
    else:  # the kept calibration draw is the one closest to the float model on the check images
        tried = report["calibration"]["draw_kl_divergence"]
        assert len(tried) == 3 and len(set(tried)) > 1  # different images calibrate different models
        assert report["calibration"]["chosen_draw"] == 1 + int(np.argmin(tried))


def test_int8_calibration_draws_leave_the_check_images_out():
    from toolkit.deploy.quantize import CALIBRATION_DRAWS, calibration_draws

    for n in (3000, 400, 60):
        check, draws = calibration_draws(n, seed=0)
        assert len(check) == min(200, n // 3)
        for draw in draws:
            assert not set(draw) & set(check) and len(set(draw)) == len(draw) > 0
        if n == 3000:  # enough images: the draws are disjoint too
            assert len(draws) == CALIBRATION_DRAWS and not set(draws[0]) & set(draws[1]) and len(draws[0]) == 100
        if n == 400:  # 200 left after the check images: overlapping draws of 100, not all the same
            assert len(draws) == CALIBRATION_DRAWS and len({tuple(d) for d in draws}) == CALIBRATION_DRAWS
        if n == 60:  # 40 left: any draw of 100 would be all of them, so one draw, converted once
            assert len(draws) == 1 and len(draws[0]) == 40
    assert [list(d) for d in calibration_draws(400, 1)[1]] != [list(d) for d in calibration_draws(400, 0)[1]]


@pytest.mark.slow
def test_onnx_export_says_how_to_get_it_when_missing(runs_trained, tmp_path, monkeypatch):
    from toolkit.deploy.export import ExportUnavailableError, export

    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed
    with pytest.raises(ExportUnavailableError, match=r'pip install "toolkit-finetune\[onnx\]"'):
        export(str(runs_trained[0]), "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
