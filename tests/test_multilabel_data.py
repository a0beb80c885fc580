"""Multi-label manifests: the `labels` column's parser, iterative-stratified folds, `inspect`, and the commands that
refuse such data in one line."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.cli.main import main
from toolkit.data.discovery import DatasetError
from toolkit.data.multilabel import (check_fold_counts, co_occurrence, load_multilabel, parse_cell, read_manifest,
                                     stratified_folds, targets_matrix)

CLASSES = ("circle", "square", "star", "triangle")


@pytest.mark.parametrize("cell, names, repeated", [
    ("", (), ()),
    ("   ", (), ()),
    ("cat", ("cat",), ()),
    (" cat ;  dog ", ("cat", "dog"), ()),
    ("cat;;dog;", ("cat", "dog"), ()),
    ("dog;cat;dog; dog", ("dog", "cat"), ("dog",)),
    ("sea lion;cat", ("sea lion", "cat"), ()),
])
def test_a_labels_cell_is_split_on_semicolons_trimmed_and_deduplicated(cell, names, repeated):
    parsed = parse_cell(cell)
    assert parsed.names == names and parsed.repeated == repeated


def write_manifest(folder, rows, header="path,labels,split"):
    path = folder / "labels.csv"
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def sample_rows(sample_data, per_class=6, seed=0):
    """Rows of the sample's images, each labelled with its own shape and 0-2 others (a stated, fixed draw)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in CLASSES:
        for image in sorted((sample_data / c).iterdir())[:per_class]:
            others = rng.choice([o for o in CLASSES if o != c], size=rng.integers(0, 3), replace=False)
            rows.append((str(image), ";".join([c, *others])))
    return rows


def test_the_manifest_reader_notes_repeats_skips_conflicts_and_refuses_unknown_names(sample_data, tmp_path):
    images = sorted((sample_data / "circle").iterdir())
    csv = write_manifest(tmp_path, [
        (str(images[0]), "circle;circle ", "train"),
        (str(images[1]), "", "train"),  # holds none of the classes
        (str(images[2]), "circle", "train"),
        (str(images[2]), "square", "train"),  # the same image with other labels: both rows skipped
        (str(images[3]), "circle;square", "test"),
        (str(images[3]), "square; circle", "test"),  # the same labels again: used once
        (str(tmp_path / "gone.jpg"), "circle", "train"),
    ])
    problems = []
    layout = read_manifest(csv, problems)
    assert layout == {"train": [(str(images[0]), ("circle",)), (str(images[1]), ())],
                      "test": [(str(images[3]), ("circle", "square"))]}
    reasons = {(p.severity, p.reason.split(";")[0].split(" (")[0]) for p in problems}
    assert ("info", "circle written twice in one cell") in reasons
    assert ("skipped", "listed twice in labels.csv with different labels or splits") in reasons
    assert ("info", "listed twice in labels.csv") in reasons
    assert ("skipped", "listed in labels.csv") in reasons
    with pytest.raises(DatasetError, match=r"labels \['square'\] are not among the classes \['circle', 'star'\]"):
        read_manifest(csv, [], class_names=("circle", "star"))


def test_loaded_data_has_one_row_of_targets_per_usable_image_and_lists_the_broken_one(sample_data, tmp_path):
    rows = sample_rows(sample_data)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    csv = write_manifest(tmp_path, [r + ("train",) for r in rows] + [(str(broken), "star", "train")])
    data = load_multilabel(csv)
    train = data.splits["train"]
    assert data.class_names == CLASSES and train.paths == tuple(r[0] for r in rows)
    want = np.array([[name in r[1].split(";") for name in CLASSES] for r in rows], np.uint8)
    np.testing.assert_array_equal(train.targets, want)
    assert [p.path for p in data.skipped()] == [str(broken)]
    pairs = co_occurrence(train.targets)
    assert pairs[0, 1] == sum("circle" in r[1] and "square" in r[1] for r in rows)
    np.testing.assert_array_equal(np.diag(pairs), want.sum(axis=0))


def test_folds_keep_every_label_in_every_fold_where_the_counts_allow():
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 6)) < [0.5, 0.3, 0.2, 0.1, 0.1, 0.1]).astype(np.uint8)
    targets[:, 5] = 0
    targets[rng.choice(60, 5, replace=False), 5] = 1  # a rare label: exactly one image per fold is possible
    for seed in range(5):
        folds = stratified_folds(targets, 5, seed)
        assert sorted(np.bincount(folds)) == [12] * 5  # the images spread evenly over the folds
        allowed = targets.sum(axis=0) >= 5
        for k in range(5):
            assert (targets[folds == k].sum(axis=0)[allowed] >= 1).all(), (seed, k, targets[folds == k].sum(axis=0))
        np.testing.assert_array_equal(targets[folds == 0].sum(axis=0)[5], 1)


def test_a_label_held_by_fewer_images_than_folds_is_refused_by_name():
    targets = targets_matrix([("a",), ("a", "b"), ("b",), ("a",), ("b",), ("a", "c")], ("a", "b", "c"))
    check_fold_counts(targets, ("a", "b", "c"), 1, "data.csv")
    with pytest.raises(DatasetError, match=r"data.csv: labels held by fewer images than the 3 folds: c \(1 image\); "
                                           r"add images of them or remove them from the manifest$"):
        check_fold_counts(targets, ("a", "b", "c"), 3, "data.csv")
    with pytest.raises(DatasetError, match=r"b \(3 images\), c \(1 image\)"):
        check_fold_counts(targets, ("a", "b", "c"), 4, "data.csv")


def test_inspect_shows_label_counts_co_occurrence_and_unlabelled_images(sample_data, tmp_path, capsys):
    rows = sample_rows(sample_data)
    extra = sorted((sample_data / "star").iterdir())[-2:]
    csv = write_manifest(tmp_path, [r + ("train",) for r in rows] + [(str(p), "", "test") for p in extra])
    assert main(["inspect", "--data", str(csv)]) == 0
    out = capsys.readouterr().out
    counts = {c: sum(c in r[1].split(";") for r in rows) for c in CLASSES}
    assert f"classes: 4; images: train {len(rows)}, test 2;" in out
    for c in CLASSES:
        assert any(line.split() == [c, str(counts[c]), "0"] for line in out.splitlines()), out
    assert "images holding no label: train 0, test 2" in out
    lines = out.splitlines()
    start = lines.index("training images holding both labels (row and column):")
    assert lines[start + 1].split() == list(CLASSES)
    table = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[start + 2:start + 6]}
    for i, a in enumerate(CLASSES):
        for j, b in enumerate(CLASSES):
            assert table[a][j] == sum(a in r[1].split(";") and b in r[1].split(";") for r in rows), (a, b)
    folds = stratified_folds(load_multilabel(csv).splits["train"].targets, 5, 0)
    least = min(load_multilabel(csv).splits["train"].targets[folds == k].sum(axis=0).min() for k in range(5))
    assert least >= 1 and f"folds (5, iterative stratification, seed 0): each fold holds at least {least} " in out
    pairs = int(load_multilabel(csv).splits["train"].targets.sum())
    assert f"freeze plan for --freeze auto with mobilenet_v2: auto: {pairs} labels on " in out and "per label" in out


def test_inspect_says_a_rare_label_cannot_be_cross_validated(sample_data, tmp_path, capsys):
    rows = [(p, "circle") for p, _ in sample_rows(sample_data)]
    rows[0] = (rows[0][0], "circle;rare")
    csv = write_manifest(tmp_path, rows, header="path,labels")
    assert main(["inspect", "--data", str(csv)]) == 2
    assert "cannot cross-validate this data: " in capsys.readouterr().out


def test_auditing_refuses_multi_label_data_and_training_a_single_label_in_one_line(sample_data, tmp_path, capsys):
    csv = write_manifest(tmp_path, [r + ("train",) for r in sample_rows(sample_data)])
    assert main(["audit", "--data", str(csv), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "its `labels` column makes it multi-label data" in err and "one class per image" in err
    csv = write_manifest(tmp_path, [(p, "circle", "train") for p, _ in sample_rows(sample_data)])  # one label only
    for command, fragments in (("audit", ("its `labels` column makes it multi-label data", "one class per image")),
                               ("finetune", ("use 1 label(s) ['circle']", "needs at least two"))):
        assert main([command, "--data", str(csv), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert all(fragment in err for fragment in fragments), err
        assert not (tmp_path / "out").exists()


def test_a_label_and_a_labels_column_together_are_refused(sample_data, tmp_path, capsys):
    image = next((sample_data / "circle").iterdir())
    csv = write_manifest(tmp_path, [(str(image), "circle", "circle")], header="path,label,labels")
    for argv in (["inspect", "--data", str(csv)], ["finetune", "--data", str(csv), "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has both a `label` and a `labels` column" in err
    assert not (tmp_path / "o").exists()
