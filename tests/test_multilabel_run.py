"""A multi-label run end to end on real photos (2x2 grids of the sample's shape photos, `labels` manifest): finetune,
its files and estimate, thresholds chosen out of fold, predict, evaluate, export, explain, resume, and the inputs
it refuses in one line without leaving anything behind."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import kill_after_epochs
from tests.multilabel_grids import write_grid_manifest
from toolkit.cli.main import main

SIZE = ["--image-size", "128", "--batch-size", "16", "--head-epochs", "15"]
NAMES = ["circle", "square", "star", "triangle"]


@pytest.fixture(scope="module")
def grids(sample_data, tmp_path_factory):
    """The manifest: 80 training and 40 test grids, the test grids from other photos."""
    return write_grid_manifest(sample_data, tmp_path_factory.mktemp("grids"), 80, 40)


@pytest.fixture(scope="module")
def multilabel_run(grids, tmp_path_factory):
    run = tmp_path_factory.mktemp("ml") / "run"
    assert main(["finetune", "--data", str(grids), "--out", str(run), *SIZE, "--seed", "0"]) == 0
    return run


def refused(capsys, argv, *fragments) -> str:
    """Run ``argv``: exit 2 with one line on stderr naming every fragment."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_multi_label_run_writes_its_estimate_thresholds_and_report(multilabel_run, grids):
    from toolkit.backbones.head import is_multi_label
    from toolkit.predict.members import load_member

    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    assert metrics["multi_label"] and metrics["class_names"] == NAMES
    estimate = metrics["estimate"]
    assert estimate["images"] == 80  # the training rows; the 40 test rows are left for evaluate
    low, high = estimate["macro_ap_interval"]
    assert 0.8 < estimate["macro_ap"] <= 1 and low <= estimate["macro_ap"] <= high  # 0.93 measured; chance ~0.6
    assert metrics["folds"] == 5 and metrics["heads"] == 15 and metrics["estimate_heads"] == 15
    assert metrics["label_weights"] is None  # auto: the labels are held by 49-56 images, under 3:1
    assert "per label" in metrics["freeze_plan"] and "labels on 80 images" in metrics["freeze_plan"]
    temperatures = json.loads((multilabel_run / "calibration.json").read_text())["temperatures"]
    assert sorted(temperatures) == NAMES and all(0.05 <= t <= 20 for t in temperatures.values())
    thresholds = json.loads((multilabel_run / "thresholds.json").read_text())
    assert sorted(thresholds["thresholds"]) == NAMES and "best F1" in thresholds["rule"]
    folds = pd.read_csv(multilabel_run / "folds.csv")
    assert len(folds) == 80 and folds.columns[:2].tolist() == ["path", "labels"]
    assert folds.filter(like="fold_").shape[1] == 15  # the split drawn 15 times: 75 heads, 15 unseen per image
    member = load_member(multilabel_run)
    assert member.multi_label and is_multi_label(member.model)
    html = (multilabel_run / "report.html").read_text()
    for section in ('id="labels"', 'id="training"', 'id="data"', 'id="mistakes"', 'id="problems"'):
        assert section in html
    assert "macro mAP" in (multilabel_run / "report.md").read_text()


def test_thresholds_are_chosen_on_the_out_of_fold_probabilities_only(multilabel_run):
    from toolkit.predict.multilabel_metrics import choose_thresholds

    oof = pd.read_csv(multilabel_run / "out-of-fold.csv")
    targets = np.asarray([[name in str(cell).split(";") for name in NAMES] for cell in oof["true_labels"].fillna("")],
                         np.uint8)
    probs = oof[[f"prob_{n}" for n in NAMES]].to_numpy()
    saved = json.loads((multilabel_run / "thresholds.json").read_text())["thresholds"]
    np.testing.assert_allclose([saved[n] for n in NAMES], choose_thresholds(targets, probs), atol=1e-6)
    # the shipped model has seen every one of these images: its own scores are higher on them than out of fold,
    # and thresholds chosen on those would differ
    assert main(["predict", "--model", str(multilabel_run), "--images", str(multilabel_run / "out-of-fold.csv"),
                 "--out", str(multilabel_run.parent / "seen.csv")]) == 0
    seen = pd.read_csv(multilabel_run.parent / "seen.csv")[[f"prob_{n}" for n in NAMES]].to_numpy()
    assert np.mean(np.where(targets, seen, 1 - seen)) > np.mean(np.where(targets, probs, 1 - probs))
    assert not np.allclose(choose_thresholds(targets, seen), choose_thresholds(targets, probs))


def test_predict_writes_every_label_at_or_above_its_threshold(multilabel_run, grids, tmp_path, capsys):
    test_rows = pd.read_csv(grids).query("split == 'test'")
    images = [str(grids.parent / p) for p in test_rows.path[:12]] + [str(tmp_path / "missing.jpg")]
    for tta in ("none", "flip", "full"):
        out = tmp_path / f"{tta}.csv"
        assert main(["predict", "--model", str(multilabel_run), "--images", *images, "--tta", tta, "--out",
                     str(out)]) == 0
        frame = pd.read_csv(out, keep_default_na=False)
        assert frame.columns.tolist() == ["path", "labels", *[f"prob_{n}" for n in NAMES], "error"]
        assert len(frame) == 13 and frame.error.iloc[-1] and frame.labels.iloc[-1] == ""
        thresholds = json.loads((multilabel_run / "thresholds.json").read_text())["thresholds"]
        for _, row in frame.iloc[:-1].iterrows():
            want = [n for n in NAMES if float(row[f"prob_{n}"]) >= thresholds[n]]
            assert (row.labels.split(";") if row.labels else []) == want
    right = sum(set(a.split(";")) == set(b.split(";")) for a, b in zip(frame.labels[:12], test_rows.labels[:12]))
    assert right >= 4  # exact match on unseen grids (chance with 15 label sets: under 1 in 12)
    assert main(["predict", "--model", str(multilabel_run), "--images", *images[:2], "--out", str(tmp_path / "none.csv"),
                 "--overwrite"]) == 0  # its own multi-label CSV may be replaced
    readable = pd.read_csv(tmp_path / "none.csv", keep_default_na=False)  # every image readable: the same columns
    assert readable.columns.tolist() == ["path", "labels", *[f"prob_{n}" for n in NAMES], "error"]
    assert readable.path.tolist() == images[:2] and (readable.error == "").all()


def test_evaluate_and_export_a_multi_label_run(multilabel_run, grids, tmp_path):
    import onnxruntime as ort
    import tensorflow as tf

    from toolkit.api.run import evaluate

    metrics = evaluate([multilabel_run], grids, tmp_path / "eval")
    assert metrics["multi_label"] and metrics["split"] == "test" and metrics["images"] == 40
    assert 0.7 < metrics["macro_ap"] <= 1 and metrics["macro_ap_interval"][0] <= metrics["macro_ap"]
    per_label = pd.read_csv(tmp_path / "eval" / "per_label.csv")
    assert per_label.name.tolist() == NAMES and per_label.support.sum() == pd.read_csv(grids).query(
        "split == 'test'").labels.str.count(";").add(1).sum()
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv", keep_default_na=False)
    assert predictions.columns[:3].tolist() == ["path", "true_labels", "labels"] and len(predictions) == 40
    assert 'id="mistakes"' in (tmp_path / "eval" / "report.html").read_text()

    assert main(["export", "--model", str(multilabel_run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "thresholds.json").read_text())["thresholds"].keys() == set(NAMES)
    files = [str(grids.parent / p) for p in predictions.path[:8]]
    assert main(["predict", "--model", str(multilabel_run), "--images", *files, "--out", str(tmp_path / "p.csv")]) == 0
    want = pd.read_csv(tmp_path / "p.csv")[[f"prob_{n}" for n in NAMES]].to_numpy()
    # predict's view: the whole image resized to the input size
    x = np.stack([tf.image.resize(tf.cast(tf.io.decode_image(tf.io.read_file(f), channels=3), tf.float32),
                                  (128, 128)).numpy() for f in files])
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)  # the per-label temperatures are in the exported graph


def test_explain_draws_one_map_per_predicted_label(multilabel_run, grids, tmp_path):
    frame = pd.read_csv(grids).query("split == 'test'")
    image = str(grids.parent / frame.path.iloc[0])
    assert main(["predict", "--model", str(multilabel_run), "--images", image, "--out", str(tmp_path / "p.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).labels[0]
    assert main(["explain", "--model", str(multilabel_run), "--images", image, "--out", str(tmp_path / "cam")]) == 0
    drawn = sorted(p.name.split(".cam-")[1].removesuffix(".png") for p in (tmp_path / "cam").glob("*.png"))
    assert drawn == (sorted(predicted.split(";")) if predicted else drawn[:1]) and drawn


def test_commands_that_cannot_serve_a_multi_label_run_refuse_it_in_one_line(multilabel_run, grids, sample_data,
                                                                             tmp_path, capsys):
    image = str(grids.parent / "grid090.jpg")
    run = str(multilabel_run)
    refused(capsys, ["predict", "--model", run, "--images", image, "--tta", "5crop", "--out", str(tmp_path / "a.csv")],
            "--tta 5crop", "multi-label", "--tta none")
    refused(capsys, ["predict", "--model", run, "--images", image, "--unknown", "auto", "--out",
                     str(tmp_path / "b.csv")], "--unknown", "multi-label")
    refused(capsys, ["predict", "--model", run, "--model", run, "--images", image, "--out", str(tmp_path / "c.csv")],
            "ensembles of multi-label runs")
    refused(capsys, ["evaluate", "--model", run, "--data", str(sample_data), "--out", str(tmp_path / "d")],
            "`labels` column")
    refused(capsys, ["export", "--model", run, "--format", "tflite-int8", "--out", str(tmp_path / "e")],
            "tflite-int8", "multi-label")
    assert not any((tmp_path / name).exists() for name in ("a.csv", "b.csv", "c.csv", "d", "e"))


def test_bad_multi_label_input_is_refused_before_any_folder(grids, tmp_path, capsys):
    rows = pd.read_csv(grids)
    rare = rows.copy()
    rare["path"] = [str(grids.parent / p) for p in rare.path]
    holders = rare.labels.str.contains("star")
    rare.loc[holders, "labels"] = rare.loc[holders, "labels"].str.replace("star", "").str.strip(";").str.replace(
        ";;", ";")
    rare.loc[rare.index[:3], "labels"] = rare.loc[rare.index[:3], "labels"] + ";star"
    rare.to_csv(tmp_path / "rare.csv", index=False)
    refused(capsys, ["finetune", "--data", str(tmp_path / "rare.csv"), "--out", str(tmp_path / "r1"), "--cv", "5"],
            "star (3 images)", "fewer images than the 5 folds")
    mixed = rows.assign(label="circle", path=[str(grids.parent / p) for p in rows.path])
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    refused(capsys, ["finetune", "--data", str(tmp_path / "mixed.csv"), "--out", str(tmp_path / "r2")],
            "both a `label` and a `labels` column")
    refused(capsys, ["finetune", "--data", str(grids), "--out", str(tmp_path / "r3"), "--cv", "off"], "--cv off")
    refused(capsys, ["finetune", "--data", str(grids), "--out", str(tmp_path / "r4"), "--freeze", "none"],
            "--freeze none", "frozen backbone")
    refused(capsys, ["finetune", "--data", str(grids), "--out", str(tmp_path / "r5"), "--ensemble", "2"], "--ensemble")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_a_killed_multi_label_run_resumes_where_it_stopped(grids, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "toolkit.cli.main", "finetune", "--data", str(grids), "--out", str(run),
           "--image-size", "64", "--batch-size", "4", "--head-epochs", "30", "--early-stopping-patience", "30"]
    kill_after_epochs(cmd, run / "state.json", "cv")
    assert not (run / "model.keras").exists() and (run / "cache" / "multilabel-features.npz").is_file()
    assert main(["finetune", "--resume", str(run)]) == 0
    state = json.loads((run / "state.json").read_text())
    assert [row["epoch"] for row in state["cv"]["history"]] == list(range(1, 31))  # nothing repeated, nothing lost
    assert state["finished"] and (run / "thresholds.json").is_file()


def test_a_single_label_run_keeps_its_average_pooling_and_has_no_thresholds(trained):
    from toolkit.backbones.head import is_multi_label
    from toolkit.predict.members import load_member

    member = load_member(trained[1])
    assert not member.multi_label and not is_multi_label(member.model)
    assert not (trained[1] / "thresholds.json").exists()
    assert "multi_label" not in json.loads((trained[1] / "metrics.json").read_text())


def test_a_crafted_thresholds_or_calibration_file_is_refused_in_one_line(multilabel_run, trained, tmp_path, capsys):
    import shutil

    image = str(multilabel_run.parent / "grids-image.jpg")
    shutil.copy(pd.read_csv(multilabel_run / "out-of-fold.csv").path[0], image)
    run = tmp_path / "run"
    shutil.copytree(multilabel_run, run, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    good = (run / "thresholds.json").read_text()
    cases = [({"thresholds": {"circle": 0.5}}, "must map each of the run's 4 classes"),
             ({"thresholds": {n: (1.5 if n == "star" else 0.5) for n in NAMES}}, "thresholds of 'star' must be a number in [0.0, 1.0]"),
             ({"thresholds": {n: "0.5" for n in NAMES}}, "must be a number"),
             ([0.5, 0.5], "must map each")]
    for value, fragment in cases:
        (run / "thresholds.json").write_text(json.dumps(value))
        refused(capsys, ["predict", "--model", str(run), "--images", image, "--out", str(tmp_path / "p.csv")],
                "thresholds.json", fragment)
    (run / "thresholds.json").write_text(good)
    (run / "calibration.json").write_text(json.dumps({"temperatures": {n: 1e6 for n in NAMES}}))
    refused(capsys, ["predict", "--model", str(run), "--images", image, "--out", str(tmp_path / "p.csv")],
            "calibration.json", "temperatures of")
    (run / "thresholds.json").unlink()
    refused(capsys, ["predict", "--model", str(run), "--images", image, "--out", str(tmp_path / "p.csv")],
            "multi-label", "thresholds.json is missing")
    single = tmp_path / "single"
    shutil.copytree(trained[1], single, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    classes = json.loads((single / "classes.json").read_text())
    (single / "thresholds.json").write_text(json.dumps({"thresholds": {c: 0.5 for c in classes}}))
    refused(capsys, ["predict", "--model", str(single), "--images", image, "--out", str(tmp_path / "p.csv")],
            "single-label")  # its calibration.json holds one temperature
    (single / "calibration.json").unlink()
    refused(capsys, ["predict", "--model", str(single), "--images", image, "--out", str(tmp_path / "p.csv")],
            "only a multi-label run has thresholds", "single-label")  # its model's softmax head
    assert not (tmp_path / "p.csv").exists()


def test_the_python_api_opens_a_multi_label_run(multilabel_run, grids):
    import toolkit
    from toolkit.core.errors import UserError

    run = toolkit.load(multilabel_run)
    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    assert run.is_multi_label and run.macro_ap == metrics["estimate"]["macro_ap"]
    assert run.macro_ap_ci95[0] <= run.macro_ap <= run.macro_ap_ci95[1]
    assert "expected macro mAP on new images" in run.summary() and "80 images" in run.summary()
    with pytest.raises(UserError, match="multi-label run: it has no accuracy"):
        run.accuracy
    table = run.predict([str(grids.parent / "grid100.jpg")], tta="flip")
    assert table.columns[:2].tolist() == ["path", "labels"] and len(table) == 1


def test_label_weights_are_the_inverse_frequency_of_each_label_when_on(grids, tmp_path):
    from toolkit.data.multilabel import load_multilabel

    run = tmp_path / "run"
    assert main(["finetune", "--data", str(grids), "--out", str(run), "--image-size", "64", "--head-epochs", "2",
                 "--class-weights", "on", "--cv-repeats", "1", "-q"]) == 0
    counts = load_multilabel(grids).splits["train"].counts()
    weights = json.loads((run / "metrics.json").read_text())["label_weights"]
    mean = np.mean(list(counts.values()))
    assert weights == pytest.approx({name: mean / n for name, n in counts.items()})
