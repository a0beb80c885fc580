"""Training the K fold heads together (``--cv K``) on cached backbone features.

One model holds the K heads (:class:`toolkit.backbones.head.FoldHeads`). Every cached view of every labelled image is
one training example for all heads at once; head k's loss on it is masked to 0 when the image is in fold k
(:func:`toolkit.train.folds.training_mask`), so head k never sees its own fold. After each epoch every head is
scored on the centre crops of its own fold, and keeps its best epoch (early stopping per head); training
ends when every head has waited ``patience`` epochs. The heads' parameters are disjoint and Adam scales
each parameter's step by its own gradient statistics, so training them in one model is training K
models, for the cost of one pass over the features.

Multi-label heads (``FoldHeads(multi_label=True)``) train the same way on an (images, classes) 0/1 target matrix
instead of class indices: binary cross-entropy per class (with class weights, each class's positive term weighted:
:class:`PositiveWeightedBinaryCrossentropy`), early stopping on each head's held-out (unweighted) binary
cross-entropy, and accuracy counted per (image, class) decision at 0.5.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math

import keras
import numpy as np

from toolkit.backbones.head import FoldHeads
from toolkit.core import runs
from toolkit.predict.calibration import nll
from toolkit.predict.label_calibration import binary_nll
from toolkit.train.folds import out_of_fold, training_mask
from toolkit.train.run_state import Stage, StageState
from toolkit.train.stages import load_checkpoint

logger = logging.getLogger(__name__)

# Training steps per call into TensorFlow: the heads are tiny, so per-step Python overhead would dominate.
STEPS_PER_EXECUTION = 16


@dataclasses.dataclass
class FoldSettings:
    """What the heads train with (stage 1's settings of the run)."""

    lr: float = 1e-3
    label_smoothing: float = 0.1
    batch_size: int = 32
    epochs: int = 30
    patience: int = 5
    seed: int = 0


def _as_targets(heads: FoldHeads, labels: np.ndarray) -> np.ndarray:
    """(images, C) float32 targets: one-hot class indices, or the multi-label 0/1 matrix as it is."""
    if heads.multi_label:
        if labels.ndim != 2 or labels.shape[1] != heads.num_classes:
            raise ValueError(f"multi-label heads need an (images, {heads.num_classes}) target matrix. Received: "
                             f"labels of shape {labels.shape}")
        return labels.astype(np.float32)
    return np.eye(heads.num_classes, dtype=np.float32)[labels]


def _held_loss(heads: FoldHeads, probs: np.ndarray, labels: np.ndarray) -> float:
    """The loss early stopping watches: cross-entropy of the true class, or mean binary cross-entropy."""
    return binary_nll(probs, labels) if heads.multi_label else nll(probs, labels)


def _accuracy(heads: FoldHeads, probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of right answers: the top class, or every (image, class) decision at 0.5."""
    if heads.multi_label:
        return float(((probs >= 0.5) == (labels > 0)).mean())
    return float((probs.argmax(1) == labels).mean())


class PositiveWeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy per class, averaged over the classes, with class c's positive term weighted by
    ``pos_weights[c]`` (None: all 1): a rare label's images count as much as a common label's. ``y`` is
    (batch, heads, classes); the result (batch, heads), which the training mask then weighs."""

    def __init__(self, pos_weights=None, label_smoothing: float = 0.0, name: str = "weighted_bce"):
        super().__init__(name=name)
        self.pos_weights = None if pos_weights is None else np.asarray(pos_weights, np.float32)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        from keras import ops

        y_true = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
        positive = y_true * ops.log(p)
        if self.pos_weights is not None:
            positive = positive * self.pos_weights
        return -ops.mean(positive + (1.0 - y_true) * ops.log(1.0 - p), axis=-1)


def _start(progress: StageState, heads: int) -> None:
    if not progress.fold_best_loss:
        progress.fold_best_loss, progress.fold_best_epoch, progress.fold_wait = [math.inf] * heads, [0] * heads, [0] * heads


def _stopped(progress: StageState, patience: int) -> bool:
    return bool(progress.fold_wait) and min(progress.fold_wait) >= patience


class FoldCheckpoint(keras.callbacks.Callback):
    """After every epoch: score each head on its own fold, keep its best weights, write the checkpoint."""

    def __init__(self, heads: FoldHeads, centre: np.ndarray, labels: np.ndarray, held: np.ndarray,
                 settings: FoldSettings, progress: StageState, best: dict[int, list[np.ndarray]], store=None):
        super().__init__()
        self.heads, self.centre, self.labels, self.held = heads, centre, labels, held
        self.settings, self.progress, self.best, self.store = settings, progress, best, store

    def on_epoch_end(self, epoch, logs=None):
        p, k_heads = self.progress, self.heads.count
        per_head = per_head_probabilities(self.model, self.centre, self.settings.batch_size)
        oof = out_of_fold(per_head, self.held)
        held = self.held.any(axis=1)
        losses = [_held_loss(self.heads, per_head[self.held[:, k], k], self.labels[self.held[:, k]])
                  for k in range(k_heads)]
        for k, loss in enumerate(losses):
            if loss < p.fold_best_loss[k]:
                p.fold_best_loss[k], p.fold_best_epoch[k], p.fold_wait[k] = loss, epoch + 1, 0
                self.best[k] = self.heads.head_weights(k)
            else:
                p.fold_wait[k] += 1
        p.epochs_done = epoch + 1
        p.best_loss, p.best_epoch, p.wait = float(np.mean(p.fold_best_loss)), max(p.fold_best_epoch), min(p.fold_wait)
        trained = ~self.held  # each head's own training images, on their centre crops
        fit = [_accuracy(self.heads, per_head[trained[:, k], k], self.labels[trained[:, k]]) for k in range(k_heads)]
        p.history.append({"stage": Stage.CV.value, "epoch": epoch + 1, "loss": float((logs or {}).get("loss", math.nan)),
                          "accuracy": float(np.mean(fit)), "val_loss": float(np.mean(losses)),
                          "val_accuracy": _accuracy(self.heads, oof[held], self.labels[held])})
        if self.store is not None:
            self.store(self.model, p, self.best)
        if _stopped(p, self.settings.patience):
            logger.info("cross-validation: every head stopped early after epoch %d (best epochs %s)", epoch + 1,
                        p.fold_best_epoch)
            self.model.stop_training = True


def per_head_probabilities(model, features: np.ndarray, batch_size: int) -> np.ndarray:
    """(images, K, C) from the K-head model on features."""
    out = [np.asarray(model(features[i:i + 4 * batch_size], training=False), dtype=np.float64)
           for i in range(0, len(features), 4 * batch_size)]
    return np.concatenate(out)


def restore_best(heads: FoldHeads, best: dict[int, list[np.ndarray]]) -> None:
    for k, weights in best.items():
        heads.set_head_weights(k, weights)


def fit_fold_heads(heads: FoldHeads, views: np.ndarray, labels: np.ndarray, held: np.ndarray,
                   settings: FoldSettings, class_weights: np.ndarray | None = None, progress: StageState | None = None,
                   store=None, resume_from=None, verbose: int = 0, callbacks: tuple = ()) -> np.ndarray:
    """Train ``heads`` on ``views`` (V, images, ...: view 0 the centre crop; ``labels`` the class of each image, or
    its 0/1 row of classes for multi-label heads), head h never on the images
    ``held[:, h]`` (:func:`toolkit.train.folds.held_out`) and early-stopped on them; return each head's centre-crop
    probabilities at its own best epoch, (images, heads, C), of which ``out_of_fold`` keeps the unseen.

    ``progress`` and ``resume_from(model) -> best`` continue an interrupted training; ``store(model, progress,
    best)`` is called after every epoch (the run's checkpoint).
    """
    import tensorflow as tf

    labels, held = np.asarray(labels), np.asarray(held, dtype=bool)
    n_views, n = views.shape[:2]
    k_heads = heads.count
    progress = progress if progress is not None else StageState()
    _start(progress, k_heads)
    model = heads.on_features(views.shape[2:])
    if heads.multi_label:
        loss = PositiveWeightedBinaryCrossentropy(class_weights, settings.label_smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
    model.compile(optimizer=keras.optimizers.Adam(settings.lr), loss=loss, steps_per_execution=STEPS_PER_EXECUTION)
    best: dict[int, list[np.ndarray]] = {}
    steps = math.ceil(n * n_views / settings.batch_size)
    if progress.epochs_done and resume_from is not None:
        logger.info("cross-validation: resuming after epoch %d", progress.epochs_done)
        model.optimizer.build(model.trainable_variables)
        best = resume_from(model)
        model.optimizer.iterations.assign(progress.epochs_done * steps)
    if not progress.done and progress.epochs_done < settings.epochs and not _stopped(progress, settings.patience):
        mask = training_mask(held)
        if class_weights is not None and not heads.multi_label:  # multi-label: the loss weighs each label's positives
            mask = mask * np.asarray(class_weights, np.float32)[labels][:, None]
        targets = _as_targets(heads, labels)
        flat = views.reshape(n_views * n, *views.shape[2:])
        image = np.tile(np.arange(n), n_views)
        ds = (tf.data.Dataset.from_tensor_slices((flat, image))
              .shuffle(len(flat), seed=settings.seed, reshuffle_each_iteration=True)
              .batch(settings.batch_size)
              .map(lambda x, i: (x, tf.tile(tf.gather(targets, i)[:, None, :], [1, k_heads, 1]), tf.gather(mask, i)))
              .prefetch(2))
        callback = FoldCheckpoint(heads, views[0], labels, held, settings, progress, best, store)
        model.fit(ds, epochs=settings.epochs, initial_epoch=progress.epochs_done, callbacks=[callback, *callbacks],
                  verbose=verbose, shuffle=False)
    restore_best(heads, best)
    progress.done = True
    return per_head_probabilities(model, views[0], settings.batch_size)


# ----------------------------------------------------------------------------- checkpoint files


def save_best(path, best: dict[int, list[np.ndarray]]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"head{k}_{i}": w for k, weights in best.items() for i, w in enumerate(weights)})
    runs.write_bytes(path, buffer.getvalue())


def load_best(path) -> dict[int, list[np.ndarray]]:
    """Every head's best weights from :data:`toolkit.core.runs.CV_BEST_FILE` ({} before any epoch finished); damaged: a user error."""
    import zipfile

    best: dict[int, list[np.ndarray]] = {}

    def read(p) -> None:
        try:
            with np.load(p) as saved:
                keys = sorted(saved.files, key=lambda key: tuple(int(part) for part in key[4:].split("_")))
                for key in keys:
                    best.setdefault(int(key[4:].split("_")[0]), []).append(saved[key])
        except (EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(str(exc)) from None

    if path.is_file():
        load_checkpoint(read, path)
    return best
