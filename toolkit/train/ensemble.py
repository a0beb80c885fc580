"""Ensembles: independent members (backbones or seeds) trained one after another into one folder that
``--model`` accepts as one model; the ensemble is evaluated and calibrated on the validation split."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from toolkit.config.recipes import load_config
from toolkit.config.settings import FinetuneConfig
from toolkit.core import outputs, runs
from toolkit.core.errors import UserError
from toolkit.core.uncertainty import accuracy_interval
from toolkit.data.datasets import load_splits
from toolkit.predict.ensemble_spec import EnsembleSpec, read_ensemble
from toolkit.train.run_state import FinetuneResult, create_run, load_checked_splits, prepare_config, read_state, swap_in

logger = logging.getLogger(__name__)


def finetune_ensemble(
    config: FinetuneConfig | None,
    members: str,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    verbose: int = 1,
) -> FinetuneResult:
    """Train independent members into one ensemble folder that ``--model`` accepts as one model.

    ``members``: comma-separated backbone names (``mobilenet_v2,efficientnet_lite0``) or a number
    of seeds of the configured backbone (``3``: seeds s, s+1, s+2).
    """
    from toolkit.predict.calibration import calibrate
    from toolkit.predict.evaluate import classification_metrics
    from toolkit.predict.inference import predict_ensemble
    from toolkit.predict.members import load_models
    from toolkit.train.finetune import resume as resume_run
    from toolkit.train.report_page import ensemble_page

    if resume is not None:
        folder = Path(resume).resolve()
        spec = read_ensemble(folder)
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
        outputs.check_output_dir(target, overwrite, "ensemble", {"--data": [config.data]})
        load_checked_splits(config, progress=verbose > 0)  # the data can train, before any folder exists
        folder, replaces = outputs.prepare_run_dir(target, overwrite, "ensemble", {"--data": [config.data]})
        names = []
        for i, variant in enumerate(variants, start=1):
            name = f"{i}-{runs.backbone_label(variant.backbone)}-" + (f"fold{variant.fold.replace('/', 'of')}" if variant.fold
                                                  else f"seed{variant.seed}")
            create_run(variant, folder / name)
            names.append(name)
        spec = EnsembleSpec(names, [1.0] * len(names), replaces)
        runs.write_json(folder / runs.ENSEMBLE_FILE, spec.to_json())
    member_metrics = {}
    for name in spec.members:
        member_dir = folder / name
        if read_state(member_dir, resuming=False).finished:
            member_metrics[name] = runs.read_json(member_dir / runs.METRICS_FILE, "Train the member again: delete "
                                                  "its folder's state.json, then resume.")
            continue
        logger.info("ensemble: training member %s", name)
        try:
            member_metrics[name] = resume_run(member_dir, verbose=verbose).metrics
        except UserError:
            if resume is None and not member_metrics and not (member_dir / runs.STATE_FILE).is_file():
                shutil.rmtree(folder, ignore_errors=True)  # nothing trained yet: leave no folder behind
            raise

    first = load_config(folder / spec.members[0] / runs.RECIPE_FILE)
    if first.fold:  # cross-validated members: each scores its own fold, never seen in its training
        probs, labels, cv, images = _out_of_fold(folder, spec.members, first)
    else:  # the ensemble on the validation split (members share data and seed of the split)
        splits = load_splits(first.data, first.val_fraction, first.seed)
        images = splits.val
        probs = predict_ensemble(load_models([folder]), images.decode_paths, images.is_jpeg)
        labels, cv = np.asarray(images.labels), None
    correct = probs.argmax(1) == labels
    metrics = {
        "val_accuracy": float(correct.mean()),
        "val_accuracy_ci95": list(accuracy_interval(int(correct.sum()), len(labels))),
        "n_val": int(len(labels)),
        "members": {name: m["val_accuracy"] for name, m in member_metrics.items()},
        "calibration": calibrate(probs, labels),
    }
    if cv is not None:
        metrics["cv"] = cv
    runs.write_json(folder / runs.METRICS_FILE, metrics)
    runs.write_text(folder / runs.REPORT_HTML_FILE, ensemble_page(
        spec.replaces or folder, metrics, classification_metrics(probs, labels, images.class_names), probs, labels,
        images, images.class_names))
    if spec.replaces is not None:
        swap_in(folder, spec.replaces, "ensemble")
        folder = folder.with_name(spec.replaces.name)
        runs.write_json(folder / runs.ENSEMBLE_FILE, dataclasses.replace(spec, replaces=None).to_json())
    logger.info("ensemble: validation accuracy %.4f (members: %s); written to %s", metrics["val_accuracy"],
                ", ".join(f"{k} {v:.4f}" for k, v in metrics["members"].items()), folder)
    return FinetuneResult(folder, metrics, members=metrics["members"])


def _out_of_fold(folder: Path, members: list[str], first: FinetuneConfig):
    """Every labelled image's probabilities from the member that validated on it; (probs, labels, the cv block,
    the images)."""
    from toolkit.predict.evaluate import classification_metrics
    from toolkit.predict.inference import predict_ensemble
    from toolkit.predict.members import load_models
    from toolkit.train.cross_validate import OutOfFold
    from toolkit.train.folds import assign_folds, held_out

    splits = load_splits(first.data, first.val_fraction, first.seed)
    pooled = splits.train + splits.val
    labels = np.asarray(pooled.labels)
    fold_of = assign_folds(labels, len(members), first.seed)
    per_head = np.zeros((len(labels), len(members), len(splits.class_names)))
    for k, name in enumerate(members):
        mine = np.flatnonzero(fold_of == k)
        part = pooled.take(mine)
        per_head[mine, k] = predict_ensemble(load_models([folder / name]), part.decode_paths, part.is_jpeg)
    held = held_out(fold_of, len(members))
    evaluated = OutOfFold(per_head[np.arange(len(labels)), fold_of], labels, held, len(members),
                          [runs.read_json(folder / name / runs.METRICS_FILE, "").get("finetune_best_epoch", 0)
                           for name in members], per_head)
    measured = classification_metrics(evaluated.probs, labels, splits.class_names)
    return evaluated.probs, labels, evaluated.summary(measured), pooled


def _ensemble_variants(config: FinetuneConfig, members: str) -> list[FinetuneConfig]:
    from toolkit import backbones as registry

    members = members.strip()
    if members.startswith("folds:"):  # --cv K with backbone stages training: member k validates on fold k
        count = int(members.split(":", 1)[1])
        return [dataclasses.replace(config, cv="off", fold=f"{k}/{count}") for k in range(1, count + 1)]
    if members.isdigit():
        count = int(members)
        if count < 2:
            raise UserError(f"An ensemble needs at least 2 members. Received: ensemble={members!r}")
        return [dataclasses.replace(config, seed=config.seed + i) for i in range(count)]
    names = [m.strip() for m in members.split(",") if m.strip()]
    if len(names) < 2:
        raise UserError(f"An ensemble needs at least 2 members. Received: ensemble={members!r}")
    for name in names:
        registry.get_spec(name)  # did-you-mean; a preset or file is loaded and checked
    return [prepare_config(dataclasses.replace(config, backbone=name, image_size=0 if name != config.backbone
                                               else config.image_size)) for name in names]
