"""albumentations in worker processes feeding tf.data: shapes, order, determinism; and from a recipe."""

from __future__ import annotations

import numpy as np
import pytest

from tests.badinput import photo_tree
from toolkit.data.datasets import load_splits
from toolkit.data.workers import ProcessAugmentedDataset


def _compose():
    import albumentations as A

    return A.Compose([A.RandomResizedCrop(size=(48, 48), scale=(0.3, 1.0)), A.HorizontalFlip(), A.RGBShift(20, 20, 20)])


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = photo_tree(tmp_path_factory.mktemp("albu"), 10, size=(80, 60))
    return load_splits(root, val_fraction=0.2).train


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_worker_batches_are_deterministic_and_cover_every_image(split):
    first = ProcessAugmentedDataset(split, _compose(), 48, 4, seed=5, workers=2)
    second = ProcessAugmentedDataset(split, _compose(), 48, 4, seed=5, workers=2)
    try:
        x1, y1 = _epoch(first.dataset())
        x2, y2 = _epoch(second.dataset())
        np.testing.assert_array_equal(x1, x2)  # whichever worker ran which batch
        np.testing.assert_array_equal(y1, y2)
        assert x1.shape == (len(split), 48, 48, 3) and x1.dtype == np.float32
        assert sorted(y1.tolist()) == sorted(split.labels)  # every image once per epoch
        x3, _ = _epoch(first.dataset())  # next epoch: new order and new views
        assert not np.array_equal(x1, x3)
        assert first.dataset().options().autotune.enabled is False  # see toolkit.data.pipeline.finish
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_finetune_takes_an_albumentations_compose_from_the_recipe(sample_data, tmp_path):
    import albumentations as A

    from toolkit.api import train
    from toolkit.config.recipes import build_config

    path = tmp_path / "compose.json"
    A.save(_compose(), str(path))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'albumentations = "{path}"\nhead_epochs = 2\ncache_views = 2\nimage_size = 48\n')
    result = train(build_config(recipe, {"data": str(sample_data), "freeze": "all"}), out=tmp_path / "run", verbose=0)
    assert result.metrics["n_val"] > 0
    with pytest.raises(ValueError, match="albumentations file not found"):  # checked before a run folder exists
        train(build_config(recipe, {"data": str(sample_data), "albumentations": "nope.json"}), out=tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
