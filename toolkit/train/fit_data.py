"""The datasets a run trains and validates on: images through the tf.data pipeline (or albumentations
worker processes), or cached feature arrays, sharded per worker and batched per replica."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from toolkit.config.settings import FinetuneConfig
from toolkit.data.datasets import DatasetSplits, Split


def class_weights(counts: list[int], mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights N / (C n_c); ``auto`` turns them on past 3:1 imbalance."""
    nonzero = [c for c in counts if c > 0]
    ratio = max(nonzero) / min(nonzero)
    if mode == "off" or (mode == "auto" and ratio <= 3.0):
        return None
    total, classes = sum(counts), len(counts)
    return {i: (total / (classes * c) if c else 0.0) for i, c in enumerate(counts)}


def load_albumentations(path: str):
    import albumentations

    fmt = "yaml" if path.endswith((".yaml", ".yml")) else "json"
    return albumentations.load(path, data_format=fmt)


class FitData:
    """The run's datasets, sharded per worker and batched per replica under a strategy.

    Labels leave as one-hot vectors; class weights (when on) and the padding of
    validation shards (see :func:`toolkit.train.distribute.shard`) as sample weights.
    """

    def __init__(self, config: FinetuneConfig, scale, splits: DatasetSplits, pca: dict,
                 weights: dict[int, float] | None, size: int, closers: list):
        self.config, self.scale, self.splits, self.pca, self.size = config, scale, splits, pca, size
        self.closers = closers  # albumentations worker pools are shut down with the run
        self.num_classes = len(splits.class_names)
        self.class_weights = None if weights is None else np.asarray([weights[i] for i in range(self.num_classes)], np.float32)
        self.global_batch = self.scale.global_batch(self.config.batch_size)
        self.local_batch = self.config.batch_size * self.scale.local_replicas  # one worker's batch per step
        self.compose = load_albumentations(self.config.albumentations) if self.config.albumentations else None

    def steps(self, n: int) -> int:
        return math.ceil(n / self.global_batch)

    def image_data(self, split: Split, training: bool, seed_offset: int = 0, shuffle: bool = True):
        """Batched (images, integer labels) of ``split``; augmented views come in the split's order without
        ``shuffle``."""
        from toolkit.data.pipeline import make_dataset

        config = self.config
        if training and self.compose is not None:
            from toolkit.data.workers import ProcessAugmentedDataset

            workers = ProcessAugmentedDataset(split, self.compose, self.size, config.batch_size, seed=config.seed + seed_offset,
                                              shuffle=shuffle)
            self.closers.append(workers.close)
            return workers.dataset()
        ds = make_dataset(split, self.size, config.batch_size, training=training, seed=config.seed + seed_offset,
                          augment_config=config.augment, pca=self.pca, crop_fraction=config.crop_fraction,
                          shuffle=shuffle)
        if training and config.data_service:
            from toolkit.train.distribute import offload

            ds = offload(ds, config.data_service)
        return ds

    def labelled(self, ds, training: bool, pad_weights=None):
        """(x, integer labels) batches → (x, one-hot[, sample weights])."""
        import tensorflow as tf

        class_w = self.class_weights if training else None

        def to_keras(x, y, w=None):
            if class_w is not None:
                cw = tf.gather(tf.constant(class_w), y)
                w = cw if w is None else w * cw
            y = tf.one_hot(y, self.num_classes)
            return (x, y) if w is None else (x, y, w)

        if pad_weights is None:
            return ds.map(to_keras)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(pad_weights).batch(self.config.batch_size)))
        return ds.map(lambda xy, w: to_keras(xy[0], xy[1], w))

    def train_images(self, seed_offset: int) -> tuple[Any, int]:
        """Augmented training images for ``fit``, and the steps per epoch."""
        from toolkit.train.distribute import shard

        def build(index: int, count: int):
            part = self.splits.train if count == 1 else self.splits.train.take(shard(len(self.splits.train), index, count))
            ds = self.labelled(self.image_data(part, True, seed_offset), training=True)
            return ds.repeat() if self.scale.distributed else ds

        return self.scale.distribute(build), self.steps(len(self.splits.train))

    def val_images(self) -> tuple[Any, int | None]:
        """Validation images for ``fit``, and the validation steps (None: until the data ends)."""
        from toolkit.train.distribute import padded, shard

        def build(index: int, count: int):
            if not self.scale.distributed:
                return self.labelled(self.image_data(self.splits.val, False), training=False)
            indices, pad = padded(shard(len(self.splits.val), index, count), self.val_length(len(self.splits.val)))
            # Repeated: with validation_steps, Keras keeps one iterator over the epochs.
            return self.labelled(self.image_data(self.splits.val.take(indices), False), training=False,
                                 pad_weights=pad).repeat()

        return self.scale.distribute(build), self.val_steps(len(self.splits.val))

    def val_length(self, n: int) -> int:
        from toolkit.train.distribute import evaluation_length

        return evaluation_length(n, self.scale.workers, self.local_batch)

    def val_steps(self, n: int) -> int | None:
        if not self.scale.distributed:
            return None
        return self.val_length(n) // self.local_batch

    def arrays(self, x: np.ndarray, y: np.ndarray, training: bool, n_total: int) -> tuple[Any, int | None]:
        """Cached features of this worker's shard (of ``n_total`` over all workers) for ``fit``, and the steps."""
        import tensorflow as tf

        from toolkit.data.pipeline import finish
        from toolkit.train.distribute import padded

        config = self.config

        def build(index: int, count: int):  # the cache already holds only this worker's shard
            if training:
                ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
                ds = finish(self.labelled(ds.batch(config.batch_size), training=True))
                return ds.repeat() if self.scale.distributed else ds
            if not self.scale.distributed:
                return finish(self.labelled(tf.data.Dataset.from_tensor_slices((x, y)).batch(config.batch_size), training=False))
            indices, pad = padded(np.arange(len(x)), self.val_length(n_total))
            ds = tf.data.Dataset.from_tensor_slices((x[indices], y[indices])).batch(config.batch_size)
            return finish(self.labelled(ds, training=False, pad_weights=pad)).repeat()

        return self.scale.distribute(build), self.steps(n_total) if training else self.val_steps(n_total)
