"""Dataset discovery and splitting."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import shared_dataset
from toolkit.data.datasets import DatasetError, load_splits, stratified_split


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_folder_per_class_with_stratified_split(tmp_path):
    _tree(tmp_path, {"b": 10, "a": 20})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")
    splits = load_splits(tmp_path, val_fraction=0.2, seed=1)
    assert splits.class_names == ("a", "b")  # sorted, not listing order
    assert splits.val.counts() == {"a": 4, "b": 2}
    assert splits.train.counts() == {"a": 16, "b": 8}
    assert not set(splits.train.paths) & set(splits.val.paths)
    assert all(".DS_Store" not in p for p in splits.train.paths + splits.val.paths)
    again = load_splits(tmp_path, val_fraction=0.2, seed=1)
    assert again.val.paths == splits.val.paths
    other = load_splits(tmp_path, val_fraction=0.2, seed=2)
    assert other.val.paths != splits.val.paths


def test_train_val_test_folders(tmp_path):
    _tree(tmp_path / "train", {"x": 3, "y": 3})
    _tree(tmp_path / "validation", {"x": 1, "y": 2})
    _tree(tmp_path / "test", {"x": 1})
    splits = load_splits(tmp_path)
    assert len(splits.train) == 6 and len(splits.val) == 3 and len(splits.test) == 1
    assert splits.val_source == f"validation split from the data ({tmp_path / 'validation'})"


def test_unusable_datasets_are_refused_with_the_folder_named(tmp_path):
    with pytest.raises(DatasetError, match="Data folder not found"):
        load_splits(tmp_path / "nope")
    _tree(tmp_path / "one", {"only": 5})
    with pytest.raises(DatasetError, match=r"one: found usable images for only one class \['only'\]"):
        load_splits(tmp_path / "one")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty: no usable images found"):
        load_splits(tmp_path / "empty")


def test_stratified_split_rejects_bad_fraction(tmp_path):
    splits = load_splits(_tree(tmp_path, {"a": 4, "b": 4}))
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        stratified_split(splits.train, 1.5, 0)


def test_hymenoptera_layout():
    root = shared_dataset("hymenoptera")
    splits = load_splits(root)
    assert splits.class_names == ("ants", "bees")
    assert len(splits.train) == 245 and len(splits.val) == 153
