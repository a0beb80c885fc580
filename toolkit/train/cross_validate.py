"""A cross-validated run (``--cv K``): every labelled image trains, and every image is scored by heads that
never saw it, averaged as the model averages its heads.

1. The labelled images (train and validation pooled) are split into K stratified, seeded folds, R times
   (``cv_repeats``) with other shuffles: the model's K x R heads, head (r, k) masked off fold k of repeat r.
2. For the estimate the split is repeated K x R times in all (the first R are the model's): each image is then held
   out by K x R heads, one per repeat, and scored by their average: an ensemble of as many heads as the model's,
   each trained on (K - 1) / K of the images, none on that image. That is what the model is for a new image, so
   the out-of-fold accuracy estimates the model that is shipped (:data:`ESTIMATE_RULE`).
3. The frozen backbone's outputs for every image and view are computed once (:func:`all_views_cache`), and all the
   heads train together on them (:mod:`toolkit.train.fold_heads`).
4. The run's model is one network, the backbone then its K x R heads averaged
   (:class:`toolkit.backbones.head.FoldHeads`); the out-of-fold probabilities are the run's accuracy estimate,
   calibration set, and audit input.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from toolkit.core import runs
from toolkit.train.run_state import Run, Stage

logger = logging.getLogger(__name__)

ESTIMATE_RULE = ("each image scored by the average of as many fold heads that never saw it as the model averages "
                 "(K x repeats, one per further repeat of the K-fold split)")


@dataclasses.dataclass
class OutOfFold:
    """Every labelled image's probabilities from the head that did not train on it, and its fold."""

    probs: np.ndarray  # (images, classes)
    labels: np.ndarray
    held: np.ndarray  # (images, heads): the images each head never trained on
    folds: int
    best_epochs: list[int]
    per_head: np.ndarray | None = None  # (images, heads, classes)
    features: np.ndarray | None = None  # (images, channels): pooled centre-crop features, for the audit
    paths: tuple[str, ...] = ()
    shipped: int = 0  # the model's heads: the first ``shipped`` of ``held``'s (0: all of them)

    def summary(self, measured: dict[str, Any]) -> dict[str, Any]:
        """metrics.json's ``cv`` block, from :func:`toolkit.predict.evaluate.classification_metrics` of ``probs``."""
        heads = self.shipped or self.held.shape[1]
        per_fold = [float((self.per_head[self.held[:, h], h].argmax(1) == self.labels[self.held[:, h]]).mean())
                    for h in range(heads)]
        scored_by = int(np.median(self.held.sum(axis=1)))
        return {
            "folds": self.folds,
            "repeats": heads // self.folds,
            "heads": heads,
            "estimate_heads": scored_by,  # unseen heads averaged per image in the estimate
            "n_images": int(len(self.labels)),
            "accuracy": measured["accuracy"],
            "accuracy_ci95": measured["accuracy_ci95"],
            "estimates": f"the accuracy of the model that is shipped (the average of its {heads} heads) on new images "
                         f"like these: {ESTIMATE_RULE}" if scored_by == heads else
                         f"the accuracy of one member on new images like these (each image scored by the member that "
                         f"validated on it)",
            "interval": "Wilson score, 95 %, over the out-of-fold predictions of all images",
            "log_loss": measured["nll"],
            "fold_accuracy": per_fold,  # each head alone on its own held-out fold
            "fold_accuracy_sd": float(np.std(per_fold, ddof=1)),
            "fold_best_epoch": self.best_epochs,
            "per_class": {name: {"precision": v["precision"], "recall": v["recall"], "support": v["support"]}
                          for name, v in measured["per_class"].items()},
            "confusion_matrix": measured["confusion_matrix"],
        }


def cross_validate(run: Run, backbone, data, folds: int, head_lr: float):
    """Train the K fold heads of ``run`` on its cached features; (the K-head classifier, :class:`OutOfFold`)."""
    from toolkit.backbones.head import FoldHeads, build_classifier
    from toolkit.train.feature_cache import all_views_cache
    from toolkit.train.fit_data import class_weights
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads
    from toolkit.train.folds import assign_folds, held_out, out_of_fold
    from toolkit.train.stages import tensorboard_callbacks

    config, splits = run.config, run.splits
    pooled = splits.train + splits.val
    labels = np.asarray(pooled.labels)
    shipped = folds * config.cv_repeats  # the model's heads; the estimate's repeats: as many, the first R shared
    table = assign_folds(labels, folds, config.seed, shipped).reshape(len(labels), -1)
    held = held_out(table, folds)
    if not (run.dir / runs.FOLDS_FILE).is_file():
        import pandas as pd

        frame = pd.DataFrame({"path": pooled.paths, "label": [pooled.class_names[y] for y in labels]}
                             | {f"fold_{r + 1}": table[:, r] for r in range(table.shape[1])})
        runs.write_text(run.dir / runs.FOLDS_FILE, frame.to_csv(index=False))
    holdout_views = len(splits.train) * config.cache_views + len(splits.val)
    logger.info("cross-validation: %d folds x %d repeats over %d images (the model: %d heads; the estimate: %d more "
                "repeats, so that %d unseen heads score each image); the backbone runs over every image's views, about "
                "%.1fx the images of a holdout run's cache, then %d heads train together on them", folds,
                config.cv_repeats, len(pooled), shipped, table.shape[1] - config.cv_repeats, shipped,
                len(pooled) * config.cache_views / max(holdout_views, 1), held.shape[1])
    heads = FoldHeads(held.shape[1], len(splits.class_names), config.bottleneck, config.dropout)
    start = time.perf_counter()
    views = all_views_cache(run, backbone, heads, data, pooled)
    run.timed("cv_features_s", start)

    start = time.perf_counter()
    weights = class_weights(list(pooled.counts().values()), config.class_weights)
    weights = None if weights is None else np.asarray([weights[i] for i in range(len(splits.class_names))])
    store, resume_from = fold_checkpoints(run)
    settings = FoldSettings(head_lr, config.label_smoothing, config.batch_size, config.head_epochs,
                            config.early_stopping_patience, config.seed)
    progress = run.state.stage(Stage.CV)
    per_head = fit_fold_heads(heads, views, labels, held, settings, weights, progress, store, resume_from,
                              verbose=run.verbose, callbacks=tensorboard_callbacks(run, Stage.CV))
    run.save_state()
    run.timed("cv_heads_s", start)
    model_heads = FoldHeads(shipped, len(splits.class_names), config.bottleneck, config.dropout)
    model = build_classifier(backbone, model_heads, (None, None, 3), batchnorm_inference=not config.train_batchnorm)
    for k in range(shipped):  # the first R repeats' heads are the model's
        model_heads.set_head_weights(k, heads.head_weights(k))
    pooled_features = views[0].reshape(len(pooled), -1, views.shape[-1]).mean(axis=1).astype(np.float32)
    evaluated = OutOfFold(out_of_fold(per_head, held), labels, held, folds, list(progress.fold_best_epoch[:shipped]),
                          per_head, pooled_features, pooled.paths, shipped)
    _audit(run, evaluated, backbone, pooled)
    return model, evaluated


def fold_checkpoints(run: Run):
    """(store, resume_from) for :func:`toolkit.train.fold_heads.fit_fold_heads`: after every epoch the heads' last
    weights, each head's best weights and the run state are written; an interrupted run continues from them."""
    from toolkit.train.fold_heads import load_best, save_best
    from toolkit.train.stages import load_checkpoint

    best_path, last_path = run.dir / runs.CV_BEST_FILE, Stage.CV.last_weights(run.dir)

    def store(model, progress, best) -> None:
        with runs.atomic_path(last_path) as tmp:
            model.save_weights(tmp)
        save_best(best_path, best)
        run.save_state()

    def resume_from(model) -> dict:  # as stages.fit_stage resumes: the optimizer is built, so its moments load too
        load_checkpoint(model.load_weights, last_path)
        return load_best(best_path)

    return store, resume_from


def _audit(run: Run, evaluated: OutOfFold, backbone, pooled) -> None:
    """The data audit of a cross-validated run, into its folder (audit.csv and the rest; see toolkit.data.audit)."""
    from toolkit.data.audit import AuditInput, find_issues, write_audit
    from toolkit.train.probe import duplicate_embedding

    start = time.perf_counter()
    splits = run.splits
    names = ["train"] * len(splits.train) + ["val"] * len(splits.val)
    audit = AuditInput(evaluated.paths, evaluated.labels, splits.class_names, evaluated.probs, evaluated.features, names,
                       duplicate_embedding(backbone, pooled, run.config.batch_size), pooled.decode_paths,
                       (run.config.backbone,))
    write_audit(run.dir, audit, find_issues(audit), run.final_dir)
    run.timed("audit_s", start)
