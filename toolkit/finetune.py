"""``toolkit finetune``: the main job.

1. Find, verify and split the data; compute the PCA colour statistics.
2. Decide the freeze plan from the data (:mod:`toolkit.freeze`).
3. Stage 1 trains the Network-in-Network head on the frozen backbone. While
   the backbone is frozen its outputs do not change, so by default they are
   computed once per image and augmented view and the head trains on that
   cache for as many epochs as it needs.
4. Stage 2, when the plan unfreezes stages, trains them and the head at a
   lower learning rate -- each stage further down at ``stage_lr_decay`` times
   the one above -- with warm-up and cosine decay, after recompiling.
5. Both stages stop early on validation loss and restore their best epoch.
   After every epoch the weights and the run state are written atomically,
   so ``--resume RUN`` continues after any interruption, SIGKILL included,
   losing at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import backbones, runs
from toolkit.datasets import DatasetSplits, Split, check_source, check_trainable, dataset_statistics, load_splits
from toolkit.errors import UserError
from toolkit.freeze import FreezePlan, apply_plan, plan_freeze
from toolkit.recipes import FinetuneConfig, config_to_dict, load_config
from toolkit.runs import RECIPE_FILE, STATE_FILE

logger = logging.getLogger(__name__)

# A feature-map cache larger than this (float16) is not built; the head then trains on images.
MAX_CACHE_BYTES = 2 << 30


class AccuracyGateError(RuntimeError):
    """The final validation accuracy is below ``--min-accuracy`` (the run is still saved)."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict[str, Any]
    plan: FreezePlan


# ----------------------------------------------------------------------------- pure helpers


def class_weights(counts: list[int], mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights N / (C n_c); ``auto`` turns them on past 3:1 imbalance."""
    nonzero = [c for c in counts if c > 0]
    ratio = max(nonzero) / min(nonzero)
    if mode == "off" or (mode == "auto" and ratio <= 3.0):
        return None
    total, classes = sum(counts), len(counts)
    return {i: (total / (classes * c) if c else 0.0) for i, c in enumerate(counts)}


def cache_views(n_train: int, max_views: int, budget: int) -> int:
    """Views per image in the feature cache: up to ``max_views``, fewer when the data alone fills ``budget``."""
    return max(1, min(max_views, math.ceil(budget / max(n_train, 1))))


def stage_lr_multipliers(stage_of_layer: list[int], plan: FreezePlan, decay: float) -> list[float]:
    """Learning-rate multiplier of each backbone layer: 1 for the top stage, decay per stage below."""
    top = plan.total - 1
    return [decay ** (top - s) if s >= plan.first_trainable_stage else 0.0 for s in stage_of_layer]


def _stage_of_layers(n_layers: int, stage_ends: list[int]) -> list[int]:
    out, stage = [], 0
    for index in range(n_layers):
        while stage < len(stage_ends) - 1 and index > stage_ends[stage]:
            stage += 1
        out.append(stage)
    return out


# ----------------------------------------------------------------------------- Keras pieces


def _layerwise_adam(**kwargs):
    """Adam whose learning rate is scaled per variable (discriminative fine-tuning).

    Keras optimizers apply one schedule to every variable; ``update_step`` is
    called per variable with the current rate, so scaling it there gives each
    stage its own multiple of the shared warm-up + cosine schedule.
    """
    import keras

    class LayerwiseAdam(keras.optimizers.Adam):
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

    return LayerwiseAdam(**kwargs)


def _make_checkpoint_callback(run_dir: Path, stage: str, state: dict, patience: int, save_state):
    import keras

    class TrainingCheckpoint(keras.callbacks.Callback):
        """After every epoch: history, early stopping, best and last weights, run state -- atomically."""

        def on_epoch_end(self, epoch, logs=None):
            s = state[stage]
            logs = {k: float(v) for k, v in (logs or {}).items()}
            s["history"].append({"stage": stage, "epoch": epoch + 1, **logs})
            val_loss = logs.get("val_loss", math.inf)
            if val_loss < s["best_loss"]:
                s.update(best_loss=val_loss, best_epoch=epoch + 1, wait=0)
                with runs.atomic_path(run_dir / f"{stage}.best.weights.h5") as tmp:
                    self.model.save_weights(tmp)
            else:
                s["wait"] += 1
            with runs.atomic_path(run_dir / f"{stage}.last.weights.h5") as tmp:
                self.model.save_weights(tmp)
            s["epochs_done"] = epoch + 1
            save_state()
            if s["wait"] >= patience:
                logger.info("%s: early stop after epoch %d (best epoch %d)", stage, epoch + 1, s["best_epoch"])
                self.model.stop_training = True

    return TrainingCheckpoint()


# ----------------------------------------------------------------------------- the job


class _Run:
    """One finetune run: its folder, its config and its resumable state."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, state: dict, verbose: int, scale, work_dir: Path,
                 splits: DatasetSplits):
        self.config = config
        self.splits = splits
        self.run_dir = run_dir  # the run folder
        # Where this process writes: the run folder on the chief; a private temporary folder on other
        # workers, which compute the same things in step with the chief but must not write the run.
        self.dir = work_dir
        self.scale = scale
        self.state = state
        self.verbose = verbose
        self.timings: dict[str, float] = state.setdefault("timings", {})
        self.closers: list = []  # worker pools to shut down at the end

    def save_state(self) -> None:
        runs.write_json(self.dir / STATE_FILE, self.state)

    @property
    def final_dir(self) -> Path:
        """Where the run ends up: the folder it replaces, when it was trained beside it (``--overwrite``)."""
        return Path(self.state.get("replaces") or self.run_dir)

    def finish_replacement(self) -> Path:
        """Swap a finished replacement in for the folder it replaces (chief only); returns the final folder."""
        if self.state.get("replaces") and self.scale.is_chief and self.run_dir != self.final_dir:
            runs.replace_dir(self.run_dir, self.final_dir)
            logger.info("finetune: %s replaced by the new run", self.final_dir)
        return self.final_dir

    def stage_state(self, stage: str) -> dict:
        return self.state.setdefault(stage, {"history": [], "best_loss": math.inf, "best_epoch": 0, "wait": 0,
                                             "epochs_done": 0, "done": False})

    def timed(self, key: str, start: float) -> None:
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - start, 2)

    def fit_stage(self, stage: str, model, train: tuple[Any, int], val: tuple[Any, int | None], epochs: int):
        """model.fit with per-epoch checkpoints and early stopping; resumes a partial stage.

        ``train`` and ``val`` are (dataset, steps per epoch). The steps are passed to ``fit``
        under a strategy, whose training datasets repeat so that every worker runs the same
        number of steps.
        """
        (train_ds, steps), (val_ds, val_steps) = train, val
        s = self.stage_state(stage)
        if s["done"]:
            _load_model_weights(model, self.dir / f"{stage}.best.weights.h5")
            return
        if s["epochs_done"]:
            logger.info("%s: resuming after epoch %d", stage, s["epochs_done"])
            model.optimizer.build(model.trainable_variables)  # built first, so its moments load too
            _load_checkpoint(model.load_weights, self.dir / f"{stage}.last.weights.h5")
            model.optimizer.iterations.assign(s["epochs_done"] * steps)  # the schedule continues where it was
        if s["epochs_done"] < epochs and s["wait"] < self.config.early_stopping_patience:
            callback = _make_checkpoint_callback(self.dir, stage, self.state, self.config.early_stopping_patience, self.save_state)
            model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=s["epochs_done"],
                      steps_per_epoch=steps if self.scale.distributed else None, validation_steps=val_steps,
                      callbacks=[callback], verbose=self.verbose if self.scale.is_chief else 0,
                      shuffle=False)  # tf.data shuffles, with the run's seed
        if (self.dir / f"{stage}.best.weights.h5").is_file():
            _load_checkpoint(model.load_weights, self.dir / f"{stage}.best.weights.h5")
        s["done"] = True
        self.save_state()


def create_run(config: FinetuneConfig, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Make (and mark) the run folder and write its resolved recipe; training it is ``finetune(resume=...)``.

    Replacing an earlier run (``overwrite``), the folder made is a sibling that takes its place
    only when the new run finishes (its ``state.json`` records which folder it replaces).
    """
    target = Path(out or runs.default_run_dir(config.backbone))
    run_dir = runs.prepare_run_dir(target, overwrite, "run", {"--data": [config.data]})
    runs.write_text(run_dir / RECIPE_FILE, runs.to_toml(config_to_dict(config)))
    if run_dir != target:
        runs.write_json(run_dir / STATE_FILE, {"replaces": str(target.resolve())})
        logger.info("finetune: the new run trains in %s and replaces %s only when it finishes (an interrupted one "
                    "continues with --resume %s)", run_dir, target, run_dir)
    return run_dir


def prepare_config(config: FinetuneConfig) -> FinetuneConfig:
    """The config of a new run, checked, with its data path made absolute (runs resume from anywhere)."""
    if not config.data:
        raise UserError("finetune needs --data (or --resume RUN). Received: data=''")
    config.validate()
    check_source(config.data)
    absolute = {"data": str(Path(config.data).resolve())}
    if config.albumentations:
        absolute["albumentations"] = str(Path(config.albumentations).resolve())
    return dataclasses.replace(config, **absolute)


def load_checked_splits(config: FinetuneConfig, progress: bool) -> DatasetSplits:
    """The run's data, refused (before any folder exists) when it cannot train and validate."""
    splits = load_splits(config.data, config.val_fraction, config.seed, progress=progress)
    for warning in check_trainable(splits):
        logger.warning("data: %s", warning)
    return splits


def read_state(run_dir: Path, resuming: bool) -> dict:
    """A run folder's ``state.json``; missing is fine only while no checkpoint exists."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        checkpoints = sorted(p.name for p in run_dir.glob("*.weights.h5"))
        if checkpoints:
            raise UserError(f"{path} is missing, so the checkpoints ({', '.join(checkpoints)}) cannot be matched to "
                            "an epoch. Restore state.json, or start a new run with --out.")
        if resuming:
            logger.info("resume: no epoch of %s had finished; starting from epoch 1", run_dir)
        return {}
    state = runs.read_json(path, "It records the finished epochs: restore it, or start a new run with --out.")
    if not isinstance(state, dict):
        raise UserError(f"{path} is corrupt (not a JSON object). Restore it, or start a new run with --out.")
    return state


def finetune(
    config: FinetuneConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    verbose: int = 1,
) -> FinetuneResult:
    """Train a classifier; see the module docstring. ``resume`` continues a run folder.

    Everything the run needs is checked before its folder is made, so bad input leaves nothing behind.
    Under ``strategy = "multi-worker"`` every worker runs this same call (the same command line);
    ``out`` must then name one folder that all of them see (a shared filesystem). Only the chief
    creates and writes it.
    """
    from toolkit import distribute

    splits = None
    if resume is None:
        if config is None:
            raise UserError("finetune needs a config or resume=RUN")
        config = prepare_config(config)
        if config.strategy == "multi-worker" and out is None:
            raise UserError("--strategy multi-worker needs --out: every worker must name the same run folder, on a "
                            "filesystem they all see. Received: out=None")
        target = Path(out or runs.default_run_dir(config.backbone))
        runs.check_apart(target, {"--data": [config.data]})
        if runs.check_replaceable(target, overwrite) and config.strategy == "multi-worker":
            raise UserError(f"--overwrite with --strategy multi-worker: every worker must write the same folder; "
                            f"remove {str(target)!r} first, or choose another --out")
        splits = load_checked_splits(config, progress=verbose > 0)
    else:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"Not a run folder (no {RECIPE_FILE}). Received: resume={str(resume)!r}")
        config = load_config(run_dir / RECIPE_FILE)
    scale = distribute.resolve(config.strategy)  # before anything else runs TensorFlow ops
    logger.info("strategy: %s", scale.describe())
    if resume is None:
        run_dir = create_run(config, target, overwrite) if scale.is_chief else target
    with runs.locked(run_dir) if scale.is_chief else contextlib.nullcontext():
        state = read_state(run_dir, resume is not None)
        if state.get("finished"):
            raise UserError(f"Run already finished. Received: resume={str(resume)!r}; start a new run with --out.")
        if splits is None:
            splits = _resumed_splits(run_dir, config, verbose > 0 and scale.is_chief)
        work_dir = run_dir if scale.is_chief else _worker_dir(run_dir, scale.worker_index, resume is not None)
        run = _Run(config, run_dir, state, verbose, scale, work_dir, splits)
        if work_dir != run_dir:
            run.closers.append(lambda: shutil.rmtree(work_dir, ignore_errors=True))
        try:
            result = _train(run)
        except AccuracyGateError as exc:
            exc.run_dir = run.finish_replacement()
            raise
        except UserError:
            _remove_if_untrained(run, fresh=resume is None)
            raise
        finally:
            for close in run.closers:
                close()
    return dataclasses.replace(result, run_dir=run.finish_replacement())


def _remove_if_untrained(run: _Run, fresh: bool) -> None:
    """A new run that failed on its input before finishing an epoch leaves no folder behind.

    (What can be checked is checked before the folder exists; this catches the rest, such as
    a backbone whose weights cannot be had here.) The folder is the toolkit's own, just made.
    """
    trained = any(isinstance(v, dict) and v.get("epochs_done") for v in run.state.values())
    if fresh and run.scale.is_chief and not trained:
        shutil.rmtree(run.run_dir, ignore_errors=True)


def _resumed_splits(run_dir: Path, config: FinetuneConfig, progress: bool) -> DatasetSplits:
    """The data of a run being resumed; its classes must be the ones the run was started with."""
    try:
        splits = load_checked_splits(config, progress)
    except UserError as exc:
        raise UserError(f"{exc} (--data as recorded in {run_dir / RECIPE_FILE})") from None
    if (run_dir / runs.CLASSES_FILE).is_file():
        before = runs.read_json(run_dir / runs.CLASSES_FILE, "It lists the run's classes: restore it, or start a "
                                "new run with --out.")
        if list(splits.class_names) != before:
            added, removed = sorted(set(splits.class_names) - set(before)), sorted(set(before) - set(splits.class_names))
            change = "; ".join(part for part in (f"added {added}" if added else "", f"removed {removed}" if removed
                                                 else "") if part) or "the same classes in another order"
            raise UserError(f"The classes of {config.data} changed since {run_dir} started ({change}), so its "
                            "checkpoints do not fit. Start a new run with --out, or restore the data as it was.")
    return splits


def _worker_dir(run_dir: Path, index: int, resuming: bool) -> Path:
    """A non-chief worker's private folder; on resume it starts from the run's checkpoints."""
    work = Path(tempfile.mkdtemp(prefix=f"toolkit-worker{index}-"))
    if resuming:
        for path in run_dir.iterdir():
            if path.is_file() and (path.name.endswith(".weights.h5") or path.name in (STATE_FILE, runs.PCA_FILE)):
                shutil.copy2(path, work / path.name)
    return work


def finetune_ensemble(
    config: FinetuneConfig | None,
    members: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Train independent members into one ensemble folder that ``--model`` accepts as one model.

    ``members``: comma-separated backbone names (``mobilenet_v2,efficientnet_lite0``) or a number
    of seeds of the configured backbone (``3``: seeds s, s+1, s+2).
    """
    from toolkit.calibration import calibrate
    from toolkit.inference import ENSEMBLE_FILE, load_models, predict_ensemble

    if resume is not None:
        folder = Path(resume)
        spec = runs.read_json(folder / ENSEMBLE_FILE, "It lists the ensemble's members: restore it, or start a new "
                              "ensemble with --out.")
    else:
        if config is None:
            raise UserError("finetune_ensemble needs a config or resume=FOLDER")
        config = prepare_config(config)
        if config.strategy == "multi-worker":
            raise UserError("--ensemble trains its members one after another in one process; a multi-worker "
                            "cluster cannot be set up more than once per process. Received: strategy='multi-worker'; "
                            "train each member with its own `toolkit finetune --strategy multi-worker --out` instead")
        variants = _ensemble_variants(config, members)
        target = Path(out or runs.default_run_dir("ensemble"))
        runs.check_apart(target, {"--data": [config.data]})
        runs.check_replaceable(target, overwrite)
        load_checked_splits(config, progress=verbose > 0)  # the data can train, before any folder exists
        folder = runs.prepare_run_dir(target, overwrite, "ensemble")
        names = []
        for i, variant in enumerate(variants, start=1):
            name = f"{i}-{variant.backbone}-seed{variant.seed}"
            create_run(variant, folder / name)
            names.append(name)
        spec = {"members": names, "weights": [1.0] * len(names)}
        if folder != target:
            spec["replaces"] = str(target.resolve())
        runs.write_json(folder / ENSEMBLE_FILE, spec)
    member_metrics = {}
    for name in spec["members"]:
        member_dir = folder / name
        if read_state(member_dir, resuming=False).get("finished"):
            member_metrics[name] = runs.read_json(member_dir / runs.METRICS_FILE, "Train the member again: delete "
                                                  "its folder's state.json, then resume.")
            continue
        logger.info("ensemble: training member %s", name)
        try:
            member_metrics[name] = finetune(resume=member_dir, verbose=verbose).metrics
        except UserError:
            if resume is None and not member_metrics and not (member_dir / STATE_FILE).is_file():
                shutil.rmtree(folder, ignore_errors=True)  # nothing trained yet: leave no folder behind
            raise

    # The ensemble on the validation split (members share data and seed of the split).
    first = load_config(folder / spec["members"][0] / RECIPE_FILE)
    splits = load_splits(first.data, first.val_fraction, first.seed)
    models = load_models([folder])
    probs = predict_ensemble(models, splits.val.decode_paths, splits.val.is_jpeg)
    labels = np.asarray(splits.val.labels)
    metrics = {
        "val_accuracy": float((probs.argmax(1) == labels).mean()),
        "n_val": int(len(labels)),
        "members": {name: m["val_accuracy"] for name, m in member_metrics.items()},
        "calibration": calibrate(probs, labels),
    }
    runs.write_json(folder / runs.METRICS_FILE, metrics)
    if spec.get("replaces"):
        staged, folder = folder, Path(spec["replaces"])
        runs.replace_dir(staged, folder)
    logger.info("ensemble: validation accuracy %.4f (members: %s); written to %s", metrics["val_accuracy"],
                ", ".join(f"{k} {v:.4f}" for k, v in metrics["members"].items()), folder)
    return {"run_dir": folder, **metrics}


def _ensemble_variants(config: FinetuneConfig, members: str) -> list[FinetuneConfig]:
    from toolkit import backbones as registry

    members = members.strip()
    if members.isdigit():
        count = int(members)
        if count < 2:
            raise UserError(f"An ensemble needs at least 2 members. Received: ensemble={members!r}")
        return [dataclasses.replace(config, seed=config.seed + i) for i in range(count)]
    names = [m.strip() for m in members.split(",") if m.strip()]
    if len(names) < 2:
        raise UserError(f"An ensemble needs at least 2 members. Received: ensemble={members!r}")
    for name in names:
        registry.get_spec(name)  # did-you-mean
    return [dataclasses.replace(config, backbone=name, image_size=0 if name != config.backbone else config.image_size)
            for name in names]


def _train(run: _Run) -> FinetuneResult:
    # Variables (model, optimizer) mirrored over the replicas.
    with run.scale.strategy.scope(), _precision(run.config.mixed_precision):
        return _train_in_scope(run)


@contextlib.contextmanager
def _precision(mixed: bool):
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


def _train_in_scope(run: _Run) -> FinetuneResult:
    import keras

    from toolkit.augment import pca_statistics
    from toolkit.calibration import calibrate
    from toolkit.head import BACKBONE, NINHead, build_classifier

    config, scale = run.config, run.scale
    keras.utils.set_random_seed(config.seed)

    # ---- data
    start = time.perf_counter()
    splits = run.splits
    num_classes = len(splits.class_names)
    if (run.dir / runs.PCA_FILE).is_file():
        pca = runs.read_json(run.dir / runs.PCA_FILE, "Delete it: the next --resume computes it again.")
    else:
        pca = pca_statistics(list(splits.train.decode_paths), seed=config.seed)
        runs.write_json(run.dir / runs.PCA_FILE, pca)
    if not (run.dir / runs.CLASSES_FILE).is_file():
        runs.write_json(run.dir / runs.CLASSES_FILE, list(splits.class_names))
    stats = dataset_statistics(splits)
    counts = list(splits.train.counts().values())
    weights = class_weights(counts, config.class_weights)
    run.timed("data_s", start)

    # ---- model and plan
    spec = backbones.get_spec(config.backbone)
    size = config.image_size or spec.input_size
    data = _Data(run, splits, pca, weights, size)
    plan = plan_freeze(config.freeze, len(splits.train), num_classes, [s.name for s in spec.stages])
    logger.info("freeze plan: %s", plan.describe())
    weights_arg = None if config.weights == "none" else config.weights
    # Any input size: trained at `size`, the fully convolutional classifier also takes whole images
    # (toolkit predict --tta full, toolkit explain).
    backbone = backbones.create(config.backbone, input_shape=(None, None, 3), weights=weights_arg)
    backbone.trainable = False
    head = NINHead(num_classes, config.bottleneck, config.dropout)
    model = build_classifier(backbone, head, (None, None, 3), batchnorm_inference=not config.train_batchnorm)
    inner = model.get_layer(BACKBONE)
    stage_ends = backbones.stage_boundaries([layer.name for layer in inner.layers], spec.stages)
    total_params = model.count_params()
    head_params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    logger.info(
        "finetune: %s at %d px, %s parameters, %s trainable in stage 1 (head); %d of %d stages will be unfrozen; "
        "%d train / %d val images (val: %s), %d classes%s",
        config.backbone, size, f"{total_params:,}", f"{head_params:,}", plan.unfrozen, plan.total, len(splits.train),
        len(splits.val), splits.val_source, num_classes, "; class weights on" if weights else "",
    )
    head_lr, finetune_lr = scale.scale_lr(config.head_lr), scale.scale_lr(config.finetune_lr)
    if scale.distributed:
        logger.info("global batch %d (%d per replica x %d replicas); learning rates x %d (linear scaling): "
                    "head %g, fine-tune %g", data.global_batch, config.batch_size, scale.replicas, scale.replicas,
                    head_lr, finetune_lr)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    # Accuracy honours sample weights: the weight-0 padding of validation shards under a strategy must
    # not count (a plain `metrics=` entry ignores them). Keras' own val_loss still averages over the
    # padded batch (`sum_over_batch_size`): the same bias every epoch, so early stopping is unaffected,
    # and the reported metrics come from the evaluation at the end, which has no padding.

    # ---- stage 1: the head
    start = time.perf_counter()
    cache_reason = _cache_decision(config, head, inner, len(splits.train), size)
    logger.info("stage 1 (head): %s", cache_reason[1])
    if cache_reason[0]:
        head_model, train_feats, val_feats = _feature_cache(run, inner, head, data)
        head_model.compile(optimizer=keras.optimizers.Adam(head_lr), loss=loss, weighted_metrics=["accuracy"])
        run.fit_stage("head", head_model, train_feats, val_feats, config.head_epochs)
    else:
        model.compile(optimizer=keras.optimizers.Adam(head_lr), loss=loss, weighted_metrics=["accuracy"])
        run.fit_stage("head", model, data.train_images(seed_offset=0), data.val_images(), config.head_epochs)
    run.timed("stage1_head_s", start)

    # ---- stage 2: the unfrozen stages
    kept = "head"
    if not plan.head_only and config.finetune_epochs > 0:
        start = time.perf_counter()
        stage1_weights = run.dir / "stage1.weights.h5"  # the whole classifier after stage 1
        if not stage1_weights.is_file():
            with runs.atomic_path(stage1_weights) as tmp:
                model.save_weights(tmp)
        counts_layers = apply_plan(inner, stage_ends, plan, config.train_batchnorm)
        stage_of = _stage_of_layers(len(inner.layers), stage_ends)
        mults = stage_lr_multipliers(stage_of, plan, config.stage_lr_decay)
        multipliers = {v.path: m for layer, m in zip(inner.layers, mults) for v in layer.trainable_weights}
        train = data.train_images(seed_offset=1)
        steps = train[1]
        warmup = min(config.warmup_epochs, config.finetune_epochs) * steps
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, max(config.finetune_epochs * steps - warmup, 1), warmup_target=finetune_lr, warmup_steps=warmup
        )
        model.compile(optimizer=_layerwise_adam(multipliers=multipliers, learning_rate=schedule), loss=loss, weighted_metrics=["accuracy"])
        trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        logger.info("stage 2 (fine-tune): %s of %s parameters trainable in %d stages (%d layers), lr %g x %g per stage down",
                    f"{trainable:,}", f"{total_params:,}", plan.unfrozen, counts_layers["trainable_layers"],
                    finetune_lr, config.stage_lr_decay)
        run.fit_stage("finetune", model, train, data.val_images(), config.finetune_epochs)
        kept = _keep_better_stage(run, model, stage1_weights)
        run.timed("stage2_finetune_s", start)

    # ---- evaluate, write, gate (every worker evaluates the whole validation split; only the chief writes)
    start = time.perf_counter()
    probs, _ = _forward_all(_inference(model), data.image_data(splits.val, False))
    metrics = _metrics(probs, np.asarray(splits.val.labels), splits.class_names, run.state)
    calibration = calibrate(probs, np.asarray(splits.val.labels))
    metrics.update(temperature=calibration["temperature"], ece_before=calibration["ece_before"],
                   ece_after=calibration["ece_after"])
    run.timed("evaluate_s", start)
    metrics["timings"] = dict(run.timings)
    metrics["freeze_plan"] = plan.describe()
    metrics["kept_stage"] = kept
    metrics["strategy"] = {"kind": scale.kind, "replicas": scale.replicas, "workers": scale.workers,
                           "global_batch": data.global_batch}
    if scale.is_chief:
        runs.write_json(run.dir / "calibration.json", calibration)
        _write_outputs(run, model, splits, stats, plan, metrics)
        run.state["finished"] = True
        run.save_state()
        logger.info("finetune: validation accuracy %.4f on %d images; run written to %s", metrics["val_accuracy"],
                    metrics["n_val"], run.dir)
    if config.min_accuracy is not None and metrics["val_accuracy"] < config.min_accuracy:
        raise AccuracyGateError(
            f"validation accuracy {metrics['val_accuracy']:.4f} is below --min-accuracy {config.min_accuracy} "
            f"(the model is saved in {run.run_dir})", run.run_dir,
        )
    return FinetuneResult(run.run_dir, metrics, plan)


def _keep_better_stage(run: _Run, model, stage1_weights: Path) -> str:
    """Early stopping across both stages: stage 2's best epoch is kept only if it beat stage 1's.

    Each stage restores its own best epoch; when fine-tuning never lowered the validation loss
    below what the head alone reached, the stage-1 classifier is the best epoch of the run.
    """
    head_loss, tuned_loss = run.state["head"]["best_loss"], run.state["finetune"]["best_loss"]
    if tuned_loss < head_loss:
        return "finetune"
    logger.info("stage 2 did not lower the validation loss (best %.4f vs %.4f after stage 1): keeping the stage-1 "
                "classifier", tuned_loss, head_loss)
    _load_model_weights(model, stage1_weights)
    return "head"


def _load_model_weights(model, path: Path) -> None:
    """Load a checkpoint's model weights where the optimizer state does not matter (a finished stage)."""
    with warnings.catch_warnings():  # optimizer built or not, saved with or without one: Keras warns, harmlessly
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        _load_checkpoint(model.load_weights, path)


class _Data:
    """The run's datasets, sharded per worker and batched per replica under a strategy.

    Labels leave as one-hot vectors; class weights (when on) and the padding of
    validation shards (see :func:`toolkit.distribute.shard`) as sample weights.
    """

    def __init__(self, run: _Run, splits: DatasetSplits, pca: dict, weights: dict[int, float] | None, size: int):
        self.run, self.splits, self.pca, self.size = run, splits, pca, size
        self.config, self.scale = run.config, run.scale
        self.num_classes = len(splits.class_names)
        self.class_weights = None if weights is None else np.asarray([weights[i] for i in range(self.num_classes)], np.float32)
        self.global_batch = self.scale.global_batch(self.config.batch_size)
        self.local_batch = self.config.batch_size * self.scale.local_replicas  # one worker's batch per step
        self.compose = _load_albumentations(self.config.albumentations) if self.config.albumentations else None

    def steps(self, n: int) -> int:
        return math.ceil(n / self.global_batch)

    def image_data(self, split: Split, training: bool, seed_offset: int = 0):
        """Batched (images, integer labels) of ``split``."""
        from toolkit.pipeline import make_dataset

        config = self.config
        if training and self.compose is not None:
            from toolkit.workers import ProcessAugmentedDataset

            workers = ProcessAugmentedDataset(split, self.compose, self.size, config.batch_size, seed=config.seed + seed_offset)
            self.run.closers.append(workers.close)
            return workers.dataset()
        ds = make_dataset(split, self.size, config.batch_size, training=training, seed=config.seed + seed_offset,
                          augment_config=config.augment, pca=self.pca, crop_fraction=config.crop_fraction)
        if training and config.data_service:
            from toolkit.distribute import offload

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
        from toolkit.distribute import shard

        def build(index: int, count: int):
            part = self.splits.train if count == 1 else self.splits.train.take(shard(len(self.splits.train), index, count))
            ds = self.labelled(self.image_data(part, True, seed_offset), training=True)
            return ds.repeat() if self.scale.distributed else ds

        return self.scale.distribute(build), self.steps(len(self.splits.train))

    def val_images(self) -> tuple[Any, int | None]:
        """Validation images for ``fit``, and the validation steps (None: until the data ends)."""
        from toolkit.distribute import padded, shard

        def build(index: int, count: int):
            if not self.scale.distributed:
                return self.labelled(self.image_data(self.splits.val, False), training=False)
            indices, pad = padded(shard(len(self.splits.val), index, count), self.val_length(len(self.splits.val)))
            # Repeated: with validation_steps, Keras keeps one iterator over the epochs.
            return self.labelled(self.image_data(self.splits.val.take(indices), False), training=False,
                                 pad_weights=pad).repeat()

        return self.scale.distribute(build), self.val_steps(len(self.splits.val))

    def val_length(self, n: int) -> int:
        from toolkit.distribute import evaluation_length

        return evaluation_length(n, self.scale.workers, self.local_batch)

    def val_steps(self, n: int) -> int | None:
        if not self.scale.distributed:
            return None
        return self.val_length(n) // self.local_batch

    def arrays(self, x: np.ndarray, y: np.ndarray, training: bool, n_total: int) -> tuple[Any, int | None]:
        """Cached features of this worker's shard (of ``n_total`` over all workers) for ``fit``, and the steps."""
        import tensorflow as tf

        from toolkit.distribute import padded
        from toolkit.pipeline import finish

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


def _inference(model):
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def _forward_all(forward, dataset, dtype=np.float32, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of ``forward`` (see :func:`_inference`) and the labels, over batched (images, labels).

    A plain loop, not ``model.predict``: under a multi-worker strategy ``predict`` would be a
    collective over all workers, while each worker here computes what it needs itself.
    """
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(np.asarray(forward(images), dtype=dtype))
        ys.append(labels.numpy())
        if bar:
            bar.add(1)
    return np.concatenate(xs), np.concatenate(ys)


def _load_albumentations(path: str):
    import albumentations

    fmt = "yaml" if path.endswith((".yaml", ".yml")) else "json"
    return albumentations.load(path, data_format=fmt)


def _cache_decision(config: FinetuneConfig, head, backbone, n_train: int, size: int) -> tuple[bool, str]:
    if config.cache_features == "off":
        return False, "training on images (feature cache switched off in the recipe)"
    shape = backbone.compute_output_shape((1, size, size, 3))[1:]
    per_view = int(np.prod(shape)) * 2 if not head.is_linear else int(shape[-1]) * 4
    views = cache_views(n_train, config.cache_views, config.cache_view_budget)
    total = per_view * n_train * views
    if total > MAX_CACHE_BYTES:
        return False, (f"training on images: a feature cache would need {total / 2**30:.1f} GiB "
                       f"(> {MAX_CACHE_BYTES / 2**30:.0f} GiB; use fewer cache_views or no bottleneck)")
    kind = "pooled features (the head is linear)" if head.is_linear else "feature maps (float16)"
    return True, f"cached {kind} of {views} views per image ({total / 2**20:.0f} MiB)"


def _feature_cache(run: _Run, backbone, head, data: _Data):
    """Backbone outputs for every image and view, computed once and kept in the run folder.

    Under a multi-worker strategy each worker computes and trains on the features of its
    own shard of the images (stored as ``features-<i>of<n>.npz``).
    """
    import keras

    from toolkit.distribute import shard

    config, scale, splits = run.config, run.scale, data.splits
    if head.is_linear:
        pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="cache_pool")(backbone.output)
        extractor = keras.Model(backbone.input, pooled)
    else:
        extractor = backbone
    name = "features.npz" if scale.workers == 1 else f"features-{scale.worker_index}of{scale.workers}.npz"
    cache_path = run.dir / "cache" / name
    views_per_image = cache_views(len(splits.train), config.cache_views, config.cache_view_budget)
    cached = _read_feature_cache(cache_path)
    if cached is not None:
        train_x, train_y, val_x, val_y = cached
        logger.info("stage 1: feature cache loaded from %s", cache_path)
    else:
        train, val = splits.train, splits.val
        if scale.workers > 1:
            train = train.take(shard(len(train), scale.worker_index, scale.workers))
            val = val.take(shard(len(val), scale.worker_index, scale.workers))
        n_batches = math.ceil(len(train) / config.batch_size) * views_per_image + math.ceil(len(val) / config.batch_size)
        bar = keras.utils.Progbar(n_batches, unit_name="batch") if run.verbose and scale.is_chief else None
        dtype = np.float32 if head.is_linear else np.float16
        forward = _inference(extractor)
        views = [_forward_all(forward, data.image_data(train, False), dtype, bar)]  # view 0: the plain centre crop
        views += [_forward_all(forward, data.image_data(train, True, 100 + v), dtype, bar) for v in range(1, views_per_image)]
        train_x = np.concatenate([v[0] for v in views])
        train_y = np.concatenate([v[1] for v in views])
        val_x, val_y = _forward_all(forward, data.image_data(val, False), dtype, bar)
        with runs.atomic_path(cache_path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)

    head_model = head.on_features(train_x.shape[1:])
    train = data.arrays(train_x, train_y, True, len(splits.train) * views_per_image)
    return head_model, train, data.arrays(val_x, val_y, False, len(splits.val))


def _read_feature_cache(path: Path) -> tuple[np.ndarray, ...] | None:
    """(train_x, train_y, val_x, val_y) from a cache file; None when absent, or unreadable (with a warning)."""
    import zipfile

    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            return tuple(cached[key] for key in ("train_x", "train_y", "val_x", "val_y"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("stage 1: the feature cache %s is unreadable (%s: %s); computing it again", path,
                       type(exc).__name__, exc)
        return None


def _load_checkpoint(load, path: Path) -> None:
    """``load(path)`` (a Keras weights loader); a missing or damaged checkpoint is a user error naming it."""
    try:
        load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}): the "
                        "checkpoint is missing, truncated or corrupt, so the run cannot resume from it. Start a "
                        "new run with --out.") from None


def _metrics(probs: np.ndarray, labels: np.ndarray, class_names, state: dict) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    per_class = {}
    for i, name in enumerate(class_names):
        mask = labels == i
        per_class[name] = float((predicted[mask] == i).mean()) if mask.any() else None
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)).mean()
    out = {
        "val_accuracy": float((predicted == labels).mean()),
        "val_loss": float(nll),
        "n_val": int(len(labels)),
        "per_class_accuracy": per_class,
        "class_names": list(class_names),
    }
    for stage in ("head", "finetune"):
        if stage in state and state[stage]["history"]:
            best = state[stage]["best_epoch"]
            row = next((h for h in state[stage]["history"] if h["epoch"] == best), state[stage]["history"][-1])
            out[f"{stage}_best_epoch"] = best
            out[f"{stage}_val_accuracy"] = row.get("val_accuracy")
    return out


def _write_outputs(run: _Run, model, splits: DatasetSplits, stats: dict, plan: FreezePlan, metrics: dict) -> None:
    import keras
    import pandas as pd

    from toolkit.report import plot_curves, report_markdown

    # The saved model is plain functional Keras (no training optimizer), loadable in safe mode.
    export = keras.Model(model.input, model.output, name="classifier")
    with runs.atomic_path(run.dir / "model.keras") as tmp:
        export.save(tmp)
    runs.write_json(run.dir / "metrics.json", metrics)
    runs.write_json(run.dir / "data.json", {"statistics": stats, "problems": [dataclasses.asdict(p) for p in splits.problems]})
    history = [row for stage in ("head", "finetune") if stage in run.state for row in run.state[stage]["history"]]
    frame = pd.DataFrame(history)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    runs.write_text(run.dir / "history.csv", buffer.getvalue())
    if len(frame):
        plot_curves(frame, run.dir / runs.CURVES_FILE)
    training = [f"- freeze plan: {plan.describe()}"]
    for stage in ("head", "finetune"):
        if stage in run.state:
            s = run.state[stage]
            training.append(f"- {stage}: {s['epochs_done']} epochs, best epoch {s['best_epoch']} "
                            f"(val loss {s['best_loss']:.4f}, val accuracy {metrics.get(stage + '_val_accuracy') or 0:.4f})")
    if "finetune" in run.state:
        training.append("- kept: the fine-tuned classifier (stage 2 lowered the validation loss)" if metrics["kept_stage"] == "finetune"
                        else "- kept: the stage-1 classifier (stage 2 did not lower the validation loss)")
    training.append(f"- final validation accuracy: {metrics['val_accuracy']:.4f} on {metrics['n_val']} images")
    training.append(f"- calibration: temperature {metrics['temperature']:.3f} fitted on the validation split; "
                    f"ECE {metrics['ece_before']:.4f} before, {metrics['ece_after']:.4f} after")
    timings = "\n".join(f"- {k}: {v} s" for k, v in metrics["timings"].items())
    runs.write_text(run.dir / runs.REPORT_FILE, report_markdown(splits, stats, {"Training": "\n".join(training), "Timings": timings}))
