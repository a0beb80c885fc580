"""Cross-validated runs (--cv): folds, the K-head model, out-of-fold honesty, resume, bad input, the audit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.browser import rendered
from tests.conftest import kill_after_epochs, shared_dataset
from toolkit.config.choices import parse_cv
from toolkit.core.errors import UserError
from toolkit.train.folds import assign_folds, held_out, out_of_fold, plan_folds, training_mask

REPO = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "64", "--batch-size", "16", "--head-epochs", "6", "--cache-views", "2"]


def test_folds_are_stratified_seeded_and_cover_every_image_once():
    labels = np.repeat(np.arange(3), [10, 17, 23])
    folds = assign_folds(labels, 5, seed=1)
    assert folds.shape == labels.shape and set(folds) == set(range(5))  # every image in exactly one fold
    for k in range(5):  # each class spread evenly: n_c / 5 per fold, give or take one
        counts = np.bincount(labels[folds == k], minlength=3)
        assert np.all(np.abs(counts - np.array([10, 17, 23]) / 5) <= 1), counts
    np.testing.assert_array_equal(folds, assign_folds(labels, 5, seed=1))
    assert not np.array_equal(folds, assign_folds(labels, 5, seed=2))


def test_a_head_never_trains_on_its_own_fold_and_out_of_fold_averages_only_those_heads():
    fold_of = np.array([0, 1, 2, 1, 0])
    held = held_out(fold_of, 3)
    assert training_mask(held).tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
    per_head = np.random.default_rng(0).random((5, 3, 2))
    np.testing.assert_array_equal(out_of_fold(per_head, held), per_head[np.arange(5), fold_of])
    # repeats: head r*K + k holds out fold k of repeat r; an image's estimate is the mean of its R unseen heads
    table = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    held = held_out(table, 2)
    assert held.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    per_head = np.random.default_rng(1).random((4, 4, 3))
    np.testing.assert_allclose(out_of_fold(per_head, held)[0], (per_head[0, 0] + per_head[0, 3]) / 2)
    repeated = assign_folds(np.repeat([0, 1], 10), 5, seed=0, repeats=3)
    assert repeated.shape == (20, 3) and not np.array_equal(repeated[:, 0], repeated[:, 1])


def test_out_of_fold_probabilities_come_from_heads_that_did_not_see_the_image():
    """Noise features with random labels: a head memorises what it trains on, and knows nothing of the rest.
    Out-of-fold accuracy is chance; the same images scored by heads that trained on them are all right."""
    from toolkit.backbones.head import FoldHeads
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 100)
    views = rng.normal(size=(1, 100, 1, 1, 2048)).astype(np.float32)
    folds = assign_folds(labels, 5, 0)
    per_head = fit_fold_heads(FoldHeads(5, 4, dropout=0), views, labels, held_out(folds, 5),
                              FoldSettings(epochs=10, patience=3, lr=3e-2, label_smoothing=0, batch_size=16))
    oof = (out_of_fold(per_head, held_out(folds, 5)).argmax(1) == labels).mean()
    seen = np.mean([(per_head[folds != k, k].argmax(1) == labels[folds != k]).mean() for k in range(5)])
    assert seen > 0.95 and oof < 0.45, (seen, oof)


@pytest.mark.parametrize("bottleneck", [0, 8])
def test_the_k_head_model_is_the_mean_of_its_heads_run_separately(tmp_path, bottleneck):
    import keras

    from toolkit import backbones
    from toolkit.backbones.head import FoldHeads, NINHead, build_classifier

    backbone = backbones.create("mobilenet_v2", input_shape=(None, None, 3))
    heads = FoldHeads(3, 4, bottleneck=bottleneck)
    model = build_classifier(backbone, heads)
    rng = np.random.default_rng(0)
    for k in range(3):  # non-trivial head weights, BatchNorm statistics included
        heads.set_head_weights(k, [rng.normal(scale=0.5, size=w.shape).astype("float32") + (w.min() == w.max() == 1)
                                   for w in heads.head_weights(k)])
    images = rng.uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    separate = []
    for k in range(3):
        single = NINHead(4, bottleneck=bottleneck)
        one = build_classifier(backbone, single)
        it = iter(heads.head_weights(k))
        for layer in single.layers[:-2]:
            layer.set_weights([next(it) for _ in layer.weights])
        separate.append(np.asarray(one(images, training=False)))
    assert len(set(map(str, np.round(separate, 4)))) == 3  # the heads differ
    np.testing.assert_allclose(np.asarray(model(images, training=False)), np.mean(separate, axis=0), atol=1e-5)
    # saved and loaded in safe mode, it is still one model that predict/evaluate/export can run
    model.save(tmp_path / "kheads.keras")
    loaded = keras.models.load_model(tmp_path / "kheads.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(images, training=False)), np.mean(separate, axis=0), atol=1e-5)


def test_cv_flag_values_and_fold_plans():
    for bad in ("1", "0", "-3", "five", "1.5"):
        with pytest.raises(UserError, match=r"cv must be auto, off or a number of folds >= 2.*Received: cv="):
            parse_cv(bad)
    counts = {"a": 12, "b": 3}
    with pytest.raises(UserError, match=r"class 'b' has only 3 .*between 2 and 3.*Received: cv='5'"):
        plan_folds("5", counts, head_only=True, explicit_val=False, cached=True)
    assert plan_folds("auto", counts, True, False, True).folds == 3  # falls back to fewer folds
    assert plan_folds("auto", {"a": 40, "b": 40}, True, False, True).folds == 5
    assert not plan_folds("auto", {"a": 40, "b": 40}, False, False, True).active  # the backbone trains: holdout
    assert not plan_folds("auto", {"a": 40, "b": 40}, True, True, True).active  # the data has its own val split
    assert plan_folds("4", {"a": 40, "b": 40}, True, True, True).folds == 4  # explicit: pools train and val
    assert not plan_folds("off", {"a": 40, "b": 40}, True, False, True).active


@pytest.mark.parametrize("value", ["1", "0", "99"])
def test_bad_cv_is_one_line_naming_the_value_and_range(sample_data, tmp_path, capsys, value):
    from toolkit.cli.main import main

    out = tmp_path / "run"
    assert main(["finetune", "--data", str(sample_data), "--out", str(out), "--cv", value] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cv={value!r}" in err and (">= 2" in err or "between 2 and" in err), err
    assert not out.exists()


@pytest.mark.slow
def test_cross_validated_run_end_to_end(sample_data, tmp_path, capsys):
    from toolkit.cli.main import main

    run = tmp_path / "run"
    assert main(["finetune", "--data", str(sample_data), "--out", str(run)] + FAST) == 0  # --cv auto: 5 folds here
    printed = capsys.readouterr().out
    assert "5-fold cross-validation over 96 images" in printed and "expected accuracy on new images" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    cv = metrics["cv"]
    assert cv["folds"] == 5 and cv["repeats"] == 3 and cv["n_images"] == 96 and len(cv["fold_accuracy"]) == 15
    assert cv["estimate_heads"] == cv["heads"] == 15 and "model that is shipped" in cv["estimates"]
    assert "each scored by 15 heads that never saw it, as the model averages 15" in printed
    assert "cross-validation then pooled all 96 labelled images, each head training on about 77)" in printed
    low, high = cv["accuracy_ci95"]
    assert low <= cv["accuracy"] <= high and cv["accuracy"] > 0.8
    assert metrics["val_accuracy"] == cv["accuracy"] and metrics["n_val"] == 96
    folds = (run / "folds.csv").read_text().splitlines()
    # the model's 3 repeats, and 12 more for the estimate: each image held out by 15 heads, one per repeat
    assert folds[0] == "path,label," + ",".join(f"fold_{r}" for r in range(1, 16)) and len(folds) == 97
    assert (run / "audit.csv").read_text().startswith("path,issue,given_label,suggested_label,score,duplicate_of")
    assert (run / "audit.png").stat().st_size > 1000
    # report.html: every image cross-validated, out-of-fold numbers, the audit's findings
    dom = rendered(run / "report.html", {"data", "problems", "training", "metrics", "confusion", "calibration",
                                         "mistakes", "audit", "timings"}, tmp_path)
    assert "All 96 images were cross-validated, 5 folds x 3 repeats" in dom and "<th>train</th>" not in dom
    assert "fitted on the out-of-fold predictions of every image" in dom and "validation split" not in dom
    assert f"every finding, most suspicious first, is in {run / 'audit.csv'}".lower() in dom.lower()
    # the model is the first 3 repeats' 15 heads, as they were trained (the other 60 served the estimate only)
    import keras

    from toolkit.train.fold_heads import load_best

    model = keras.models.load_model(run / "model.keras")
    assert tuple(model.get_layer("fold_probs").output.shape[1:]) == (15, 4)
    best = load_best(run / "cv.best.npz")
    assert sorted(best) == list(range(75))
    kernel, bias = model.get_layer("class_maps").get_weights()
    np.testing.assert_array_equal(kernel, np.concatenate([best[k][0] for k in range(15)], axis=-1))
    # predict sees one ordinary model
    assert main(["-q", "predict", "--model", str(run), "--images", str(sample_data / "circle"), "--out",
                 str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert sum(r.split(",")[1] == "circle" for r in rows) >= 0.8 * len(rows)


@pytest.mark.slow
def test_cv_with_backbone_stages_training_is_an_ensemble_of_fold_members(sample_data, tmp_path, capsys):
    from toolkit.cli.main import main

    out = tmp_path / "cv"
    assert main(["finetune", "--data", str(sample_data), "--out", str(out), "--cv", "2", "--freeze", "stage7",
                 "--finetune-epochs", "1", "--image-size", "64", "--batch-size", "16", "--head-epochs", "2", "--cache-views", "2"]) == 0
    assert "2-fold cross-validation over 96 images" in capsys.readouterr().out
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["members"] == ["1-mobilenet_v2-fold1of2", "2-mobilenet_v2-fold2of2"]
    folds = []
    for name in spec["members"]:
        recipe = (out / name / "recipe.toml").read_text()
        assert 'cv = "off"' in recipe and "fold = " in recipe
        data = json.loads((out / name / "data.json").read_text())["statistics"]
        folds.append((data["train_images"], data["val_images"]))
    assert folds[0][0] == folds[1][1] and folds[0][1] == folds[1][0] and sum(folds[0]) == 96  # swapped halves
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cv"]["folds"] == 2 and metrics["cv"]["n_images"] == 96 and metrics["n_val"] == 96
    dom = rendered(out / "report.html", {"members", "metrics", "confusion", "calibration", "mistakes"}, tmp_path)
    assert "out-of-fold predictions of every image" in dom and "1-mobilenet_v2-fold1of2" in dom


@pytest.mark.slow
def test_cv_off_is_the_holdout_run(sample_data, tmp_path):
    from toolkit.api import train
    from toolkit.config.recipes import build_config

    settings = {"data": str(sample_data), "image_size": 64, "batch_size": 16, "head_epochs": 4, "freeze": "all",
                "cache_views": 2}
    result = train(build_config(None, {**settings, "cv": "off"}), out=tmp_path / "off", verbose=0)
    assert "cv" not in result.metrics and result.metrics["n_val"] == 20  # the 20 % holdout of 96 images
    state = json.loads((tmp_path / "off" / "state.json").read_text())
    assert set(state) >= {"head"} and "cv" not in state
    assert (tmp_path / "off" / "head.best.weights.h5").is_file() and not (tmp_path / "off" / "folds.csv").exists()
    dom = rendered(tmp_path / "off" / "report.html", {"data", "problems", "training", "metrics", "confusion",
                                                       "calibration", "mistakes", "timings"}, tmp_path)
    assert "<th>validation</th>" in dom and "fitted on the validation split" in dom and "cross-validated" not in dom


@pytest.mark.slow
def test_resume_in_the_middle_of_the_folds(sample_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "toolkit.cli.main", "finetune", "--data", str(sample_data), "--out", str(run), "--cv", "3",
           "--image-size", "64", "--batch-size", "4", "--head-epochs", "40", "--early-stopping-patience", "40",
           "--cache-views", "8"]
    state_file = run / "state.json"
    kill_after_epochs(cmd, state_file, "cv")
    assert not (run / "model.keras").exists()
    best_before = json.loads(state_file.read_text())["cv"]["fold_best_epoch"]

    from toolkit.cli.main import main

    assert main(["finetune", "--resume", str(run)]) == 0
    state = json.loads(state_file.read_text())
    epochs = [row["epoch"] for row in state["cv"]["history"]]
    assert epochs == list(range(1, 41))  # continued after the kill, nothing repeated, nothing lost
    # 3 folds x 3 repeats for the model, x 3 again for the estimate: every head's early stopping resumed
    assert len(state["cv"]["fold_best_epoch"]) == 27 and all(b >= 1 for b in best_before)
    assert state["finished"] and (run / "model.keras").is_file()
    assert json.loads((run / "metrics.json").read_text())["cv"]["n_images"] == 96


@pytest.mark.slow
def test_audit_finds_a_flipped_label_and_a_resized_copy_in_real_photos(tmp_path):
    from PIL import Image

    from toolkit.api.audit import AUDIT_BACKBONES, audit_data

    source = shared_dataset("hymenoptera") / "train"
    data = tmp_path / "data"
    picked = {c: sorted(p for p in (source / c).iterdir() if p.suffix.lower() == ".jpg")[:30] for c in ("ants", "bees")}
    for c, files in picked.items():
        (data / c).mkdir(parents=True)
        for f in files:
            (data / c / f.name).symlink_to(f)
    flipped = picked["bees"][3]
    (data / "bees" / flipped.name).unlink()
    (data / "ants" / flipped.name).symlink_to(flipped)  # a bee labelled as an ant
    original = picked["ants"][7]
    with Image.open(original) as image:  # a resized, re-encoded copy
        image.convert("RGB").resize((image.width * 2 // 3, image.height * 2 // 3)).save(
            data / "ants" / "copy.jpg", quality=70)
    summary = audit_data(data, tmp_path / "audit", verbose=0)
    assert summary["backbones"] == list(AUDIT_BACKBONES)  # every probe's out-of-fold probabilities were averaged
    rows = (tmp_path / "audit" / "audit.csv").read_text().splitlines()
    labels = [r for r in rows if ",label," in r]
    assert any(flipped.name in r and r.split(",")[3] == "bees" for r in labels), rows[:10]
    duplicates = [r for r in rows if ",near_duplicate," in r]
    assert any("copy.jpg" in r and original.name in r for r in duplicates), rows[:10]
    assert summary["findings"]["near_duplicate"] <= 2, duplicates
    manifest = (tmp_path / "audit" / "audit-manifest.csv").read_text()
    assert f"{data.resolve() / 'ants' / flipped.name},bees,train" in manifest
    dom = rendered(tmp_path / "audit" / "report.html", {"audit"}, tmp_path)
    assert "labelled ants, looks like bees" in dom and "copy.jpg" in dom


def test_audit_flags_the_labels_with_the_lowest_out_of_fold_probability():
    """An image labelled 1 whose given label has the lowest probability of all, but whose predicted class 0 falls
    short of class 0's mean self-confidence: cleanlab's default filter (prune_by_noise_rate) does not count it as
    wrong, and flags only the confidently contradicted ones; the audit ranks by the given label's probability."""
    from toolkit.data.audit import AuditInput, find_issues

    n = 60
    labels = np.repeat([0, 1, 2], n)
    probs = np.zeros((3 * n, 3))
    probs[:n], probs[n:2 * n], probs[2 * n:] = [0.98, 0.01, 0.01], [0.15, 0.7, 0.15], [0.1, 0.1, 0.8]
    probs[n:n + 6] = [0.995, 0.004, 0.001]  # labelled 1, confidently class 0
    odd = n + 10
    probs[odd] = [0.9, 0.0001, 0.0999]  # labelled 1, the lowest p(given label) of all
    rng = np.random.default_rng(0)
    probs = probs + rng.uniform(0, 1e-3, probs.shape)
    probs /= probs.sum(axis=1, keepdims=True)
    paths = [f"img{i:03d}.jpg" for i in range(len(labels))]
    audit = AuditInput(paths, labels, ["a", "b", "c"], probs, rng.normal(size=(len(labels), 8)))
    findings = find_issues(audit)
    flagged = list(findings.loc[findings["issue"] == "label", "path"])
    assert flagged[0] == paths[odd], flagged  # most suspicious first
    assert len(flagged) >= 5 and all(p in paths[n:n + 6] for p in flagged[1:]), flagged
    assert findings.loc[findings["path"] == paths[odd], "suggested_label"].iloc[0] == "a"


def test_audit_with_two_classes_calibrates_the_count_of_label_issues():
    """With few classes cleanlab's plain count of label issues comes out low (its documentation says so): here the
    images labelled 1 that are really 0 get p(0) = 0.75, short of class 0's mean 0.9, so they are not counted."""
    from cleanlab.count import num_label_issues

    from toolkit.data.audit import AuditInput, find_issues

    rng = np.random.default_rng(0)
    n = 100
    labels = np.repeat([0, 1], n)
    p0, p1 = np.clip(rng.normal(0.9, 0.05, n), 0.5, 0.999), np.clip(rng.normal(0.7, 0.1, n), 0.5, 0.999)
    probs = np.stack([np.r_[p0, 1 - p1], np.r_[1 - p0, p1]], axis=1)
    flips = np.r_[np.arange(6), np.arange(n, n + 6)]
    probs[flips[:6]], probs[flips[6:]] = [0.3, 0.7], [0.75, 0.25]
    paths = [f"img{i:03d}.jpg" for i in range(len(labels))]
    findings = find_issues(AuditInput(paths, labels, ["a", "b"], probs, rng.normal(size=(len(labels), 8))))
    flagged = list(findings.loc[findings["issue"] == "label", "path"])
    plain = num_label_issues(labels, probs, estimation_method="off_diagonal")
    assert len(flagged) == num_label_issues(labels, probs, estimation_method="off_diagonal_calibrated") > plain
    assert set(flagged) <= {paths[i] for i in flips}, flagged


def test_audit_help_names_the_default_probes(capsys):
    from toolkit.api.audit import AUDIT_BACKBONES
    from toolkit.cli.main import main

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert ",".join(AUDIT_BACKBONES) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, expected", [
    (["--folds", "1"], "--folds must be an integer >= 2"),
    (["--out", "{data}"], "same path as --data"),
    (["--data", "{tmp}/missing"], "missing"),
    (["--model", "{data}"], "is not a run folder"),
    (["--backbones", "mobilenet_v3"], "Unknown backbone"),
    (["--backbones", "mobilenet_v2", "--model", "{data}"], "--backbones and --model both"),
])
def test_audit_bad_input_is_one_line_and_leaves_nothing(sample_data, tmp_path, capsys, argv, expected):
    from toolkit.cli.main import main

    args = {"--data": str(sample_data), "--out": str(tmp_path / "audit")}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(data=sample_data, tmp=tmp_path)
    assert main(["audit", *[part for item in args.items() for part in item]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "audit").exists()
