"""A multi-label run: ``toolkit finetune --data manifest.csv`` where the manifest has a ``labels`` column.

1. The manifest is read and verified (:mod:`toolkit.data.multilabel`); the training and validation rows are pooled,
   the test rows left for ``toolkit evaluate``. Every label must be held by at least as many images as there are
   folds (checked before any folder exists).
2. The freeze plan counts images per label: the (image, label) pairs over the labels. The head trains on the frozen
   backbone; a plan that would unfreeze stages is said, and the head alone trains (unfreezing is single-label only).
3. Views: each image whole, resized to the input size without keeping its aspect, and its mirror. A centre crop
   (what a single-label run trains and predicts on) can cut a labelled object off a corner; these views keep every
   pixel. ``toolkit predict`` uses the same views (``--tta none``: the whole image; ``flip``: and its mirror).
4. The backbone's feature maps of both views are computed once (the cache), and K x repeats x K
   multi-label Network-in-Network heads train together on them (:mod:`toolkit.train.fold_heads`): class maps
   pooled by log-sum-exp, a sigmoid per label, binary cross-entropy, folds from iterative stratification over the
   label sets. As in a single-label cross-validated run (:mod:`toolkit.train.cross_validate`), the model averages
   the first K x repeats heads and every image is scored by as many heads that never saw it (fewer when that would
   train over :data:`MAX_HEADS` heads: :func:`estimate_repeats`).
5. On those out-of-fold probabilities: one temperature per label (:mod:`toolkit.predict.label_calibration`), then
   each label's threshold, the one with the best F1 (:func:`toolkit.predict.multilabel_metrics.choose_thresholds`),
   then the estimate: macro mAP with its interval, micro mAP, per-label precision/recall/F1, exact match, Jaccard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from toolkit.config.settings import FinetuneConfig
from toolkit.core import runs
from toolkit.core.errors import UserError
from toolkit.data.multilabel import MultiLabelData, MultiLabelSplit, is_multilabel  # noqa: F401  (this module's API)
from toolkit.train.run_state import FinetuneResult, Stage

logger = logging.getLogger(__name__)

VIEWS = "whole-flip"  # toolkit.predict.inference: the whole image resized to size x size, and its mirror
VIEWS_WORDS = "each image whole (resized to the input size, aspect not kept) and its mirror: no crop cuts a labelled " \
              "object off"
CACHE_FILE = "multilabel-features.npz"
MAX_HEADS = 100  # fold heads trained at most (K folds x split repeats), unless the model alone needs more
THRESHOLD_RULE = "per label, the threshold with the best F1 on the out-of-fold probabilities (the highest among equals)"


@dataclasses.dataclass(frozen=True)
class MultiLabelRunData:
    """What a multi-label run trains on, checked: the manifest's data, the pooled labelled images, the folds."""

    data: MultiLabelData
    pooled: MultiLabelSplit
    folds: int

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.class_names


def check(config: FinetuneConfig, progress: bool) -> MultiLabelRunData:
    """The run's data and folds, refused (before any folder exists) when it cannot train."""
    from toolkit.config.choices import parse_cv
    from toolkit.data.multilabel import check_fold_counts, load_multilabel
    from toolkit.train.folds import AUTO_FOLDS

    refused = {"--fold": bool(config.fold), "--strategy multi-worker": config.strategy == "multi-worker",
               "--data-service": bool(config.data_service)}
    for flag, given in refused.items():
        if given:
            raise UserError(f"{flag}: not available for multi-label data ({config.data} has a `labels` column); a "
                            "multi-label run trains fold heads on one machine. Drop the flag.")
    mode = parse_cv(config.cv)
    if mode == "off":
        raise UserError(f"--cv off: a multi-label run chooses each label's threshold on out-of-fold probabilities, so "
                        f"it cross-validates; use --cv auto or a number of folds. Received: cv={config.cv!r}")
    data = load_multilabel(config.data, progress=progress)
    for problem in data.problems:
        if problem.severity != "info":
            logger.warning("data: %s: %s", problem.path, problem.reason)
    if len(data.class_names) < 2:
        raise UserError(f"--data {config.data}: the training rows use {len(data.class_names)} label(s) "
                        f"{list(data.class_names)}; a multi-label classifier needs at least two")
    pooled = data.labelled()
    counts = pooled.targets.sum(axis=0)
    folds = mode if isinstance(mode, int) else max(2, min(AUTO_FOLDS, int(counts.min())))
    check_fold_counts(pooled.targets, data.class_names, folds, f"--data {config.data}")
    if mode == "auto" and folds < AUTO_FOLDS:
        logger.warning("--cv auto: label %r is held by only %d images, so %d folds instead of %d",
                       data.class_names[int(counts.argmin())], int(counts.min()), folds, AUTO_FOLDS)
    always = [name for name, n in zip(data.class_names, counts) if n == len(pooled)]
    if always:
        logger.warning("data: every labelled image holds %s; such a label tells the images nothing apart", always)
    return MultiLabelRunData(data, pooled, folds)


def freeze_plan(config: FinetuneConfig, checked: MultiLabelRunData, say: bool = True):
    """The freeze rule on images per label; a plan that unfreezes stages is refused when asked for by name, and said
    (``say``: the head alone trains) when ``auto`` chose it."""
    from toolkit import backbones

    plan = label_plan(config.freeze, checked.pooled.targets, [s.name for s in backbones.get_spec(config.backbone).stages])
    if not plan.head_only:
        if config.freeze != "auto":
            raise UserError(f"--freeze {config.freeze}: a multi-label run trains its head on the frozen backbone; "
                            "unfreezing backbone stages is for single-label data. Use --freeze all or auto. "
                            f"Received: freeze={config.freeze!r}")
        if say:
            logger.warning("freeze plan: %s; a multi-label run trains the head on the frozen backbone, so no stage is "
                           "unfrozen", plan.describe())
    return plan


def label_plan(freeze: str, targets: np.ndarray, stages):
    """The freeze rule on images per label: the (image, label) pairs of ``targets`` over the labels."""
    from toolkit.train.freeze import plan_freeze

    pairs, classes = int(targets.sum()), targets.shape[1]
    return plan_freeze(freeze, pairs, classes, stages, counted=f"{pairs} labels on {len(targets)} images, {classes} "
                                                               "classes")


def resumed(run_dir: Path, config: FinetuneConfig, progress: bool) -> MultiLabelRunData:
    """The data of a multi-label run being resumed, checked against the classes it started with."""
    before = None
    if (run_dir / runs.CLASSES_FILE).is_file():
        before = runs.read_json(run_dir / runs.CLASSES_FILE, "It lists the run's classes: restore it, or start a new "
                                "run with --out.")
    checked = check(config, progress)
    if before is not None and list(checked.class_names) != before:
        raise UserError(f"The labels of {config.data} changed since {run_dir} started ({sorted(before)} then, "
                        f"{sorted(checked.class_names)} now), so its checkpoints do not fit. Start a new run with --out, "
                        "or restore the manifest as it was.")
    return checked


def train(run):
    """Train the multi-label run ``run`` (its ``splits`` a :class:`MultiLabelRunData`) and write it."""
    import keras

    from toolkit import backbones
    from toolkit.backbones.head import FoldHeads, build_classifier
    from toolkit.data.multilabel import stratified_folds
    from toolkit.train.cross_validate import fold_checkpoints
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.train.folds import held_out, out_of_fold
    from toolkit.train.stages import tensorboard_callbacks

    config, checked = run.config, run.splits
    keras.utils.set_random_seed(config.seed)
    pooled, class_names, folds = checked.pooled, checked.class_names, checked.folds
    if not (run.dir / runs.CLASSES_FILE).is_file():
        runs.write_json(run.dir / runs.CLASSES_FILE, list(class_names))
    plan = freeze_plan(config, checked)
    logger.info("freeze plan: %s", plan.describe())
    shipped = folds * config.cv_repeats
    repeats = estimate_repeats(folds, config.cv_repeats)
    table = np.stack([stratified_folds(pooled.targets, folds, config.seed + r) for r in range(repeats)], axis=1)
    held = held_out(table, folds)
    if not (run.dir / runs.FOLDS_FILE).is_file():
        _write_folds(run.dir / runs.FOLDS_FILE, pooled, table)
    logger.info("multi-label: %d images, %d labels; %d-fold cross-validation (iterative stratification) x %d repeats: "
                "the model averages %d heads, and %d heads train in all so that %d unseen heads score each image; "
                "views: %s", len(pooled), len(class_names), folds, config.cv_repeats, shipped, held.shape[1], repeats,
                VIEWS_WORDS)
    spec = backbones.get_spec(config.backbone)
    size = config.image_size or spec.input_size
    backbone = backbones.create(config.backbone, input_shape=(None, None, 3),
                                weights=None if config.weights == "none" else config.weights,
                                preprocess=config.backbone_preprocess)
    backbone.trainable = False
    start = time.perf_counter()
    views = _views_cache(run, backbone, pooled, size)
    run.timed("cv_features_s", start)

    start = time.perf_counter()
    heads = FoldHeads(held.shape[1], len(class_names), config.bottleneck, config.dropout, multi_label=True)
    store, resume_from = fold_checkpoints(run)
    # No label smoothing: the per-label temperatures fitted afterwards calibrate the probabilities.
    settings = FoldSettings(config.head_lr, 0.0, config.batch_size, config.head_epochs, config.early_stopping_patience,
                            config.seed)
    progress = run.state.stage(Stage.CV)
    weights = label_weights(pooled, config.class_weights)
    per_head = fit_fold_heads(heads, views, pooled.targets, held, settings, weights, progress, store, resume_from,
                              verbose=run.verbose, callbacks=tensorboard_callbacks(run, Stage.CV))
    run.save_state()
    run.timed("cv_heads_s", start)
    model_heads = FoldHeads(shipped, len(class_names), config.bottleneck, config.dropout, multi_label=True)
    model = build_classifier(backbone, model_heads, (None, None, 3), batchnorm_inference=not config.train_batchnorm)
    for k in range(shipped):
        model_heads.set_head_weights(k, heads.head_weights(k))
    oof = out_of_fold(per_head, held)
    return _finish(run, model, plan, oof, per_head, held, shipped, repeats, weights)


def _views_cache(run, backbone, pooled: MultiLabelSplit, size: int) -> np.ndarray:
    """(2, images, h, w, channels) float16 feature maps of every image's two views (:data:`VIEWS`), computed once and
    kept in the run folder."""
    import keras

    from toolkit.predict.inference import view_batches
    from toolkit.predict.members import compiled_forward
    from toolkit.train.feature_cache import MAX_CACHE_BYTES, read_feature_cache, save_arrays

    path = run.dir / runs.CACHE_DIR / CACHE_FILE
    need = 2 * len(pooled) * int(np.prod(backbone.compute_output_shape((1, size, size, 3))[1:])) * 2
    if need > MAX_CACHE_BYTES:
        raise UserError(f"--data {run.config.data}: the feature maps of {len(pooled)} images x 2 views would need "
                        f"{need / 2**30:.1f} GiB (at most {MAX_CACHE_BYTES / 2**30:.0f} GiB); use a smaller --image-size "
                        "or fewer images")
    cached = read_feature_cache(path, ("views",))
    if cached is not None and cached[0].shape[:2] == (2, len(pooled)):
        logger.info("multi-label: feature cache loaded from %s", path)
        return cached[0]
    forward = compiled_forward(backbone, size, False, str(run.config.backbone))
    bar = keras.utils.Progbar(len(pooled), unit_name="image") if run.verbose else None
    batches = [b[0].astype(np.float16) for b in view_batches(forward, pooled.decode_paths, pooled.is_jpeg, size, VIEWS,
                                                             1.0, run.config.batch_size, bar.add if bar else None)]
    views = np.moveaxis(np.concatenate(batches), 1, 0)
    save_arrays(path, views=views)
    return views


def _write_folds(path: Path, pooled: MultiLabelSplit, table: np.ndarray) -> None:
    import pandas as pd

    from toolkit.predict.multilabel_report import csv_text, joined

    frame = pd.DataFrame({"path": pooled.paths, "labels": [joined(t, pooled.class_names) for t in pooled.targets]}
                         | {f"fold_{r + 1}": table[:, r] for r in range(table.shape[1])})
    runs.write_text(path, csv_text(frame))


def label_weights(pooled: MultiLabelSplit, mode: str) -> np.ndarray | None:
    """Each label's weight on its positive images: inverse frequency over the labels (mean count / the label's count),
    as a single-label run weighs its classes; ``auto`` turns them on past 3:1 between the most and least held label."""
    from toolkit.train.fit_data import class_weights

    counts = pooled.counts()
    weights = class_weights(list(counts.values()), mode)
    if weights is None:
        return None
    logger.info("multi-label: label weights on (images per label %d to %d): %s", min(counts.values()),
                max(counts.values()), ", ".join(f"{n} {weights[i]:.2f}" for i, n in enumerate(counts)))
    return np.asarray([weights[i] for i in range(len(counts))], np.float32)


def estimate_repeats(folds: int, repeats: int) -> int:
    """How many times the K-fold split is drawn: K x repeats, so that each image is scored by as many unseen heads as
    the model averages, unless that trains more than :data:`MAX_HEADS` heads (they train on feature maps, not pooled
    features); then fewer, at least the model's own ``repeats``."""
    return min(folds * repeats, max(repeats, MAX_HEADS // folds))


def _finish(run, model, plan, oof: np.ndarray, per_head: np.ndarray, held: np.ndarray, shipped: int, repeats: int,
            weights: np.ndarray | None):
    """Calibrate per label, choose the thresholds, measure, write the run."""
    from toolkit.predict.label_calibration import apply_label_temperatures, calibrate_labels
    from toolkit.predict.multilabel_metrics import choose_thresholds, evaluate_multilabel
    from toolkit.train.multilabel_outputs import write_outputs

    config, checked = run.config, run.splits
    start = time.perf_counter()
    targets, names = checked.pooled.targets, checked.class_names
    calibration = calibrate_labels(oof, targets, names)
    calibrated = apply_label_temperatures(oof, np.asarray(list(calibration["temperatures"].values())))
    thresholds = choose_thresholds(targets, calibrated)
    measured = evaluate_multilabel(targets, calibrated, thresholds, names)
    fold_ap = _fold_macro_ap(per_head[:, :shipped], held[:, :shipped], targets)
    run.timed("evaluate_s", start)
    metrics = {
        "multi_label": True,
        "class_names": list(names),
        "estimate": measured.as_dict(),
        "estimates": f"the model that is shipped (the average of its {shipped} heads) on new images like these: each "
                     f"image scored by the average of {repeats} fold heads that never saw it",
        "folds": checked.folds, "repeats": config.cv_repeats, "heads": shipped, "estimate_heads": repeats,
        "fold_macro_ap": fold_ap,
        "views": VIEWS_WORDS,
        "thresholds_rule": THRESHOLD_RULE,
        "label_weights": None if weights is None else dict(zip(names, map(float, weights))),
        "calibration": calibration,
        "freeze_plan": plan.describe(),
        "kept_stage": Stage.CV.value,
        "timings": dict(run.state.timings),
    }
    if run.scale.is_chief:
        runs.write_json(run.dir / runs.CALIBRATION_FILE, calibration)
        runs.write_json(run.dir / runs.THRESHOLDS_FILE, {"rule": THRESHOLD_RULE, "thresholds": {
            name: float(t) for name, t in zip(names, thresholds)}})
        write_outputs(run, model, plan, metrics, measured, calibrated, thresholds)
        run.state.finished = True
        run.save_state()
        logger.info("finetune: %s; run written to %s", measured.describe(), run.final_dir)
    if config.min_accuracy is not None:
        logger.warning("--min-accuracy: a multi-label run has no accuracy; its gate is not applied (macro mAP %.4f)",
                       measured.macro_ap)
    return FinetuneResult(run.run_dir, metrics, plan)


def _fold_macro_ap(per_head: np.ndarray, held: np.ndarray, targets: np.ndarray) -> list[float]:
    """Each of the model's heads alone on its own held-out fold: macro average precision over the labels present."""
    from sklearn.metrics import average_precision_score

    out = []
    for h in range(per_head.shape[1]):
        t, p = targets[held[:, h]], per_head[held[:, h], h]
        present = t.any(axis=0)
        out.append(float(average_precision_score(t[:, present], p[:, present], average="macro")))
    return out
