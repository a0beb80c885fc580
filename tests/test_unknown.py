"""--unknown: the score, its threshold, its statistics stored with every run, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import shared_dataset
from toolkit.core.errors import UserError
from toolkit.predict.unknown import (
    class_neighbour_distance,
    combined,
    fit_scorer,
    neighbour_distance,
    parse_unknown,
    unit_features,
)

FAST = ["--image-size", "96", "--batch-size", "16", "--head-epochs", "5", "--cache-views", "2"]


def test_unknown_values():
    assert parse_unknown("off") is None and parse_unknown("auto") == 0.05 and parse_unknown("0.2") == 0.2
    for bad in ("0", "1", "1.5", "-0.1", "many"):
        with pytest.raises(UserError, match=r"--unknown must be auto, off, or the fraction .* in \(0, 1\)"):
            parse_unknown(bad)


def test_the_threshold_rejects_the_stated_fraction_of_held_out_known_images():
    rng = np.random.default_rng(0)
    towards = np.eye(8)[0] * 4.0  # every known image's features point roughly along the first axis
    train, held = rng.normal(size=(200, 8)) + towards, rng.normal(size=(400, 8)) + towards
    train_labels, held_probs = rng.integers(0, 3, 200), rng.dirichlet(np.ones(3) * 0.3, 400)
    held_distances = class_neighbour_distance(held, held_probs.argmax(1), unit_features(train), train_labels)
    scorer = fit_scorer(train, train_labels, held_probs, held_distances)
    assert scorer.bank.dtype == np.float16 and scorer.bank.shape == (200, 8) and len(scorer.bank_labels) == 200
    for fraction in (0.05, 0.2):
        assert np.mean(scorer.reference > scorer.threshold(fraction)) == pytest.approx(fraction, abs=0.005)
    far = scorer.score(held_probs[:5], rng.normal(size=(5, 8)) - towards)  # the opposite way: above every known
    assert (far > scorer.reference.max()).all()


def test_the_distance_is_to_the_predicted_class():
    """Shorts called pants, lying between the pants and the skirts: the distance that counts is to the pants, not
    to the nearest training image of any class; a held-out reference image is not its own neighbour."""
    bank = unit_features(np.array([[1, 0, 0]] * 6 + [[0, 1, 0]] * 6, float) + np.eye(3)[2] * 0.01)
    labels = np.array([0] * 6 + [1] * 6)
    near_b = np.array([[0.2, 1.0, 0.0]])
    assert class_neighbour_distance(near_b, np.array([0]), bank, labels)[0] > 0.5  # predicted 0: far from class 0
    assert class_neighbour_distance(near_b, np.array([1]), bank, labels)[0] < 0.05
    assert neighbour_distance(near_b, bank)[0] < 0.05  # what the distance to any class would say
    own = class_neighbour_distance(bank, labels, bank, labels, own_labels=labels)
    assert own.max() < 1e-3  # 5 other identical rows of the own class
    lone = class_neighbour_distance(bank[:1], np.array([0]), bank[[0, 6, 7, 8, 9, 10, 11]], labels[[0, 6, 7, 8, 9, 10, 11]],
                                    own_labels=labels[:1])
    assert lone[0] > 0.5  # alone in its class: no neighbour but itself, so the whole bank (class 1) is used


def test_an_image_unusual_in_one_part_alone_is_rejected():
    """Photos shown to a model of drawn shapes: called a shape as confidently as the known images are (1 - max p
    low), but far from them in feature space. The known images' long tail of 1 - max p must not hide that."""
    rng = np.random.default_rng(1)
    certain = 1 - np.r_[rng.uniform(0.97, 0.995, 360), rng.uniform(0.3, 0.6, 40)]  # 1 - max p: 10 % long tail
    held_probs = np.stack([1 - certain, certain / 2, certain / 2], 1)
    distances = rng.normal(0.30, 0.03, 400)
    scorer = fit_scorer(rng.normal(size=(50, 4)), np.zeros(50), held_probs, distances)
    q1, q3 = np.percentile(distances, [25, 75])
    photo = combined((np.array([0.01]), np.array([np.median(distances) + 4 * (q3 - q1)])), scorer.spread)
    assert photo[0] > scorer.threshold(0.05)
    ordinary = combined((np.array([0.01]), np.array([np.median(distances)])), scorer.spread)
    assert ordinary[0] < scorer.threshold(0.05)


def test_a_large_run_keeps_a_bank_of_at_most_max_bank_images(monkeypatch):
    """Past MAX_BANK images the bank is a seeded subsample; the held-out reference is still each image's distance to
    its 5th nearest *other* bank image (an image in the bank is not its own neighbour)."""
    from types import SimpleNamespace

    from toolkit.predict import unknown

    monkeypatch.setattr(unknown, "MAX_BANK", 50)
    rng = np.random.default_rng(2)
    features, probs = rng.normal(size=(120, 8)) + np.eye(8)[0] * 2, rng.dirichlet(np.ones(3), 120)
    labels = probs.argmax(1)  # every image predicted as its label
    scorer = unknown.run_scorer(None, None, 0, 0.0, probs, SimpleNamespace(features=features, labels=labels))
    assert scorer.bank.shape == (50, 8) and len(scorer.reference) == 120
    rows = unknown.bank_rows(120)
    np.testing.assert_array_equal(scorer.bank_labels, labels[rows])
    similarity = unit_features(features) @ unit_features(features[rows]).T
    similarity[rows, np.arange(50)] = -np.inf  # not its own neighbour
    similarity[labels[:, None] != labels[rows][None, :]] = -np.inf  # only its own (predicted) class
    expected = fit_scorer(features[rows], labels[rows], probs,
                          1 - np.sort(similarity, axis=1)[:, -unknown.NEIGHBOURS])
    np.testing.assert_allclose(scorer.reference, expected.reference, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def runs_with_statistics(sample_data, tmp_path_factory):
    from toolkit.cli.main import main

    root = tmp_path_factory.mktemp("unknown")
    assert main(["-q", "finetune", "--data", str(sample_data), "--out", str(root / "holdout"), "--cv", "off"] + FAST) == 0
    assert main(["-q", "finetune", "--data", str(sample_data), "--out", str(root / "cv")] + FAST) == 0
    return root / "holdout", root / "cv"


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_photos_of_other_things_are_labelled_unknown(runs_with_statistics, sample_data, tmp_path, which):
    """A model of drawn shapes, shown real photos of ants and bees: they score above the shapes it knows,
    and --unknown auto labels them unknown while it keeps most known images."""
    from toolkit.cli.main import main

    run = runs_with_statistics[which]
    photos = sorted((shared_dataset("hymenoptera") / "val" / "bees").glob("*.jpg"))[:20]
    images = tmp_path / "images"
    images.mkdir()
    for p in photos:
        (images / p.name).symlink_to(p)
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", "--model", str(run), "--images", str(images), str(sample_data / "star"),
                 "--unknown", "auto", "--out", str(out)]) == 0
    import pandas as pd

    frame = pd.read_csv(out)
    is_photo = frame["path"].str.contains("images/")
    assert frame.loc[is_photo, "unknown_score"].min() > frame.loc[~is_photo, "unknown_score"].median()
    assert (frame.loc[is_photo, "label"] == "unknown").mean() >= 0.9
    assert (frame.loc[~is_photo, "label"] == "star").mean() >= 0.8
    reference = np.load(run / "unknown.npz")["reference"]
    assert len(reference) == (20 if which == 0 else 96)  # the validation split, or every image out of fold


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "10crop", "full"])
def test_the_score_features_come_from_the_prediction_pass(runs_with_statistics, sample_data, mode):
    """predict --unknown takes the centre crop's features from the pass that predicts (one backbone pass): they
    match a separate centre-crop pass, and the probabilities match a plain prediction."""
    from toolkit.predict.inference import predict_member, predict_with_features
    from toolkit.predict.members import load_member
    from toolkit.predict.unknown import centre_features

    member = load_member(runs_with_statistics[0])
    paths = sorted(str(p) for p in (sample_data / "star").iterdir())[:6]
    jpeg = [p.lower().endswith((".jpg", ".jpeg")) for p in paths]
    probs, features = predict_with_features(member, paths, jpeg, mode, batch_size=20)
    separate = centre_features(member.model, (paths, jpeg), member.image_size, member.crop_fraction)
    assert features.shape == separate.shape and np.abs(features).max() > 0
    if mode == "10crop":  # its views are cut from one whole decode; the separate pass decodes only the crop (JPEG
        # chroma upsampling differs at the crop's edge): within 2 %, where a corner crop is tens of % away
        difference = np.linalg.norm(features - separate, axis=1) / np.linalg.norm(separate, axis=1)
        assert difference.max() < 0.02, difference
    else:
        np.testing.assert_allclose(features, separate, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs, predict_member(member, paths, jpeg, mode), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_unknown_bad_input_is_one_line(runs_with_statistics, sample_data, tmp_path, capsys):
    from toolkit.cli.main import main

    holdout, cv = runs_with_statistics
    old = tmp_path / "old-run"
    shutil.copytree(holdout, old)
    (old / "unknown.npz").unlink()  # as a run trained before the statistics were stored
    older = tmp_path / "older-run"
    shutil.copytree(holdout, older)
    np.savez(older / "unknown.npz", means=np.zeros((4, 8)), precision=np.eye(8), spread=np.ones((2, 2)),
             reference=np.zeros(20))  # what --unknown stored before it used a feature bank
    unlabelled = tmp_path / "unlabelled-bank-run"
    shutil.copytree(holdout, unlabelled)
    with np.load(holdout / "unknown.npz") as saved:  # what it stored before the distance was to the predicted class
        np.savez(unlabelled / "unknown.npz", **{k: saved[k] for k in ("bank", "spread", "reference")})
    cases = [
        (["predict", "--model", str(holdout), "--images", str(sample_data / "star"), "--unknown", "1.5"], "in (0, 1)"),
        (["predict", "--model", str(old), "--images", str(sample_data / "star"), "--unknown", "auto"], "Train it again"),
        (["predict", "--model", str(older), "--images", str(sample_data / "star"), "--unknown", "auto"],
         "another version of the score"),
        (["predict", "--model", str(unlabelled), "--images", str(sample_data / "star"), "--unknown", "auto"],
         "another version of the score"),
        (["predict", "--model", str(holdout), "--model", str(cv), "--images", str(sample_data / "star"), "--unknown",
          "auto"], "works with one model"),
        (["evaluate", "--model", str(old), "--data", str(sample_data), "--unknown", "auto", "--out",
          str(tmp_path / "ev")], "unknown.npz"),
    ]
    for argv, expected in cases:
        out = ["--out", str(tmp_path / "p.csv")] if argv[0] == "predict" else []
        assert main(["-q", *argv, *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "ev").exists()
    assert main(["-q", "evaluate", "--model", str(cv), "--data", str(sample_data), "--unknown", "0.1", "--out",
                 str(tmp_path / "ev")]) == 0
    u = json.loads((tmp_path / "ev" / "metrics.json").read_text())["unknown"]
    assert u["n_accepted"] + u["n_rejected"] == 96 and u["target_rejection"] == 0.1
