"""``toolkit finetune``: the main job, wired from its pieces.

1. Find, verify and split the data (refused before any folder exists when it cannot train);
   compute the PCA colour statistics.
2. Decide the freeze plan from the data (:mod:`toolkit.freeze`) and build the classifier.
3. Stage 1 trains the Network-in-Network head on the frozen backbone, by default on cached
   backbone features (:mod:`toolkit.feature_cache`).
4. Stage 2, when the plan unfreezes stages, trains them and the head with layer-wise learning
   rates, warm-up and cosine decay (:mod:`toolkit.stages`); it is kept only if it lowered the
   validation loss below stage 1's.
5. Evaluate, calibrate, write the run (:mod:`toolkit.report`). After every epoch the weights and the
   run state are written atomically, so ``resume(RUN)`` continues after any interruption, SIGKILL
   included, losing at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from toolkit import backbones, outputs, runs
from toolkit.config import FinetuneConfig
from toolkit.datasets import dataset_statistics
from toolkit.errors import UserError
from toolkit.freeze import apply_plan, plan_freeze
from toolkit.recipes import load_config
from toolkit.run_state import (  # noqa: F401  (AccuracyGateError, FinetuneResult: the API's types)
    AccuracyGateError, FinetuneResult, Run, Stage, create_run, load_checked_splits, prepare_config, read_state,
    resumed_splits, worker_dir,
)

logger = logging.getLogger(__name__)

STAGE1_WEIGHTS = "stage1.weights.h5"  # the whole classifier after stage 1, while stage 2 runs


def finetune(config: FinetuneConfig, out: str | Path | None = None, overwrite: bool = False,
             verbose: int = 1) -> FinetuneResult:
    """Train a classifier into a new run folder (``out``; default ``runs/<date>-<time>-<backbone>``).

    Everything the run needs is checked before its folder is made, so bad input leaves nothing behind.
    Under ``strategy = "multi-worker"`` every worker runs this same call (the same command line);
    ``out`` must then name one folder that all of them see (a shared filesystem). Only the chief
    creates and writes it.
    """
    from toolkit import distribute

    config = prepare_config(config)
    if config.strategy == "multi-worker" and out is None:
        raise UserError("--strategy multi-worker needs --out: every worker must name the same run folder, on a "
                        "filesystem they all see. Received: out=None")
    target = Path(out or runs.default_run_dir(config.backbone))
    if outputs.check_output_dir(target, overwrite, "run", {"--data": [config.data]}) and config.strategy == "multi-worker":
        raise UserError(f"--overwrite with --strategy multi-worker: every worker must write the same folder; "
                        f"remove {str(target)!r} first, or choose another --out")
    if config.data_service:
        distribute.check_reachable(config.data_service, "--data-service")
    splits = load_checked_splits(config, progress=verbose > 0)
    members = _fold_members(config, splits)
    if members:
        from toolkit.ensemble import finetune_ensemble

        logger.info("--cv %d with a plan that trains backbone stages: %d members, each validating on its own fold, "
                    "into one ensemble folder (about %dx the time of one run)", members, members, members)
        return finetune_ensemble(config, f"folds:{members}", out=target, overwrite=overwrite, verbose=verbose)
    scale = distribute.resolve(config.strategy)  # before anything else runs TensorFlow ops
    logger.info("strategy: %s", scale.describe())
    run_dir = create_run(config, target, overwrite) if scale.is_chief else target
    return _run(run_dir, config, scale, splits, verbose, resuming=False)


def _fold_members(config: FinetuneConfig, splits) -> int:
    from toolkit.folds import fold_members

    spec = backbones.get_spec(config.backbone)
    plan = plan_freeze(config.freeze, len(splits.train), len(splits.class_names), [s.name for s in spec.stages])
    return fold_members(config.cv, plan.head_only, (splits.train + splits.val).counts())


def resume(run_dir: str | Path, verbose: int = 1) -> FinetuneResult:
    """Continue an interrupted run (or ensemble) folder from its last finished epoch."""
    from toolkit import distribute

    run_dir = Path(run_dir).resolve()  # a sibling it replaces is found beside its real location
    if (run_dir / runs.ENSEMBLE_FILE).is_file():
        from toolkit.ensemble import finetune_ensemble

        return finetune_ensemble(None, "", resume=run_dir, verbose=verbose)
    if not (run_dir / runs.RECIPE_FILE).is_file():
        raise UserError(f"Not a run folder (no {runs.RECIPE_FILE}). Received: resume={str(run_dir)!r}")
    config = load_config(run_dir / runs.RECIPE_FILE)
    if config.data_service:
        distribute.check_reachable(config.data_service, f"data_service in {run_dir / runs.RECIPE_FILE}")
    scale = distribute.resolve(config.strategy)
    logger.info("strategy: %s", scale.describe())
    return _run(run_dir, config, scale, None, verbose, resuming=True)


def _run(run_dir: Path, config: FinetuneConfig, scale, splits, verbose: int, resuming: bool) -> FinetuneResult:
    """Train ``run_dir`` (locked while it trains), then swap it in for the folder it replaces, if any."""
    with runs.locked(run_dir) if scale.is_chief else contextlib.nullcontext():
        state = read_state(run_dir, resuming)
        if state.finished and state.replaces and scale.is_chief:  # trained; its swap was refused: try it again
            run = Run(config, run_dir, state, verbose, scale, run_dir, None)
            metrics = runs.read_json(run_dir / runs.METRICS_FILE, "Train the run again with --out.")
            return FinetuneResult(run.finish_replacement(), metrics)
        if state.finished:
            raise UserError(f"Run already finished. Received: resume={str(run_dir)!r}; start a new run with --out.")
        if splits is None:
            splits = resumed_splits(run_dir, config, verbose > 0 and scale.is_chief)
        work_dir = run_dir if scale.is_chief else worker_dir(run_dir, scale.worker_index, resuming)
        run = Run(config, run_dir, state, verbose, scale, work_dir, splits)
        if work_dir != run_dir:
            import shutil

            run.closers.append(lambda: shutil.rmtree(work_dir, ignore_errors=True))
        try:
            with scale.strategy.scope(), _precision(config.mixed_precision):  # variables mirrored over replicas
                result = _train(run)
        except AccuracyGateError as exc:
            exc.run_dir = run.finish_replacement()
            raise
        except Exception:  # bad input found late, or a failure (out of memory): no untrained folder is left
            run.remove_if_untrained(fresh=not resuming)
            raise
        finally:
            run.close()
    return dataclasses.replace(result, run_dir=run.finish_replacement())


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


def _train(run: Run) -> FinetuneResult:
    import keras

    from toolkit.augment import check_pca_statistics, pca_statistics
    from toolkit.fit_data import FitData, class_weights
    from toolkit.head import BACKBONE, NINHead, build_classifier

    config, scale, splits = run.config, run.scale, run.splits
    keras.utils.set_random_seed(config.seed)

    # ---- data
    start = time.perf_counter()
    if (run.dir / runs.PCA_FILE).is_file():
        pca = check_pca_statistics(runs.read_json(run.dir / runs.PCA_FILE, "Delete it: the next --resume computes it "
                                                  "again."), run.dir / runs.PCA_FILE)
    else:
        pca = pca_statistics(list(splits.train.decode_paths), seed=config.seed)
        runs.write_json(run.dir / runs.PCA_FILE, pca)
    if not (run.dir / runs.CLASSES_FILE).is_file():
        runs.write_json(run.dir / runs.CLASSES_FILE, list(splits.class_names))
    stats = dataset_statistics(splits)
    weights = class_weights(list(splits.train.counts().values()), config.class_weights)
    run.timed("data_s", start)

    # ---- model and plan
    spec = backbones.get_spec(config.backbone)
    size = config.image_size or spec.input_size
    data = FitData(config, scale, splits, pca, weights, size, run.closers)
    num_classes = len(splits.class_names)
    plan = plan_freeze(config.freeze, len(splits.train), num_classes, [s.name for s in spec.stages])
    logger.info("freeze plan: %s", plan.describe())
    # Any input size: trained at `size`, the fully convolutional classifier also takes whole images
    # (toolkit predict --tta full, toolkit explain).
    backbone = backbones.create(config.backbone, input_shape=(None, None, 3),
                                weights=None if config.weights == "none" else config.weights)
    backbone.trainable = False
    head = NINHead(num_classes, config.bottleneck, config.dropout)
    model = build_classifier(backbone, head, (None, None, 3), batchnorm_inference=not config.train_batchnorm)
    inner = model.get_layer(BACKBONE)
    total_params = model.count_params()
    logger.info(
        "finetune: %s at %d px, %s parameters, %s trainable in stage 1 (head); %d of %d stages will be unfrozen; "
        "%d train / %d val images (val: %s), %d classes%s",
        config.backbone, size, f"{total_params:,}", f"{_trainable(model):,}", plan.unfrozen, plan.total,
        len(splits.train), len(splits.val), splits.val_source, num_classes, "; class weights on" if weights else "",
    )
    head_lr, finetune_lr = scale.scale_lr(config.head_lr), scale.scale_lr(config.finetune_lr)
    if scale.distributed:
        logger.info("global batch %d (%d per replica x %d replicas); learning rates x %d (linear scaling): "
                    "head %g, fine-tune %g", data.global_batch, config.batch_size, scale.replicas, scale.replicas,
                    head_lr, finetune_lr)
    # Accuracy honours sample weights: the weight-0 padding of validation shards under a strategy must
    # not count (a plain `metrics=` entry ignores them). Keras' own val_loss still averages over the
    # padded batch (`sum_over_batch_size`): the same bias every epoch, so early stopping is unaffected,
    # and the reported metrics come from the evaluation at the end, which has no padding.
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)

    from toolkit.feature_cache import cache_decision
    from toolkit.folds import plan_folds

    cached = cache_decision(config, head, inner, len(splits.train), size)
    folds = plan_folds(config.cv, (splits.train + splits.val).counts(), plan.head_only, splits.val_is_given,
                       cached[0] and scale.workers == 1)
    logger.info("validation: %s", folds.reason)
    if folds.active:
        from toolkit.cross_validate import cross_validate

        cv_model, evaluated = cross_validate(run, backbone, data, folds.folds, head_lr)
        return _finish(run, cv_model, data, stats, plan, Stage.CV, evaluated)
    _stage1(run, model, head, inner, data, cached, loss, head_lr)
    kept = Stage.HEAD
    if not plan.head_only and config.finetune_epochs > 0:
        kept = _stage2(run, model, inner, spec, plan, data, loss, finetune_lr, total_params)
    return _finish(run, model, data, stats, plan, kept)


def _trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _stage1(run: Run, model, head, inner, data, cache: tuple[bool, str], loss, head_lr: float) -> None:
    """The head on the frozen backbone: on cached features when they fit (``cache``: whether, and why), else on
    images."""
    import keras

    from toolkit.feature_cache import feature_cache
    from toolkit.stages import fit_stage

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


def _stage2(run: Run, model, inner, spec, plan, data, loss, finetune_lr: float, total_params: int) -> Stage:
    """The unfrozen stages and the head; returns the stage whose classifier is kept."""
    from toolkit.stages import (
        finetune_optimizer, fit_stage, keep_better_stage, stage_lr_multipliers, stage_of_layers,
    )

    config = run.config
    start = time.perf_counter()
    stage1_weights = run.dir / STAGE1_WEIGHTS
    if not stage1_weights.is_file():
        with runs.atomic_path(stage1_weights) as tmp:
            model.save_weights(tmp)
    stage_ends = backbones.stage_boundaries([layer.name for layer in inner.layers], spec.stages)
    counts_layers = apply_plan(inner, stage_ends, plan, config.train_batchnorm)
    mults = stage_lr_multipliers(stage_of_layers(len(inner.layers), stage_ends), plan, config.stage_lr_decay)
    multipliers = {v.path: m for layer, m in zip(inner.layers, mults) for v in layer.trainable_weights}
    train = data.train_images(seed_offset=1)
    optimizer = finetune_optimizer(multipliers, finetune_lr, config.finetune_epochs, config.warmup_epochs, train[1])
    model.compile(optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"])
    logger.info("stage 2 (fine-tune): %s of %s parameters trainable in %d stages (%d layers), lr %g x %g per stage down",
                f"{_trainable(model):,}", f"{total_params:,}", plan.unfrozen, counts_layers["trainable_layers"],
                finetune_lr, config.stage_lr_decay)
    fit_stage(run, Stage.FINETUNE, model, train, data.val_images(), config.finetune_epochs)
    kept = keep_better_stage(run, model, stage1_weights)
    run.timed("stage2_finetune_s", start)
    return kept


def _finish(run: Run, model, data, stats: dict, plan, kept: Stage, evaluated=None) -> FinetuneResult:
    """Evaluate, calibrate, write (every worker evaluates the whole validation split; only the chief writes).

    ``evaluated`` is a cross-validated run's :class:`toolkit.cross_validate.OutOfFold`: its out-of-fold
    probabilities stand for the validation split's, over every labelled image.
    """
    from toolkit.calibration import calibrate
    from toolkit.evaluate import classification_metrics
    from toolkit.feature_cache import forward_all, inference
    from toolkit.report import accuracy_line, run_metrics, write_run_outputs

    config, scale, splits = run.config, run.scale, run.splits
    start = time.perf_counter()
    if evaluated is None:
        probs, _ = forward_all(inference(model), data.image_data(splits.val, False))
        labels = np.asarray(splits.val.labels)
    else:
        probs, labels = evaluated.probs, evaluated.labels
    measured = classification_metrics(probs, labels, splits.class_names)
    metrics = run_metrics(measured, run)
    if evaluated is not None:
        metrics["cv"] = evaluated.summary(measured)
    calibration = calibrate(probs, labels)
    metrics.update(temperature=calibration["temperature"], ece_before=calibration["ece_before"],
                   ece_after=calibration["ece_after"])
    run.timed("evaluate_s", start)
    metrics["timings"] = dict(run.state.timings)
    metrics["freeze_plan"] = plan.describe()
    metrics["kept_stage"] = kept.value
    metrics["strategy"] = {"kind": scale.kind, "replicas": scale.replicas, "workers": scale.workers,
                           "global_batch": data.global_batch}
    if scale.is_chief:
        from toolkit.calibration import apply_temperature
        from toolkit.unknown import run_scorer

        runs.write_json(run.dir / runs.CALIBRATION_FILE, calibration)
        scorer = run_scorer(model, splits, data.size, config.crop_fraction,
                            apply_temperature(probs, calibration["temperature"]), evaluated)
        runs.write_bytes(run.dir / runs.UNKNOWN_FILE, scorer.to_bytes())
        write_run_outputs(run, model, stats, plan, metrics, measured, probs, labels)
        run.state.finished = True
        run.save_state()
        logger.info("finetune: %s; run written to %s", accuracy_line(metrics), run.final_dir)
    if config.min_accuracy is not None and metrics["val_accuracy"] < config.min_accuracy:
        raise AccuracyGateError(
            f"validation accuracy {metrics['val_accuracy']:.4f} is below --min-accuracy {config.min_accuracy} "
            f"(the model is saved in {run.final_dir})", run.final_dir,
        )
    return FinetuneResult(run.run_dir, metrics, plan)
