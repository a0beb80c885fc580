"""tf.data input pipelines that aim at the speed of JPEG decoding alone
(measured by benchmarks/pipeline.py: 1.03x decode-and-resize on clothing-small,
0.85x on hymenoptera; see docs/benchmarks/pipeline.md).

Every crop -- the evaluation centre crop, the random-resized crop, the classic
resize-256-then-random-224 crop -- is computed as a window on the *original*
image from its header (``tf.image.extract_jpeg_shape``), and only that window
is decoded (``tf.image.decode_and_crop_jpeg``); the mirror flips the decoded
uint8 window, which is then resized to the model's size, and the colour ops run
on the resized view. Non-JPEG files are decoded whole and sliced. Files stream from disk (``read_file`` inside a
parallel ``map``), so memory does not grow with the dataset.

Images leave the pipeline as float32 raw RGB in [0, 255]; normalisation is
inside the model.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import tensorflow as tf

from toolkit.data import augment
from toolkit.data.augment import AugmentConfig
from toolkit.data.datasets import Split

DEFAULT_CROP_FRACTION = 0.875
PREFETCH_BATCHES = 2

Window = Callable[[tf.Tensor], tf.Tensor]  # image shape (h, w, ...) → (top, left, height, width)


def parallel_calls() -> int:
    """Parallel calls for a ``map``: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Prefetch ``PREFETCH_BATCHES`` batches and switch tf.data's autotuner off.

    Why: with the autotuner on, deleting an iterator sometimes blocks until the
    autotuner's thread wakes up -- measured here at 1 s after a 1.5 s pass and 4 s
    after a 10 s one, about every other time -- and ``predict``, ``evaluate`` and
    every Keras epoch delete one (10-crop prediction ran at 12.5x the centre crop's
    time instead of 8.9x). The pipelines therefore use fixed settings: one map call
    per core (:func:`parallel_calls`) and a two-batch prefetch, which keep the
    cores as busy as the autotuner did (benchmarks/pipeline.py, benchmarks/predict.py).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def decode_window(data: tf.Tensor, is_jpeg: tf.Tensor, window: Window, fast_idct: bool = False) -> tf.Tensor:
    """Decode only ``window(shape)`` of an encoded image: uint8 (h, w, 3).

    ``fast_idct`` selects libjpeg's faster integer IDCT (as TF's own ImageNet
    input pipelines do for training); evaluation keeps the accurate one.
    """

    def jpeg() -> tf.Tensor:
        win = window(tf.image.extract_jpeg_shape(data))
        return tf.image.decode_and_crop_jpeg(data, win, channels=3, dct_method="INTEGER_FAST" if fast_idct else "")

    def other() -> tf.Tensor:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        win = window(tf.shape(image))
        return tf.slice(image, tf.stack([win[0], win[1], 0]), tf.stack([win[2], win[3], 3]))

    crop = tf.cond(is_jpeg, jpeg, other)
    crop.set_shape([None, None, 3])
    return crop


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    return tf.image.resize(image, [size, size], method="bilinear", antialias=False)


def eval_image(data: tf.Tensor, is_jpeg: tf.Tensor, size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> tf.Tensor:
    """Evaluation view: central square of ``crop_fraction`` of the shorter side, resized to size."""
    return resize(decode_window(data, is_jpeg, lambda s: augment.centre_window(s, crop_fraction)), size)


def train_crop(
    data: tf.Tensor, is_jpeg: tf.Tensor, seed: tf.Tensor, size: int, config: AugmentConfig,
    eval_crop_fraction: float = DEFAULT_CROP_FRACTION,
) -> tf.Tensor:
    """Random crop (decoding only its window), mirrored half of the time, resized to size.

    The mirror is applied to the small uint8 window, and only when the coin says so.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    window = lambda s: augment.train_window(s, seeds[0], config, eval_crop_fraction)  # noqa: E731
    crop = decode_window(data, is_jpeg, window, fast_idct=True)
    if config.flip:
        mirror = augment.flip_coins(crop, seeds[1])
        crop = tf.cond(mirror, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    return resize(crop, size)


def _source(split: Split) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        (list(split.decode_paths), np.asarray(split.is_jpeg, dtype=bool), np.asarray(split.labels, dtype=np.int32))
    )


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    augment_config: AugmentConfig | None = None,
    pca: dict | None = None,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    drop_remainder: bool = False,
    shuffle: bool = True,
) -> tf.data.Dataset:
    """Batched ``(images, labels)``. Training shuffles (unless ``shuffle`` is off: augmented views in the split's
    order) and augments; deterministic for a seed."""
    ds = _source(split)
    if training:
        config = augment_config or AugmentConfig()
        if shuffle:
            ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
        # One stateless seed per image: reproducible for a given seed, new every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))

        def load(element, op_seed):
            path, is_jpeg, label = element
            crop_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(op_seed, tf.int64), 2))
            image = train_crop(tf.io.read_file(path), is_jpeg, crop_seed, image_size, config, crop_fraction)
            return augment.colour_augment(image, colour_seed, config, pca), label

        ds = ds.map(load, num_parallel_calls=parallel_calls(), deterministic=True)
        return finish(ds.batch(batch_size, drop_remainder=drop_remainder))

    def load_eval(path, is_jpeg, label):
        return eval_image(tf.io.read_file(path), is_jpeg, image_size, crop_fraction), label

    ds = ds.map(load_eval, num_parallel_calls=parallel_calls(), deterministic=True)
    return finish(ds.batch(batch_size, drop_remainder=drop_remainder))
