"""Training one stage: the layer-wise optimizer, the warm-up + cosine schedule, per-epoch checkpoints
with early stopping, resuming a partial stage, and keeping the better of the two stages."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from toolkit.core import runs
from toolkit.core.errors import UserError
from toolkit.train.freeze import FreezePlan
from toolkit.train.run_state import Run, Stage

logger = logging.getLogger(__name__)

STAGE1_WEIGHTS = "stage1.weights.h5"  # the whole classifier after stage 1, while stage 2 runs

def stage_lr_multipliers(stage_of_layer: list[int], plan: FreezePlan, decay: float) -> list[float]:
    """Learning-rate multiplier of each backbone layer: 1 for the top stage, decay per stage below."""
    top = plan.total - 1
    return [decay ** (top - s) if s >= plan.first_trainable_stage else 0.0 for s in stage_of_layer]


def stage_of_layers(n_layers: int, stage_ends: list[int]) -> list[int]:
    out, stage = [], 0
    for index in range(n_layers):
        while stage < len(stage_ends) - 1 and index > stage_ends[stage]:
            stage += 1
        out.append(stage)
    return out


class LayerwiseAdam(keras.optimizers.Adam):
    """Adam whose learning rate is scaled per variable (discriminative fine-tuning).

    Keras optimizers apply one schedule to every variable; ``update_step`` is called per
    variable with the current rate, so scaling it there gives each stage its own multiple of
    the shared warm-up + cosine schedule.
    """

    def __init__(self, multipliers: dict[str, float], **kw):
        super().__init__(**kw)
        self.multipliers = multipliers  # by variable path
        self._by_index: list[float] = []

    def build(self, var_list):
        # Under a tf.distribute strategy update_step receives each replica's tf.Variable, which has no
        # Keras path; the optimizer's own variable index (what Adam uses for its moments) works for both.
        super().build(var_list)
        self._by_index = [self.multipliers.get(v.path, 1.0) for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        m = self._by_index[self._get_variable_index(variable)]
        return super().update_step(gradient, variable, learning_rate * m if m != 1.0 else learning_rate)


def finetune_optimizer(multipliers: dict[str, float], peak_lr: float, epochs: int, warmup_epochs: int,
                       steps: int) -> LayerwiseAdam:
    """Stage 2's optimizer: per-stage multiples of a linear warm-up then cosine decay."""
    warmup = min(warmup_epochs, epochs) * steps
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(epochs * steps - warmup, 1), warmup_target=peak_lr,
                                                      warmup_steps=warmup)
    return LayerwiseAdam(multipliers=multipliers, learning_rate=schedule)


class TrainingCheckpoint(keras.callbacks.Callback):
    """After every epoch: history, early stopping, best and last weights, run state -- atomically."""

    def __init__(self, run: Run, stage: Stage):
        super().__init__()
        self.run, self.stage = run, stage

    def on_epoch_end(self, epoch, logs=None):
        s, folder = self.run.state.stage(self.stage), self.run.dir
        logs = {k: float(v) for k, v in (logs or {}).items()}
        s.history.append({"stage": self.stage.value, "epoch": epoch + 1, **logs})
        val_loss = logs.get("val_loss", math.inf)
        if val_loss < s.best_loss:
            s.best_loss, s.best_epoch, s.wait = val_loss, epoch + 1, 0
            with runs.atomic_path(self.stage.best_weights(folder)) as tmp:
                self.model.save_weights(tmp)
        else:
            s.wait += 1
        with runs.atomic_path(self.stage.last_weights(folder)) as tmp:
            self.model.save_weights(tmp)
        s.epochs_done = epoch + 1
        self.run.save_state()
        if s.wait >= self.run.config.early_stopping_patience:
            logger.info("%s: early stop after epoch %d (best epoch %d)", self.stage.value, epoch + 1, s.best_epoch)
            self.model.stop_training = True


def tensorboard_callbacks(run: Run, stage: Stage) -> list:
    """Keras' TensorBoard callback, writing under RUN/tensorboard/<stage> (needs the tensorboard package)."""
    if importlib.util.find_spec("tensorboard") is None:  # TensorFlow >= 2.21 writes summaries only with it
        log = logger.debug if stage == Stage.FINETUNE else logger.info  # said once per run (stage 2 follows stage 1)
        log("no %s/ in the run folder: TensorBoard logs need the tensorboard package (pip install "
            "\"toolkit-finetune[tensorboard]\")", runs.TENSORBOARD_DIR)
        return []
    return [keras.callbacks.TensorBoard(str(run.dir / runs.TENSORBOARD_DIR / stage.value), write_graph=False,
                                        profile_batch=0)]


def fit_stage(run: Run, stage: Stage, model, train: tuple[Any, int], val: tuple[Any, int | None], epochs: int) -> None:
    """model.fit with per-epoch checkpoints and early stopping; resumes a partial stage.

    ``train`` and ``val`` are (dataset, steps per epoch). The steps are passed to ``fit``
    under a strategy, whose training datasets repeat so that every worker runs the same
    number of steps.
    """
    (train_ds, steps), (val_ds, val_steps) = train, val
    s = run.state.stage(stage)
    if s.done:
        load_model_weights(model, stage.best_weights(run.dir))
        return
    if s.epochs_done:
        logger.info("%s: resuming after epoch %d", stage.value, s.epochs_done)
        model.optimizer.build(model.trainable_variables)  # built first, so its moments load too
        load_checkpoint(model.load_weights, stage.last_weights(run.dir))
        model.optimizer.iterations.assign(s.epochs_done * steps)  # the schedule continues where it was
    if s.epochs_done < epochs and s.wait < run.config.early_stopping_patience:
        callbacks = [TrainingCheckpoint(run, stage)] + (tensorboard_callbacks(run, stage) if run.scale.is_chief else [])
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=s.epochs_done,
                  steps_per_epoch=steps if run.scale.distributed else None, validation_steps=val_steps,
                  callbacks=callbacks, verbose=run.verbose if run.scale.is_chief else 0,
                  shuffle=False)  # tf.data shuffles, with the run's seed
    if stage.best_weights(run.dir).is_file():
        load_checkpoint(model.load_weights, stage.best_weights(run.dir))
    s.done = True
    run.save_state()


def keep_better_stage(run: Run, model, stage1_weights: Path) -> Stage:
    """Early stopping across both stages: stage 2's best epoch is kept only if it beat stage 1's.

    Each stage restores its own best epoch; when fine-tuning never lowered the validation loss
    below what the head alone reached, the stage-1 classifier is the best epoch of the run.
    """
    head_loss, tuned_loss = run.state.stage(Stage.HEAD).best_loss, run.state.stage(Stage.FINETUNE).best_loss
    if tuned_loss < head_loss:
        return Stage.FINETUNE
    logger.info("stage 2 did not lower the validation loss (best %.4f vs %.4f after stage 1): keeping the stage-1 "
                "classifier", tuned_loss, head_loss)
    load_model_weights(model, stage1_weights)
    return Stage.HEAD


def load_model_weights(model, path: Path) -> None:
    """Load a checkpoint's model weights where the optimizer state does not matter (a finished stage)."""
    with warnings.catch_warnings():  # optimizer built or not, saved with or without one: Keras warns, harmlessly
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        load_checkpoint(model.load_weights, path)


def load_checkpoint(load, path: Path) -> None:
    """``load(path)`` (a Keras weights loader); a missing or damaged checkpoint is a user error naming it."""
    try:
        load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}): the "
                        "checkpoint is missing, truncated or corrupt, so the run cannot resume from it. Start a "
                        "new run with --out.") from None


@contextlib.contextmanager
def precision(mixed: bool):
    """float16 compute (``mixed_float16``) for the models built inside, when asked for.

    Why a context: Keras' dtype policy is process-wide; without restoring it, every model
    built later in the same process (the next ensemble member trained without the flag, a
    test, a notebook) would silently compute in float16 too.
    """
    import keras

    if not mixed:
        yield
        return
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def trainable_count(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def train_head(run: Run, model, head, inner, data, cache: tuple[bool, str], loss, head_lr: float) -> None:
    """The head on the frozen backbone: on cached features when they fit (``cache``: whether, and why), else on
    images."""
    from toolkit.train.feature_cache import feature_cache

    start = time.perf_counter()
    cached, reason = cache
    logger.info("stage 1 (head): %s", reason)
    if cached:
        head_model, train_feats, val_feats = feature_cache(run, inner, head, data)
        head_model.compile(optimizer=keras.optimizers.Adam(head_lr), loss=loss, weighted_metrics=["accuracy"])
        fit_stage(run, Stage.HEAD, head_model, train_feats, val_feats, run.config.head_epochs)
    else:
        model.compile(optimizer=keras.optimizers.Adam(head_lr), loss=loss, weighted_metrics=["accuracy"])
        fit_stage(run, Stage.HEAD, model, data.train_images(seed_offset=0), data.val_images(), run.config.head_epochs)
    run.timed("stage1_head_s", start)


def train_unfrozen(run: Run, model, inner, spec, plan, data, loss, finetune_lr: float, total_params: int) -> Stage:
    """The unfrozen stages and the head; returns the stage whose classifier is kept."""
    from toolkit import backbones
    from toolkit.backbones.units import units
    from toolkit.train.freeze import apply_plan

    config = run.config
    start = time.perf_counter()
    stage1_weights = run.dir / STAGE1_WEIGHTS
    if not stage1_weights.is_file():
        with runs.atomic_path(stage1_weights) as tmp:
            model.save_weights(tmp)
    found = units(inner)
    stage_ends = backbones.stage_boundaries([unit.path for unit in found], spec.stages)
    counts_layers = apply_plan(inner, stage_ends, plan, config.train_batchnorm)
    mults = stage_lr_multipliers(stage_of_layers(len(found), stage_ends), plan, config.stage_lr_decay)
    multipliers = {v.path: m for unit, m in zip(found, mults) for v in unit.layer.trainable_weights}
    train = data.train_images(seed_offset=1)
    optimizer = finetune_optimizer(multipliers, finetune_lr, config.finetune_epochs, config.warmup_epochs, train[1])
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"])
    logger.info("stage 2 (fine-tune): %s of %s parameters trainable in %d stages (%d layers), lr %g x %g per stage down",
                f"{trainable_count(model):,}", f"{total_params:,}", plan.unfrozen, counts_layers["trainable_layers"],
                finetune_lr, config.stage_lr_decay)
    fit_stage(run, Stage.FINETUNE, model, train, data.val_images(), config.finetune_epochs)
    kept = keep_better_stage(run, model, stage1_weights)
    run.timed("stage2_finetune_s", start)
    return kept
