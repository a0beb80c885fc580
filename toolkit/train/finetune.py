"""``toolkit finetune``: the main job, wired from its pieces.

1. Find, verify and split the data (refused before any folder exists when it cannot train);
   compute the PCA colour statistics.
2. Decide the freeze plan from the data (:mod:`toolkit.train.freeze`) and build the classifier.
3. Stage 1 trains the Network-in-Network head on the frozen backbone, by default on cached
   backbone features (:mod:`toolkit.train.feature_cache`).
4. Stage 2, when the plan unfreezes stages, trains them and the head with layer-wise learning
   rates, warm-up and cosine decay (:mod:`toolkit.train.stages`); it is kept only if it lowered the
   validation loss below stage 1's.
5. Evaluate, calibrate, write the run (:mod:`toolkit.train.report`). After every epoch the weights and the
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

from toolkit import backbones
from toolkit.config.recipes import load_config
from toolkit.config.settings import FinetuneConfig
from toolkit.core import outputs, runs
from toolkit.core.errors import UserError
from toolkit.data.datasets import dataset_statistics
from toolkit.train.freeze import plan_freeze
from toolkit.train.run_state import (  # noqa: F401  (AccuracyGateError, FinetuneResult: the API's types)
    AccuracyGateError,
    FinetuneResult,
    Run,
    Stage,
    create_run,
    load_checked_splits,
    prepare_config,
    read_state,
    resumed_splits,
    worker_dir,
)

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Prepared:
    """A run checked before its folder exists: the resolved settings, the folder it will be, its data, and how many
    fold members it needs instead (0: one run; K: ``--cv K`` with a plan that trains backbone stages)."""

    config: FinetuneConfig
    target: Path
    overwrite: bool
    splits: object  # DatasetSplits; a multi-label run's toolkit.train.multilabel_run.MultiLabelRunData
    fold_members: int


def prepare(config: FinetuneConfig, out: str | Path | None = None, overwrite: bool = False,
            verbose: int = 1) -> Prepared:
    """Check everything a run needs before its folder is made, so bad input leaves nothing behind.

    Under ``strategy = "multi-worker"`` every worker runs this same call (the same command line);
    ``out`` must then name one folder that all of them see (a shared filesystem).
    """
    from toolkit.train import distribute
    from toolkit.train.folds import fold_members

    config = prepare_config(config)
    if config.strategy == "multi-worker" and out is None:
        raise UserError("--strategy multi-worker needs --out: every worker must name the same run folder, on a "
                        "filesystem they all see. Received: out=None")
    target = Path(out or runs.default_run_dir(config.backbone))
    if outputs.check_output_dir(target, overwrite, "run", {"--data": [config.data]}) and config.strategy == "multi-worker":
        raise UserError(f"--overwrite with --strategy multi-worker: every worker must write the same folder; "
                        f"remove {str(target)!r} first, or choose another --out")
    from toolkit.train import multilabel_run

    if multilabel_run.is_multilabel(config.data):
        checked = multilabel_run.check(config, progress=verbose > 0)
        multilabel_run.freeze_plan(config, checked, say=False)  # refused now if it cannot be; said when it trains
        return Prepared(config, target, overwrite, checked, 0)
    if config.data_service:
        distribute.check_reachable(config.data_service, "--data-service")
    splits = load_checked_splits(config, progress=verbose > 0)
    spec = backbones.get_spec(config.backbone)
    plan = plan_freeze(config.freeze, len(splits.train), len(splits.class_names), [s.name for s in spec.stages])
    members = fold_members(config.cv, plan.head_only, (splits.train + splits.val).counts())
    return Prepared(config, target, overwrite, splits, members)


def finetune(prepared: Prepared, verbose: int = 1) -> FinetuneResult:
    """Train one classifier into ``prepared.target`` (see :func:`prepare`; an ensemble of fold members is
    :func:`toolkit.train.ensemble.finetune_ensemble`'s). Only the chief of a multi-worker cluster creates and
    writes the folder."""
    from toolkit.train import distribute

    config = prepared.config
    scale = distribute.resolve(config.strategy)  # before anything else runs TensorFlow ops
    logger.info("strategy: %s", scale.describe())
    run_dir = create_run(config, prepared.target, prepared.overwrite) if scale.is_chief else prepared.target
    return _run(run_dir, config, scale, prepared.splits, verbose, resuming=False)


def resume(run_dir: str | Path, verbose: int = 1) -> FinetuneResult:
    """Continue an interrupted run folder from its last finished epoch (an ensemble's: :func:`toolkit.api.training.resume`)."""
    from toolkit.train import distribute

    run_dir = Path(run_dir).resolve()  # a sibling it replaces is found beside its real location
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
        from toolkit.train import multilabel_run

        multi_label = multilabel_run.is_multilabel(config.data)
        if splits is None:
            splits = (multilabel_run.resumed if multi_label else resumed_splits)(run_dir, config,
                                                                                verbose > 0 and scale.is_chief)
        work_dir = run_dir if scale.is_chief else worker_dir(run_dir, scale.worker_index, resuming)
        run = Run(config, run_dir, state, verbose, scale, work_dir, splits)
        if work_dir != run_dir:
            import shutil

            run.closers.append(lambda: shutil.rmtree(work_dir, ignore_errors=True))
        try:
            from toolkit.train.stages import precision

            with scale.strategy.scope(), precision(config.mixed_precision):  # variables mirrored over replicas
                result = (multilabel_run.train if multi_label else _train)(run)
        except AccuracyGateError as exc:
            exc.run_dir = run.finish_replacement()
            raise
        except Exception:  # bad input found late, or a failure (out of memory): no untrained folder is left
            run.remove_if_untrained(fresh=not resuming)
            raise
        finally:
            run.close()
    return dataclasses.replace(result, run_dir=run.finish_replacement())


def _train(run: Run) -> FinetuneResult:
    import keras

    from toolkit.backbones.head import BACKBONE, NINHead, build_classifier
    from toolkit.data.augment import check_pca_statistics, pca_statistics
    from toolkit.train.fit_data import FitData, class_weights
    from toolkit.train.stages import train_head, train_unfrozen, trainable_count

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
                                weights=None if config.weights == "none" else config.weights,
                                preprocess=config.backbone_preprocess)
    backbone.trainable = False
    head = NINHead(num_classes, config.bottleneck, config.dropout)
    model = build_classifier(backbone, head, (None, None, 3), batchnorm_inference=not config.train_batchnorm)
    inner = model.get_layer(BACKBONE)
    total_params = model.count_params()
    logger.info(
        "finetune: %s at %d px, %s parameters, %s trainable in stage 1 (head); %d of %d stages will be unfrozen; "
        "%d train / %d val images (val: %s), %d classes%s",
        config.backbone, size, f"{total_params:,}", f"{trainable_count(model):,}", plan.unfrozen, plan.total,
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

    from toolkit.train.feature_cache import cache_decision
    from toolkit.train.folds import plan_folds

    cached = cache_decision(config, head, inner, len(splits.train), size)
    folds = plan_folds(config.cv, (splits.train + splits.val).counts(), plan.head_only, splits.val_is_given,
                       cached[0] and scale.workers == 1)
    logger.info("validation: %s", folds.reason)
    if folds.active:
        from toolkit.train.cross_validate import cross_validate

        cv_model, evaluated = cross_validate(run, backbone, data, folds.folds, head_lr)
        return _finish(run, cv_model, data, stats, plan, Stage.CV, evaluated)
    train_head(run, model, head, inner, data, cached, loss, head_lr)
    kept = Stage.HEAD
    if not plan.head_only and config.finetune_epochs > 0:
        kept = train_unfrozen(run, model, inner, spec, plan, data, loss, finetune_lr, total_params)
    return _finish(run, model, data, stats, plan, kept)


def _finish(run: Run, model, data, stats: dict, plan, kept: Stage, evaluated=None) -> FinetuneResult:
    """Evaluate, calibrate, write (every worker evaluates the whole validation split; only the chief writes).

    ``evaluated`` is a cross-validated run's :class:`toolkit.train.cross_validate.OutOfFold`: its out-of-fold
    probabilities stand for the validation split's, over every labelled image.
    """
    from toolkit.predict.calibration import calibrate
    from toolkit.predict.evaluate import classification_metrics
    from toolkit.train.feature_cache import forward_all, inference
    from toolkit.train.report import accuracy_line, run_metrics, write_run_outputs

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
        from toolkit.predict.calibration import apply_temperature
        from toolkit.predict.unknown import run_scorer

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
