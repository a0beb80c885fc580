"""Augmentation ops as TensorFlow ops: each is a pure function of (image or
shape, stateless seed, parameters), so it runs eagerly, inside
``tf.data.Dataset.map``, and gives the same result for the same seed.

Crops are expressed as *windows* on the original image, ``(top, left,
height, width)``. For JPEGs the pipeline then decodes only that window
(``tf.image.decode_and_crop_jpeg``), so cropping costs less than nothing.

Images are float32 RGB in [0, 255] unless stated otherwise.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import tensorflow as tf

from toolkit.config.settings import AugmentConfig

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- crop windows


def centre_window(shape_hw: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """Central square of side ``crop_fraction`` x the shorter side: (top, left, h, w) int32."""
    hw = tf.cast(shape_hw[:2], tf.float32)
    side = tf.maximum(tf.cast(tf.round(tf.reduce_min(hw) * crop_fraction), tf.int32), 1)
    h, w = tf.cast(hw[0], tf.int32), tf.cast(hw[1], tf.int32)
    return tf.stack([(h - side) // 2, (w - side) // 2, side, side])


def random_resized_window(shape_hw: tf.Tensor, seed: tf.Tensor, scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
    """Inception-style random window: area in ``scale`` x image area, aspect in ``ratio``."""
    shape3 = tf.concat([tf.cast(shape_hw[:2], tf.int32), [3]], 0)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape3, tf.zeros([1, 0, 4], tf.float32), seed=seed,
        area_range=list(scale), aspect_ratio_range=list(ratio),
        min_object_covered=0.0, max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def resize_crop_window(shape_hw: tf.Tensor, seed: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """Classic "resize shorter side to 256, random 224 crop", as a window on the original.

    Resizing by s then cutting a c x c square equals cutting a (c/s)-square
    from the original and resizing it to c; with c/256 = ``crop_fraction``.
    """
    hw = tf.cast(shape_hw[:2], tf.int32)
    side = tf.maximum(tf.cast(tf.round(tf.cast(tf.reduce_min(hw), tf.float32) * crop_fraction), tf.int32), 1)
    top = tf.random.stateless_uniform([], seed, 0, hw[0] - side + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seed + 7, 0, hw[1] - side + 1, dtype=tf.int32)
    return tf.stack([top, left, side, side])


def train_window(shape_hw: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, eval_crop_fraction: float) -> tf.Tensor:
    if config.crop == "random_resized":
        return random_resized_window(shape_hw, seed, config.crop_scale, config.crop_ratio)
    if config.crop == "resize_crop":
        return resize_crop_window(shape_hw, seed, config.resize_crop_fraction)
    return centre_window(shape_hw, eval_crop_fraction)


# ----------------------------------------------------------------------------- pixel ops
# These take one image (H, W, 3) or a batch (..., H, W, 3) and draw one
# random value per image.


def _per_image_shape(images: tf.Tensor, *tail: int) -> tf.Tensor:
    return tf.concat([tf.shape(images)[:-3], tf.constant(tail, tf.int32)], 0)


def _broadcast_pixels(values: tf.Tensor) -> tf.Tensor:
    """(..., 3) per-image values → (..., 1, 1, 3) to add to (..., H, W, 3)."""
    return values[..., tf.newaxis, tf.newaxis, :]


def flip_coins(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One fair coin per image: True means mirror it."""
    return tf.random.stateless_uniform(_per_image_shape(images), seed) < 0.5


def flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirror each image left-right with probability 1/2.

    (The training pipeline mirrors the small uint8 crop before resizing, with
    the same coin: :func:`toolkit.data.pipeline.train_crop`.)
    """
    coins = flip_coins(images, seed)
    return tf.where(coins[..., tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[-2]), images)


def colour_shift_offsets(images: tf.Tensor, seed: tf.Tensor, max_delta: float) -> tf.Tensor:
    """Independent uniform offsets in [-max_delta, max_delta] per image and RGB channel: (..., 3)."""
    return tf.random.stateless_uniform(_per_image_shape(images, 3), seed, -max_delta, max_delta, dtype=tf.float32)


def pca_offsets(images: tf.Tensor, seed: tf.Tensor, eigenvalues, eigenvectors, sigma: float) -> tf.Tensor:
    """AlexNet colour offsets Σ αᵢ λᵢ pᵢ, αᵢ ~ N(0, σ), per image: (..., 3) in [0, 255] units.

    ``eigenvalues``/``eigenvectors`` (columns) come from the covariance of RGB
    pixels scaled to [0, 1] (:func:`pca_statistics`); the offset is scaled back
    by 255, so its covariance is 255² σ² P diag(λ²) Pᵀ.
    """
    alphas = tf.random.stateless_normal(_per_image_shape(images, 3), seed, 0.0, sigma, dtype=tf.float32)
    weighted = alphas * tf.cast(eigenvalues, tf.float32)
    return 255.0 * tf.linalg.matvec(tf.cast(eigenvectors, tf.float32), weighted)


def colour_shift(images: tf.Tensor, seed: tf.Tensor, max_delta: float) -> tf.Tensor:
    return tf.clip_by_value(images + _broadcast_pixels(colour_shift_offsets(images, seed, max_delta)), 0.0, 255.0)


def pca_colour(images: tf.Tensor, seed: tf.Tensor, eigenvalues, eigenvectors, sigma: float) -> tf.Tensor:
    offsets = pca_offsets(images, seed, eigenvalues, eigenvectors, sigma)
    return tf.clip_by_value(images + _broadcast_pixels(offsets), 0.0, 255.0)


def colour_augment(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig, pca: dict | None) -> tf.Tensor:
    """Colour shift and PCA colour together: the two offsets share one add and one clip."""
    use_shift = config.colour_shift > 0
    use_pca = config.pca_sigma > 0 and pca is not None
    if not (use_shift or use_pca):
        return images
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    offsets = tf.zeros(_per_image_shape(images, 3), tf.float32)
    if use_shift:
        offsets += colour_shift_offsets(images, seeds[0], config.colour_shift)
    if use_pca:
        offsets += pca_offsets(images, seeds[1], pca["eigenvalues"], pca["eigenvectors"], config.pca_sigma)
    return tf.clip_by_value(images + _broadcast_pixels(offsets), 0.0, 255.0)


# ----------------------------------------------------------------------------- PCA statistics


def check_pca_statistics(values, path) -> dict:
    """A run's ``pca.json``, checked: 3 finite eigenvalues >= 0 and a 3x3 finite eigenvector matrix."""
    from toolkit.core.errors import UserError

    try:
        eigenvalues = np.asarray(values["eigenvalues"], dtype=np.float64)
        eigenvectors = np.asarray(values["eigenvectors"], dtype=np.float64)
        ok = (eigenvalues.shape == (3,) and eigenvectors.shape == (3, 3) and np.isfinite(eigenvalues).all()
              and np.isfinite(eigenvectors).all() and (eigenvalues >= 0).all() and eigenvalues.max() <= 1)
    except (TypeError, KeyError, ValueError, IndexError):
        ok = False
    if not ok:
        raise UserError(f"{path} must hold 3 eigenvalues in [0, 1] and a 3x3 eigenvector matrix of the training "
                        "images' RGB colours; delete it: the next --resume computes it again.")
    return {"eigenvalues": eigenvalues.tolist(), "eigenvectors": eigenvectors.tolist()}


def pca_statistics(paths: Sequence[str], sample_size: int = 200, pixels_per_image: int = 2000, seed: int = 0) -> dict:
    """Eigen-decomposition of the 3x3 RGB covariance over a sample of training images.

    Computed once per run and saved with it. Pixels are scaled to [0, 1].
    Images are decoded with PIL's JPEG draft mode (reduced size): colour
    statistics do not need full resolution.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(sample_size, len(paths)), replace=False)
    samples = []
    for i in chosen:
        try:
            with Image.open(paths[i]) as im:
                im.draft("RGB", (128, 128))
                arr = np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0
        except OSError as exc:
            logger.debug("PCA statistics: skipping %s (%s)", paths[i], exc)
            continue
        take = rng.choice(len(arr), size=min(pixels_per_image, len(arr)), replace=False)
        samples.append(arr[take])
    if not samples:
        raise ValueError("PCA statistics: none of the sampled images could be read")
    pixels = np.concatenate(samples)
    cov = np.cov(pixels, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    return {
        "eigenvalues": eigenvalues[order].tolist(),
        "eigenvectors": eigenvectors[:, order].tolist(),  # columns are the eigenvectors
        "mean": pixels.mean(axis=0).tolist(),
        "pixels": int(len(pixels)),
        "images": len(samples),
    }
