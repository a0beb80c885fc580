"""``toolkit audit --data DIR [--model RUN] --out DIR``: audit a dataset without training a classifier first.

Every labelled image (train, val and test splits alike) goes once through each probe backbone, frozen: by
default the :data:`AUDIT_BACKBONES`, or ``--backbones``, or ``--model RUN``'s backbone, image size and weights
alone. Its pooled features of the centre crop and of its mirror image are averaged (so a mirrored copy has the
same features); on each probe's features K fold heads (:mod:`toolkit.train.fold_heads`) give every image out-of-fold
probabilities, and the probes' probabilities are averaged; :mod:`toolkit.data.audit` does the rest.

Why several probes: a label that the features of differently trained networks all contradict is more likely
wrong than one that a single network's features do. With 10 % of the labels flipped at random in clothing-small
at 30 per class (5 seeds, the filter of :func:`toolkit.data.audit.find_issues`), the
precision of the top k rows (k = the flips) was 0.74 with mobilenet_v2 alone and 0.81 with either
EfficientNet-Lite alone, and every ensemble of two to four of the offline backbones scored 0.81-0.85; these three
scored 0.84 ± 0.04 (docs/benchmarks/audit.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.core import outputs, runs
from toolkit.core.errors import UserError
from toolkit.core.processes import refuse_in_a_starting_worker

logger = logging.getLogger(__name__)

AUDIT_FOLDS = 5
# The probes of an audit without --model: the default backbone, and the smallest and largest EfficientNet-Lite.
AUDIT_BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2")


def audit_data(data: str | Path, out: str | Path, model: str | Path | None = None, overwrite: bool = False,
               folds: int = AUDIT_FOLDS, verbose: int = 1, backbones: Sequence[str] | None = None) -> dict:
    """Audit ``data`` into the folder ``out``; returns the summary (also ``out/audit.json``). ``backbones``: the
    probes (default :data:`AUDIT_BACKBONES`; with ``model``, that run's backbone alone)."""
    from toolkit.backbones import get_spec
    from toolkit.config.recipes import load_config
    from toolkit.config.settings import FinetuneConfig

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
    from toolkit.data.audit import find_issues, write_audit

    findings = find_issues(audit)
    with outputs.output_dir(out, overwrite, "audit", inputs) as folder:
        return write_audit(folder, audit, findings, Path(out), page=True)


def audit_input(data: str | Path, config, folds: int = AUDIT_FOLDS, verbose: int = 1,
                backbones: Sequence[str] = AUDIT_BACKBONES):
    """Every labelled image of ``data`` (all splits) with its out-of-fold probabilities, averaged over the probe
    ``backbones``, and features (:class:`toolkit.data.audit.AuditInput`; the first probe's features). ``config``'s own
    backbone keeps its image size and weights; the other probes run at their own input size with ImageNet weights."""
    from toolkit.data.audit import AuditInput
    from toolkit.data.datasets import load_splits
    from toolkit.train.folds import assign_folds, held_out
    from toolkit.train.probe import centre_and_mirror_features, duplicate_embedding, out_of_fold_probs, probe_backbone

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
        backbone = probe_backbone(probe)
        views = centre_and_mirror_features(backbone, everything, probe, verbose)
        probs.append(out_of_fold_probs(views, labels, held, config, len(splits.class_names)))
        if features is None:
            features = views.mean(axis=0).reshape(len(labels), -1)
            duplicates = duplicate_embedding(backbone, everything, config.batch_size)
        del backbone
    return AuditInput(everything.paths, labels, splits.class_names, np.mean(probs, axis=0), features, names,
                      duplicates, everything.decode_paths, tuple(backbones))


def audit(data: str | Path, out: str | Path | None = None, *, model: str | Path | None = None,
          backbones: Sequence[str] | None = None, folds: int = AUDIT_FOLDS, overwrite: bool = False,
          verbose: int = 0) -> dict:
    """Audit the labelled images of ``data`` for label issues, near-duplicates and outliers, without training a
    classifier first; the findings go into the folder ``out`` (default ``runs/<date>-<time>-audit``): ``audit.csv``
    (most suspicious first), ``audit.png``, ``audit-manifest.csv`` and ``audit.json``. Returns ``audit.json``'s
    summary. ``model``: use that run's backbone alone; ``backbones``: the probes (default :data:`AUDIT_BACKBONES`)."""
    refuse_in_a_starting_worker("toolkit.audit")
    from toolkit.core.quiet import import_tensorflow

    import_tensorflow()
    target = Path(out) if out is not None else runs.default_run_dir("audit")
    return audit_data(data, target, model, overwrite, folds, verbose=verbose, backbones=backbones)
