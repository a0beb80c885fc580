"""The run in progress: its folder, its checked config and data, and its typed, resumable state.

This module sits below every training piece (stages, feature cache, data, ensembles, the
``finetune`` wiring), which all take a :class:`Run`. Atomic writes, markers and file names live
in :mod:`toolkit.core.runs`, the leaf below it.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from toolkit.config.recipes import config_to_dict
from toolkit.config.settings import FinetuneConfig
from toolkit.core import outputs, runs
from toolkit.core.errors import UserError
from toolkit.data.datasets import DatasetSplits, check_trainable, load_splits
from toolkit.data.discovery import check_source

logger = logging.getLogger(__name__)


class Stage(str, enum.Enum):
    """The two training stages; their values name their checkpoints and state entries."""

    HEAD = "head"
    FINETUNE = "finetune"
    CV = "cv"  # the K fold heads of a cross-validated run, trained together (toolkit.train.fold_heads)

    def best_weights(self, folder: Path) -> Path:
        return folder / f"{self.value}.best.weights.h5"

    def last_weights(self, folder: Path) -> Path:
        return folder / f"{self.value}.last.weights.h5"


class AccuracyGateError(RuntimeError):
    """The final validation accuracy is below ``--min-accuracy`` (the run is still saved)."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


@dataclasses.dataclass
class FinetuneResult:
    """What a finished run (or ensemble) gives back: its folder, its metrics, its freeze plan (None for an
    ensemble, whose members each have one) and, for an ensemble, each member's validation accuracy."""

    run_dir: Path
    metrics: dict[str, Any]
    plan: Any = None  # toolkit.train.freeze.FreezePlan
    members: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageState:
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0  # epochs since the best one
    epochs_done: int = 0
    done: bool = False
    # Stage.CV: the same per fold head (best_loss is then their mean, best_epoch the latest, wait the least)
    fold_best_loss: list[float] = dataclasses.field(default_factory=list)
    fold_best_epoch: list[int] = dataclasses.field(default_factory=list)
    fold_wait: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunState:
    """``state.json``: per stage, the epochs done and the early-stopping state; timings; where it ends up."""

    stages: dict[Stage, StageState] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    finished: bool = False
    replaces: outputs.Replacement | None = None  # the sibling this run replaces when it finishes (--overwrite)

    def stage(self, stage: Stage) -> StageState:
        return self.stages.setdefault(stage, StageState())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {s.value: dataclasses.asdict(v) for s, v in self.stages.items()}
        out["timings"] = self.timings
        if self.finished:
            out["finished"] = True
        if self.replaces:
            out["replaces"] = self.replaces.to_json()
        return out

    @classmethod
    def from_json(cls, values: dict[str, Any], path: Path) -> "RunState":
        """The state read from ``path``, checked: what it names to replace must be its folder's own sibling."""
        try:
            stages = {s: StageState(**values[s.value]) for s in Stage if s.value in values}
            timings = {str(k): float(v) for k, v in dict(values.get("timings", {})).items()}
            for stage in stages.values():
                _check_stage_state(stage, path)
        except (TypeError, AttributeError, ValueError) as exc:
            raise UserError(f"{path} is corrupt ({exc}). Restore it, or start a new run with --out.") from None
        replaces = values.get("replaces")
        if replaces is not None:
            replaces = outputs.Replacement.from_json(replaces, path.parent, path)
        return cls(stages, timings, values.get("finished") is True, replaces)


def _check_stage_state(stage: StageState, path: Path) -> None:
    """Refuse epoch counts and losses that no run writes (they index checkpoints and decide early stopping)."""
    for name in ("best_epoch", "wait", "epochs_done"):
        value = getattr(stage, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000:
            raise ValueError(f"{name} must be an epoch count, not {value!r}")
    if not isinstance(stage.best_loss, (int, float)) or math.isnan(stage.best_loss):
        raise ValueError(f"best_loss must be a number, not {stage.best_loss!r}")
    if not isinstance(stage.history, list) or not isinstance(stage.done, bool):
        raise ValueError("history must be a list and done true or false")


class Run:
    """One fine-tuning run: its folder, its config, its data and its resumable state."""

    def __init__(self, config: FinetuneConfig, run_dir: Path, state: RunState, verbose: int, scale, work_dir: Path,
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
        self.closers: list = []  # worker pools and private folders to clean up at the end

    def save_state(self) -> None:
        runs.write_json(self.dir / runs.STATE_FILE, self.state.to_json())

    def timed(self, key: str, start: float) -> None:
        self.state.timings[key] = round(self.state.timings.get(key, 0.0) + time.perf_counter() - start, 2)

    def close(self) -> None:
        for close in self.closers:
            close()

    @property
    def final_dir(self) -> Path:
        """Where the run ends up: the folder it replaces, when it was trained beside it (``--overwrite``)."""
        return self.run_dir.with_name(self.state.replaces.name) if self.state.replaces else self.run_dir

    def finish_replacement(self) -> Path:
        """Swap a finished replacement in for the folder it replaces (chief only); returns the final folder."""
        final = self.final_dir
        if self.state.replaces and self.scale.is_chief:
            swap_in(self.run_dir, self.state.replaces, "run")
            self.state.replaces = None
            runs.write_json(final / runs.STATE_FILE, self.state.to_json())  # in place: nothing left to replace
            logger.info("finetune: %s replaced by the new run", final)
        return final

    def remove_if_untrained(self, fresh: bool) -> None:
        """A new run that failed on its input before finishing an epoch leaves no folder behind.

        (What can be checked is checked before the folder exists; this catches the rest, such as
        a backbone whose weights cannot be had here.) The folder is the toolkit's own, just made.
        """
        trained = any(s.epochs_done for s in self.state.stages.values())
        if fresh and self.scale.is_chief and not trained:
            shutil.rmtree(self.run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- before a run exists


def prepare_config(config: FinetuneConfig) -> FinetuneConfig:
    """The config of a new run with its inputs checked and its data path made absolute (runs resume from
    anywhere). The config itself was validated when it was built."""
    if not config.data:
        raise UserError("finetune needs --data (or --resume RUN). Received: data=''")
    check_source(config.data)
    if config.albumentations and not Path(config.albumentations).is_file():
        raise UserError(f"albumentations file not found. Received: albumentations={config.albumentations!r}; save a "
                        "Compose with albumentations.save(compose, path)")
    absolute = {"data": str(Path(config.data).resolve())}
    if config.albumentations:
        absolute["albumentations"] = str(Path(config.albumentations).resolve())
    from toolkit.backbones import external

    if external.parse_source(config.backbone) is not None:  # a preset or file: loaded and checked now, recorded
        name = external.canonical(config.backbone)  # by its absolute path, with the size it trains at (the run's
        absolute["backbone"] = name                  # model then needs nothing of it)
        absolute["image_size"] = external.check(name, config.backbone_preprocess, config.image_size)
    changed = {k: v for k, v in absolute.items() if getattr(config, k) != v}
    return dataclasses.replace(config, **changed) if changed else config  # a new config is validated again


def load_checked_splits(config: FinetuneConfig, progress: bool) -> DatasetSplits:
    """The run's data, refused (before any folder exists) when it cannot train and validate."""
    splits = load_splits(config.data, config.val_fraction, config.seed, progress=progress)
    if config.fold:
        splits = fold_split(splits, config.fold, config.seed)
    for warning in check_trainable(splits):
        logger.warning("data: %s", warning)
    return splits


def fold_split(splits: DatasetSplits, fold: str, seed: int) -> DatasetSplits:
    """``splits`` with train and val pooled, then fold k of K (``--fold k/K``, :func:`toolkit.train.folds.assign_folds`
    with ``seed``) as the validation split and the other folds as training."""
    import numpy as np

    from toolkit.config.choices import parse_fold
    from toolkit.train.folds import assign_folds

    k, folds = parse_fold(fold)
    pooled = splits.train + splits.val
    fold_of = assign_folds(pooled.labels, folds, seed)
    return dataclasses.replace(splits, train=pooled.take(np.flatnonzero(fold_of != k)),
                               val=pooled.take(np.flatnonzero(fold_of == k)),
                               val_source=f"fold {k + 1} of {folds} of all labelled images (cross-validation, seed {seed})")


def create_run(config: FinetuneConfig, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Make (and mark) the run folder and write its resolved recipe; training it is ``resume``.

    Replacing an earlier run (``overwrite``), the folder made is a sibling that takes its place
    only when the new run finishes (its ``state.json`` records which folder it replaces).
    """
    target = Path(out or runs.default_run_dir(config.backbone))
    run_dir, replaces = outputs.prepare_run_dir(target, overwrite, "run", {"--data": [config.data]})
    runs.write_text(run_dir / runs.RECIPE_FILE, runs.to_toml(config_to_dict(config)))
    if replaces is not None:
        runs.write_json(run_dir / runs.STATE_FILE, RunState(replaces=replaces).to_json())
        logger.info("finetune: the new run trains in %s and replaces %s only when it finishes (an interrupted one "
                    "continues with --resume %s)", run_dir, target, run_dir)
    return run_dir


def swap_in(stage: Path, replaces: outputs.Replacement, kind: str) -> None:
    """Put the finished ``stage`` in the place of the sibling it was created to replace (checked again now)."""
    outputs.replace_dir(stage, stage.with_name(replaces.name), kind, replaces.id,
                        then=f"The finished {kind} stays in {stage}; once that folder holds only what toolkit wrote, "
                             f"`toolkit finetune --resume {stage}` puts it in its place.")


# ----------------------------------------------------------------------------- an existing run


def read_state(run_dir: Path, resuming: bool) -> RunState:
    """A run folder's ``state.json``; missing is fine only while no checkpoint exists."""
    path = run_dir / runs.STATE_FILE
    if not path.is_file():
        checkpoints = sorted(p.name for p in run_dir.glob("*.weights.h5"))
        if checkpoints:
            raise UserError(f"{path} is missing, so the checkpoints ({', '.join(checkpoints)}) cannot be matched to "
                            "an epoch. Restore state.json, or start a new run with --out.")
        if resuming:
            logger.info("resume: no epoch of %s had finished; starting from epoch 1", run_dir)
        return RunState()
    values = runs.read_json(path, "It records the finished epochs: restore it, or start a new run with --out.")
    if not isinstance(values, dict):
        raise UserError(f"{path} is corrupt (not a JSON object). Restore it, or start a new run with --out.")
    return RunState.from_json(values, path)


def resumed_splits(run_dir: Path, config: FinetuneConfig, progress: bool) -> DatasetSplits:
    """The data of a run being resumed; its classes must be the ones the run was started with."""
    try:
        splits = load_checked_splits(config, progress)
    except UserError as exc:
        raise UserError(f"{exc} (--data as recorded in {run_dir / runs.RECIPE_FILE})") from None
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


def worker_dir(run_dir: Path, index: int, resuming: bool) -> Path:
    """A non-chief worker's private folder; on resume it starts from the run's checkpoints."""
    work = Path(tempfile.mkdtemp(prefix=f"toolkit-worker{index}-"))
    if resuming:
        for path in run_dir.iterdir():
            if path.is_file() and (path.name.endswith(".weights.h5") or path.name in (runs.STATE_FILE, runs.PCA_FILE)):
                shutil.copy2(path, work / path.name)
    return work
