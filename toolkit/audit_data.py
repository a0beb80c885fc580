"""``toolkit audit --data DIR [--model RUN] --out DIR``: audit a dataset without training a classifier first.

Every labelled image (train, val and test splits alike) goes once through a frozen backbone: the default
one, or ``--model RUN``'s backbone, image size and weights. Its pooled features of the centre crop and of
its mirror image are averaged (so a mirrored copy has the same features); K fold heads
(:mod:`toolkit.fold_heads`) give every image out-of-fold probabilities; :mod:`toolkit.audit` does the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from toolkit import runs
from toolkit.errors import UserError

logger = logging.getLogger(__name__)

AUDIT_FOLDS = 5
DUPLICATE_SIZE = 128  # px: near-duplicates are searched among shrunk whole images (see toolkit.near_duplicates)


def audit_data(data: str | Path, out: str | Path, model: str | Path | None = None, overwrite: bool = False,
               folds: int = AUDIT_FOLDS, verbose: int = 1) -> dict:
    """Audit ``data`` into the folder ``out``; returns the summary (also ``out/audit.json``)."""
    from toolkit.config import FinetuneConfig
    from toolkit.recipes import load_config

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"--folds must be an integer >= 2 (at most the image count of the smallest class). "
                        f"Received: folds={folds!r}")
    inputs = {"--data": [data]} | ({"--model": [model]} if model else {})
    runs.check_apart(Path(out), inputs)
    runs.check_replaceable(Path(out), overwrite)
    if model is not None:
        recipe = Path(model) / runs.RECIPE_FILE
        if not recipe.is_file():
            raise UserError(f"--model {str(model)!r} is not a run folder (no {runs.RECIPE_FILE}); pass a folder "
                            "written by toolkit finetune, or leave --model out to use the default backbone.")
        config = load_config(recipe)
    else:
        config = FinetuneConfig()
    audit = audit_input(data, config, folds, verbose)
    from toolkit.audit import find_issues, write_audit

    findings = find_issues(audit)
    with runs.output_dir(out, overwrite, "audit", inputs) as folder:
        return write_audit(folder, audit, findings)


def audit_input(data: str | Path, config, folds: int = AUDIT_FOLDS, verbose: int = 1):
    """Every labelled image of ``data`` (all splits) with its out-of-fold probabilities and features
    (:class:`toolkit.audit.AuditInput`), from ``config``'s backbone."""
    import keras

    from toolkit.datasets import load_splits

    keras.utils.set_random_seed(config.seed)  # the heads' initialisation: the same audit for the same seed
    splits = load_splits(data, val_fraction=0.2, seed=config.seed, progress=verbose > 0)
    parts = [("train", splits.train), ("val", splits.val)] + ([("test", splits.test)] if splits.test else [])
    everything = splits.train + splits.val
    if splits.test is not None:
        everything = everything + splits.test
    names = [name for name, part in parts for _ in range(len(part))]
    labels = np.asarray(everything.labels)
    counts = np.bincount(labels, minlength=len(splits.class_names))
    k = min(folds, int(counts.min()))
    if k < 2:
        small = [c for c, n in zip(splits.class_names, counts) if n < 2]
        raise UserError(f"--data {str(data)!r}: classes {small} have fewer than 2 images; the audit scores every image "
                        "with a model that did not train on it, so each class needs at least 2. Add images, or "
                        "remove those classes.")
    if k < folds:
        logger.warning("audit: the smallest class has %d images, so %d folds instead of %d", counts.min(), k, folds)
    backbone = _backbone(config)
    views = centre_and_mirror_features(backbone, everything, config, verbose)
    audit = _cross_validated(views, labels, k, config, everything, splits.class_names, names)
    audit.duplicate_features = duplicate_embedding(backbone, everything, config.batch_size)
    audit.decode_paths = everything.decode_paths
    return audit


def _backbone(config):
    from toolkit import backbones

    return backbones.create(config.backbone, input_shape=(None, None, 3),
                            weights=None if config.weights == "none" else config.weights)


def _plain_and_mirrored(backbone, ds, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of each batch's images and of their mirror images: (plain, mirrored)."""
    import tensorflow as tf

    from toolkit.feature_cache import feature_extractor, inference
    from toolkit.head import NINHead

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
    from toolkit.pipeline import make_dataset

    size = config.image_size or backbones.get_spec(config.backbone).input_size
    ds = make_dataset(split, size, config.batch_size, training=False, crop_fraction=config.crop_fraction)
    bar = keras.utils.Progbar(-(-len(split) // config.batch_size), unit_name="batch") if verbose else None
    return np.stack(_plain_and_mirrored(backbone, ds, bar))


def duplicate_embedding(backbone, split, batch_size: int = 32) -> np.ndarray:
    """(images, channels): what near-duplicates are searched by (:mod:`toolkit.near_duplicates`): pooled features
    of the whole image shrunk to :data:`DUPLICATE_SIZE` px, averaged with its mirror image's."""
    from toolkit.pipeline import make_dataset

    ds = make_dataset(split, DUPLICATE_SIZE, batch_size, training=False, crop_fraction=1.0)
    plain, mirrored = _plain_and_mirrored(backbone, ds)
    return ((plain + mirrored) / 2).reshape(len(split), -1)


def _cross_validated(views: np.ndarray, labels: np.ndarray, k: int, config, split, class_names, names):
    from toolkit.audit import AuditInput
    from toolkit.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.folds import assign_folds, held_out, out_of_fold
    from toolkit.head import FoldHeads

    held = held_out(assign_folds(labels, k, config.seed, config.cv_repeats), k)
    heads = FoldHeads(held.shape[1], len(class_names), 0, config.dropout)
    # No label smoothing: it pulls every probability towards uniform, and the audit ranks images by how
    # confidently their label is contradicted (measured: precision@k of planted flips 0.67-0.88 with the
    # recipe's 0.1, 0.70-0.92 without, on clothing-small and hymenoptera, 2 seeds each).
    settings = FoldSettings(config.head_lr, 0.0, config.batch_size, config.head_epochs, config.early_stopping_patience,
                            config.seed)
    per_head = fit_fold_heads(heads, views, labels, held, settings)
    features = views.mean(axis=0).reshape(len(labels), -1)
    return AuditInput(split.paths, labels, class_names, out_of_fold(per_head, held), features, names)
