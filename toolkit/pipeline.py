"""tf.data input pipelines: decode, crop/resize, batch, prefetch.

Images leave the pipeline as float32 raw RGB in [0, 255]; normalisation is the
model's job (its preprocessing layer), so training, evaluation and exported
models all see the same pixels.
"""

from __future__ import annotations

import tensorflow as tf

from toolkit.datasets import Split

AUTOTUNE = tf.data.AUTOTUNE
DEFAULT_CROP_FRACTION = 0.875


def decode_rgb(path: tf.Tensor) -> tf.Tensor:
    """File → uint8 (H, W, 3); grey/RGBA/palette become RGB, GIFs give their first frame."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def centre_crop(image: tf.Tensor, size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> tf.Tensor:
    """Resize the shorter side to ``size / crop_fraction``, then cut the central size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / crop_fraction) / tf.reduce_min(shape)
    new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    resized = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    return resized[top : top + size, left : left + size, :]


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
    """Inception-style crop: a random box of the given area and aspect ranges, resized to size."""
    bbox = tf.zeros([1, 0, 4], tf.float32)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bbox, seed=seed, area_range=scale, aspect_ratio_range=ratio,
        min_object_covered=0.0, max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, extent)
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=True)


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    training: bool,
    seed: int = 0,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
) -> tf.data.Dataset:
    """Batched (images, labels); training adds shuffling, random crops and mirroring."""
    ds = tf.data.Dataset.from_tensor_slices((list(split.paths), list(split.labels)))
    if training:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
        # One (2,) stateless seed per element: deterministic for a given seed, new every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))

        def load(element, op_seed):
            path, label = element
            image = random_resized_crop(decode_rgb(path), image_size, op_seed)
            image = tf.image.stateless_random_flip_left_right(image, op_seed + 1)
            return image, label

    else:

        def load(path, label):
            return centre_crop(decode_rgb(path), image_size, crop_fraction), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
