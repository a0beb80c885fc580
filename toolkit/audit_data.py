"""``toolkit audit --data DIR [--model RUN] --out DIR``: audit a dataset without training a classifier first.

Every labelled image (train, val and test splits alike) goes once through each probe backbone, frozen: by
default the :data:`AUDIT_BACKBONES`, or ``--backbones``, or ``--model RUN``'s backbone, image size and weights
alone. Its pooled features of the centre crop and of its mirror image are averaged (so a mirrored copy has the
same features); on each probe's features K fold heads (:mod:`toolkit.fold_heads`) give every image out-of-fold
probabilities, and the probes' probabilities are averaged; :mod:`toolkit.audit` does the rest.

Why several probes: a label that the features of differently trained networks all contradict is more likely
wrong than one that a single network's features do. With 10 % of the labels flipped at random in clothing-small
at 30 per class (5 seeds, scratch run of session 8, the filter of :func:`toolkit.audit.find_issues`), the
precision of the top k rows (k = the flips) was 0.74 with mobilenet_v2 alone and 0.81 with either
EfficientNet-Lite alone, and every ensemble of two to four of the offline backbones scored 0.81-0.85; these three
scored 0.84 ± 0.04 (README: The data audit on planted errors).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit import outputs, runs
from toolkit.errors import UserError

logger = logging.getLogger(__name__)

AUDIT_FOLDS = 5
# The probes of an audit without --model: the default backbone, and the smallest and largest EfficientNet-Lite.
AUDIT_BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2")
DUPLICATE_SIZE = 128  # px: near-duplicates are searched among shrunk whole images (see toolkit.near_duplicates)


def audit_data(data: str | Path, out: str | Path, model: str | Path | None = None, overwrite: bool = False,
               folds: int = AUDIT_FOLDS, verbose: int = 1, backbones: Sequence[str] | None = None) -> dict:
    """Audit ``data`` into the folder ``out``; returns the summary (also ``out/audit.json``). ``backbones``: the
    probes (default :data:`AUDIT_BACKBONES`; with ``model``, that run's backbone alone)."""
    from toolkit.backbones import get_spec
    from toolkit.config import FinetuneConfig
    from toolkit.recipes import load_config

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"--folds must be an integer >= 2 (at most the image count of the smallest class). "
                        f"Received: folds={folds!r}")
    if model is not None and backbones:
        raise UserError(f"--backbones and --model both choose the audit's backbone; pass one of them. Received: "
                        f"backbones={','.join(backbones)!r}, model={str(model)!r}")
    for name in backbones or ():
        get_spec(name)  # an unknown name: one line with a did-you-mean, before any folder exists
    inputs = {"--data": [data]} | ({"--model": [model]} if model else {})
    outputs.check_output_dir(Path(out), overwrite, "audit", inputs)
    if model is not None:
        recipe = Path(model) / runs.RECIPE_FILE
        if not recipe.is_file():
            raise UserError(f"--model {str(model)!r} is not a run folder (no {runs.RECIPE_FILE}); pass a folder "
                            "written by toolkit finetune, or leave --model out to use the default backbone.")
        config = load_config(recipe)
    else:
        config = FinetuneConfig()
    probes = (config.backbone,) if model is not None else tuple(backbones or AUDIT_BACKBONES)
    audit = audit_input(data, config, folds, verbose, probes)
    from toolkit.audit import find_issues, write_audit

    findings = find_issues(audit)
    with outputs.output_dir(out, overwrite, "audit", inputs) as folder:
        return write_audit(folder, audit, findings)


def audit_input(data: str | Path, config, folds: int = AUDIT_FOLDS, verbose: int = 1,
                backbones: Sequence[str] = AUDIT_BACKBONES):
    """Every labelled image of ``data`` (all splits) with its out-of-fold probabilities, averaged over the probe
    ``backbones``, and features (:class:`toolkit.audit.AuditInput`; the first probe's features). ``config``'s own
    backbone keeps its image size and weights; the other probes run at their own input size with ImageNet weights."""
    from toolkit.audit import AuditInput
    from toolkit.datasets import load_splits
    from toolkit.folds import assign_folds, held_out

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
    held = held_out(assign_folds(labels, k, config.seed, config.cv_repeats), k)  # the same folds for every probe
    probs, features, duplicates = [], None, None
    for n, name in enumerate(backbones):
        probe = config if name == config.backbone else dataclasses.replace(config, backbone=name, image_size=0,
                                                                             weights="imagenet")
        logger.info("audit: probe %d of %d, %s: features of %d images and their mirror images, %d fold heads",
                    n + 1, len(backbones), name, len(everything), k * config.cv_repeats)
        backbone = _backbone(probe)
        views = centre_and_mirror_features(backbone, everything, probe, verbose)
        probs.append(_out_of_fold(views, labels, held, config, len(splits.class_names)))
        if features is None:
            features = views.mean(axis=0).reshape(len(labels), -1)
            duplicates = duplicate_embedding(backbone, everything, config.batch_size)
        del backbone
    return AuditInput(everything.paths, labels, splits.class_names, np.mean(probs, axis=0), features, names,
                      duplicates, everything.decode_paths, tuple(backbones))


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


def _out_of_fold(views: np.ndarray, labels: np.ndarray, held: np.ndarray, config, classes: int) -> np.ndarray:
    """(images, classes): out-of-fold probabilities of fold heads trained on one probe's ``views``; ``held``:
    (images, heads), True where the image is in the head's own fold (:func:`toolkit.folds.held_out`)."""
    import keras

    from toolkit.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.folds import out_of_fold
    from toolkit.head import FoldHeads

    keras.utils.set_random_seed(config.seed)  # the heads' initialisation: the same audit for the same seed
    heads = FoldHeads(held.shape[1], classes, 0, config.dropout)
    # No label smoothing: it pulls every probability towards uniform, and the audit ranks images by how
    # confidently their label is contradicted (measured: precision@k of planted flips 0.67-0.88 with the
    # recipe's 0.1, 0.70-0.92 without, on clothing-small and hymenoptera, 2 seeds each).
    settings = FoldSettings(config.head_lr, 0.0, config.batch_size, config.head_epochs, config.early_stopping_patience,
                            config.seed)
    return out_of_fold(fit_fold_heads(heads, views, labels, held, settings), held)
