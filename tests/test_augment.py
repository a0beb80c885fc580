"""Augmentation ops: statistics checked eagerly and inside tf.data, and seed determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from toolkit.data import augment
from toolkit.data.augment import AugmentConfig
from toolkit.data.datasets import load_splits
from toolkit.data.pipeline import make_dataset

N = 4000
PCA = {
    "eigenvalues": [0.2, 0.05, 0.01],
    "eigenvectors": np.linalg.qr(np.array([[1.0, 0.2, 0.1], [1.0, -0.5, 0.3], [1.0, 0.4, -0.9]]))[0].tolist(),
}


def _map(fn, n=N):
    """Run fn(i) for i in range(n) inside tf.data.Dataset.map and stack the results."""
    ds = tf.data.Dataset.range(n).map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.concatenate([x.numpy().reshape(x.shape[0], -1) for x in ds.batch(512)])


def _seed(i):
    return tf.stack([tf.cast(i, tf.int64), tf.constant(17, tf.int64)])


IMAGE = tf.constant(np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) * 10)


def _flipped(out):
    return bool(np.array_equal(out, IMAGE.numpy()[:, ::-1]))


def test_flip_rate_is_one_half_eagerly_and_in_tf_data():
    eager = [_flipped(augment.flip(IMAGE, _seed(i)).numpy()) for i in range(1000)]
    assert abs(np.mean(eager) - 0.5) < 0.05
    batch = augment.flip(tf.repeat(IMAGE[None], N, 0), _seed(3)).numpy()
    rate = np.mean([np.array_equal(b, IMAGE.numpy()[:, ::-1]) for b in batch])
    assert abs(rate - 0.5) < 0.03
    mapped = _map(lambda i: augment.flip(IMAGE, _seed(i))).reshape(N, 2, 3, 3)
    in_data = np.mean([_flipped(m) for m in mapped])
    assert abs(in_data - 0.5) < 0.03
    unchanged_or_flipped = all(_flipped(m) or np.array_equal(m, IMAGE.numpy()) for m in mapped)
    assert unchanged_or_flipped


def test_colour_shift_is_bounded_uniform_and_per_channel():
    grey = tf.fill([4, 4, 3], 128.0)
    offsets = _map(lambda i: augment.colour_shift(grey, _seed(i), 20.0)[0, 0] - 128.0)
    assert offsets.min() >= -20 and offsets.max() <= 20
    np.testing.assert_allclose(offsets.mean(0), 0, atol=1.0)
    np.testing.assert_allclose(offsets.var(0), 40**2 / 12, rtol=0.1)  # uniform(-20, 20)
    assert abs(np.corrcoef(offsets.T)[0, 1]) < 0.1  # channels independent
    eager = augment.colour_shift(grey, _seed(1), 20.0).numpy()
    assert np.allclose(eager, eager[0, 0])  # one offset for the whole image
    assert augment.colour_shift(tf.fill([2, 2, 3], 250.0), _seed(2), 20.0).numpy().max() <= 255.0


def test_pca_offsets_have_the_intended_covariance():
    sigma = 0.1
    P, lam = np.asarray(PCA["eigenvectors"]), np.asarray(PCA["eigenvalues"])
    intended = 255**2 * sigma**2 * P @ np.diag(lam**2) @ P.T
    image = tf.zeros([1, 1, 3])
    in_data = _map(lambda i: augment.pca_offsets(image, _seed(i), PCA["eigenvalues"], PCA["eigenvectors"], sigma))
    eager = augment.pca_offsets(tf.zeros([N, 1, 1, 3]), _seed(5), PCA["eigenvalues"], PCA["eigenvectors"], sigma).numpy()
    for offsets in (in_data, eager):
        cov = np.cov(offsets, rowvar=False)
        np.testing.assert_allclose(cov, intended, atol=0.08 * np.abs(intended).max())
        np.testing.assert_allclose(offsets.mean(0), 0, atol=0.1 * np.sqrt(intended.max()))


def test_pca_statistics_find_the_dominant_colour_axis(tmp_path):
    rng = np.random.default_rng(0)
    axis = np.array([0.8, 0.5, 0.33])
    axis /= np.linalg.norm(axis)
    paths = []
    for i in range(20):
        t = rng.uniform(-0.3, 0.3, (32, 32, 1))
        pixels = np.clip(0.5 + t * axis + rng.normal(0, 0.01, (32, 32, 3)), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    stats = augment.pca_statistics(paths, sample_size=20, seed=1)
    top = np.asarray(stats["eigenvectors"])[:, 0]
    assert abs(abs(top @ axis) - 1) < 0.01
    assert stats["eigenvalues"][0] > 20 * stats["eigenvalues"][1]


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (40, 1000), (224, 224)])
def test_crop_windows_lie_inside_the_image(shape):
    config = AugmentConfig()
    h, w = shape
    for i in range(200):
        for window in (
            augment.random_resized_window(tf.constant(shape), _seed(i), config.crop_scale, config.crop_ratio),
            augment.resize_crop_window(tf.constant(shape), _seed(i), 0.875),
            augment.centre_window(tf.constant(shape), 0.875),
        ):
            top, left, wh, ww = window.numpy()
            assert top >= 0 and left >= 0 and wh >= 1 and ww >= 1 and top + wh <= h and left + ww <= w
    rr = _map(lambda i: augment.random_resized_window(tf.constant(shape), _seed(i), (0.25, 1.0), (0.75, 4 / 3)), 500)
    area = rr[:, 2] * rr[:, 3] / (h * w)
    inside = (rr[:, 0] >= 0) & (rr[:, 1] >= 0) & (rr[:, 0] + rr[:, 2] <= h) & (rr[:, 1] + rr[:, 3] <= w)
    assert inside.all()
    if min(shape) > 100 and max(shape) / min(shape) < 2:  # feasible shapes: the area range holds
        assert area.min() >= 0.24 and area.max() <= 1.0 and area.std() > 0.1
    centre = augment.centre_window(tf.constant(shape), 0.875).numpy()
    assert centre[2] == centre[3] == round(min(shape) * 0.875)
    assert abs(centre[0] - (h - centre[2]) / 2) <= 0.5 and abs(centre[1] - (w - centre[3]) / 2) <= 0.5


def test_config_errors_name_the_key_and_allowed_values():
    with pytest.raises(ValueError, match=r"crop='zoom'.*random_resized, resize_crop, none"):
        AugmentConfig(crop="zoom").validate()
    with pytest.raises(ValueError, match=r"crop_scale=\(0.0, 1.0\)"):
        AugmentConfig(crop_scale=(0.0, 1.0)).validate()
    with pytest.raises(ValueError, match="colour_shift=-1"):
        AugmentConfig(colour_shift=-1).validate()


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    from tests.badinput import photo, photo_tree

    root = photo_tree(tmp_path_factory.mktemp("aug"), 12, size=(120, 90))
    for cls in ("a", "b"):
        photo(99, size=(60, 80)).save(root / cls / "x.png")  # a non-JPEG takes the other decode path
    return load_splits(root, val_fraction=0.2, cache=None).train


def _epoch(split, seed, config=None, pca=PCA):
    ds = make_dataset(split, 64, 8, training=True, seed=seed, augment_config=config or AugmentConfig(), pca=pca)
    return np.concatenate([x.numpy() for x, _ in ds]), np.concatenate([y.numpy() for _, y in ds])


def test_pipeline_is_deterministic_given_a_seed_and_varies_across_seeds_and_epochs(small_split):
    a1, la = _epoch(small_split, 7)
    a2, lb = _epoch(small_split, 7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(la, lb)
    b, _ = _epoch(small_split, 8)
    assert not np.array_equal(a1, b)
    ds = make_dataset(small_split, 64, 8, training=True, seed=7, pca=PCA)
    first = np.concatenate([x.numpy() for x, _ in ds])
    second = np.concatenate([x.numpy() for x, _ in ds])
    assert not np.array_equal(first, second)  # a new epoch gets new views
    assert first.min() >= 0 and first.max() <= 255 and first.shape[1:] == (64, 64, 3)


def test_every_op_can_be_switched_off(small_split):
    off = AugmentConfig(crop="none", flip=False, colour_shift=0, pca_sigma=0)
    train_off, labels = _epoch(small_split, 3, off)
    eval_ds = make_dataset(small_split, 64, 8, training=False)
    evaluated = np.concatenate([x.numpy() for x, _ in eval_ds])
    order = np.argsort(labels, kind="stable")  # training order is shuffled; compare as multisets per image
    assert train_off.shape == evaluated.shape
    matched = sum(any(np.allclose(t, e, atol=1.0) for e in evaluated) for t in train_off[order])
    assert matched == len(train_off)  # with everything off, a training view is the evaluation view
    only_flip = dataclasses.replace(off, flip=True)
    flipped, _ = _epoch(small_split, 3, only_flip)
    assert any(not any(np.allclose(t, e, atol=1.0) for e in evaluated) for t in flipped)


def test_pipelines_run_without_the_tf_data_autotuner(small_split):
    """With the autotuner on, deleting an iterator could block for seconds (toolkit.data.pipeline.finish)."""
    for training in (True, False):
        ds = make_dataset(small_split, 64, 8, training=training)
        assert ds.options().autotune.enabled is False
        assert sum(len(y) for _, y in ds) == len(small_split)  # and every image still arrives
