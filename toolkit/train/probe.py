"""Probes: a frozen backbone's pooled features of whole images and of their mirror images, and fold heads
trained on them for out-of-fold probabilities. The data audit (:mod:`toolkit.api.audit`) and a cross-validated
run's audit (:mod:`toolkit.train.cross_validate`) both score images this way."""

from __future__ import annotations

import numpy as np

DUPLICATE_SIZE = 128  # px: near-duplicates are searched among shrunk whole images (see toolkit.data.near_duplicates)


def probe_backbone(config):
    """``config``'s backbone, frozen at any input size, with its configured weights."""
    from toolkit import backbones

    return backbones.create(config.backbone, input_shape=(None, None, 3),
                            weights=None if config.weights == "none" else config.weights,
                            preprocess=config.backbone_preprocess)


def _plain_and_mirrored(backbone, ds, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of each batch's images and of their mirror images: (plain, mirrored)."""
    import tensorflow as tf

    from toolkit.backbones.head import NINHead
    from toolkit.train.feature_cache import feature_extractor, inference

    forward = inference(feature_extractor(backbone, NINHead(2)))
    plain, mirrored = [], []
    for images, _ in ds:
        plain.append(np.asarray(forward(images), np.float32))
        mirrored.append(np.asarray(forward(tf.image.flip_left_right(images)), np.float32))
        if bar:
            bar.add(1)
    return np.concatenate(plain), np.concatenate(mirrored)


def centre_and_mirror_features(backbone, split, config, verbose: int) -> np.ndarray:
    """(2, images, 1, 1, channels): pooled backbone features of each centre crop and of its mirror image."""
    import keras

    from toolkit import backbones
    from toolkit.data.pipeline import make_dataset

    size = config.image_size or backbones.get_spec(config.backbone).input_size
    ds = make_dataset(split, size, config.batch_size, training=False, crop_fraction=config.crop_fraction)
    bar = keras.utils.Progbar(-(-len(split) // config.batch_size), unit_name="batch") if verbose else None
    return np.stack(_plain_and_mirrored(backbone, ds, bar))


def duplicate_embedding(backbone, split, batch_size: int = 32) -> np.ndarray:
    """(images, channels): what near-duplicates are searched by (:mod:`toolkit.data.near_duplicates`): pooled features
    of the whole image shrunk to :data:`DUPLICATE_SIZE` px, averaged with its mirror image's."""
    from toolkit.data.pipeline import make_dataset

    fixed = backbone.input.shape[1]  # a backbone that takes one size only (a ViT) sees the images at that size
    ds = make_dataset(split, fixed or DUPLICATE_SIZE, batch_size, training=False, crop_fraction=1.0)
    plain, mirrored = _plain_and_mirrored(backbone, ds)
    return ((plain + mirrored) / 2).reshape(len(split), -1)


def out_of_fold_probs(views: np.ndarray, labels: np.ndarray, held: np.ndarray, config, classes: int) -> np.ndarray:
    """(images, classes): out-of-fold probabilities of fold heads trained on one probe's ``views``; ``held``:
    (images, heads), True where the image is in the head's own fold (:func:`toolkit.train.folds.held_out`)."""
    import keras

    from toolkit.backbones.head import FoldHeads
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.train.folds import out_of_fold

    keras.utils.set_random_seed(config.seed)  # the heads' initialisation: the same audit for the same seed
    heads = FoldHeads(held.shape[1], classes, 0, config.dropout)
    # No label smoothing: it pulls every probability towards uniform, and the audit ranks images by how
    # confidently their label is contradicted (measured: precision@k of planted flips 0.67-0.88 with the
    # recipe's 0.1, 0.70-0.92 without, on clothing-small and hymenoptera, 2 seeds each).
    settings = FoldSettings(config.head_lr, 0.0, config.batch_size, config.head_epochs, config.early_stopping_patience,
                            config.seed)
    return out_of_fold(fit_fold_heads(heads, views, labels, held, settings), held)
