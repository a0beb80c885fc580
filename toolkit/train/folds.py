"""Cross-validation folds: what ``--cv`` means for a run, the stratified fold of every image, the training
mask of each fold head, and the out-of-fold probabilities. Pure functions on arrays (scikit-learn's
``StratifiedKFold`` assigns the folds); the heads themselves are trained in :mod:`toolkit.train.fold_heads`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from toolkit.config.choices import parse_cv
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)

AUTO_FOLDS = 5  # --cv auto: 5-fold (each head trains on 80 %, as today's holdout run does)
@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """How a run validates: ``folds`` = 0 for today's holdout, else K-fold cross-validation; and why."""

    folds: int
    reason: str

    @property
    def active(self) -> bool:
        return self.folds >= 2


def plan_folds(cv: str, class_counts: dict[str, int], head_only: bool, explicit_val: bool, cached: bool) -> FoldPlan:
    """Decide the folds from ``--cv`` and the data (``class_counts``: labelled images per class, train and val
    pooled). An explicit K larger than the smallest class is a user error; ``auto`` falls back to fewer folds."""
    mode = parse_cv(cv)
    smallest_class, smallest = min(class_counts.items(), key=lambda item: item[1])
    if mode == "off":
        return FoldPlan(0, "holdout validation (--cv off)")
    if mode == "auto":
        if not head_only:
            return FoldPlan(0, "holdout validation (--cv auto: the freeze plan trains backbone stages)")
        if explicit_val:
            return FoldPlan(0, "holdout validation (--cv auto: the data has its own validation split; --cv 5 pools it)")
        if not cached:
            return FoldPlan(0, "holdout validation (--cv auto: the head trains on images, not cached features)")
        folds = min(AUTO_FOLDS, smallest)
        if folds < 2:
            return FoldPlan(0, f"holdout validation (--cv auto: class {smallest_class!r} has {smallest} image)")
        if folds < AUTO_FOLDS:
            logger.warning("--cv auto: class %r has only %d images, so %d folds instead of %d", smallest_class,
                           smallest, folds, AUTO_FOLDS)
        return FoldPlan(folds, f"{folds}-fold cross-validation over all {sum(class_counts.values())} labelled images")
    if mode > smallest:
        raise UserError(f"--cv {mode}: class {smallest_class!r} has only {smallest} labelled images, and every fold "
                        f"needs one of each class; use --cv between 2 and {smallest}, or auto. Received: cv={cv!r}")
    if not head_only:  # toolkit.train.finetune routes these runs to K members (fold_members); not here
        raise UserError(f"--cv {mode} with a freeze plan that trains backbone stages trains K separate members: "
                        f"run it through toolkit finetune. Received: cv={cv!r}")
    if not cached:
        raise UserError(f"--cv {mode} trains its heads on cached features; the recipe turns the cache off or it "
                        f"would not fit. Use --cache-features auto, or --cv off. Received: cv={cv!r}")
    return FoldPlan(mode, f"{mode}-fold cross-validation over all {sum(class_counts.values())} labelled images")


def fold_members(cv: str, head_only: bool, pooled_counts: dict[str, int]) -> int:
    """K when ``--cv K`` asks for K-fold with a plan that trains backbone stages (K members, each validating on its
    own fold: an ensemble folder), else 0. ``auto`` leaves such runs on a holdout."""
    mode = parse_cv(cv)
    if head_only or not isinstance(mode, int):
        return 0
    plan_folds(cv, pooled_counts, True, True, True)  # the same range check as a head-only run
    return mode


def assign_folds(labels: Sequence[int], folds: int, seed: int, repeats: int = 1) -> np.ndarray:
    """The fold (0..folds-1) of every image, (images,) or for ``repeats`` > 1 (images, repeats): in each repeat
    stratified by class, shuffled (scikit-learn's ``RepeatedStratifiedKFold`` from ``seed``), every image in one
    fold."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    labels = np.asarray(labels)
    out = np.empty((len(labels), repeats), dtype=np.int32)
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    for index, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        out[held_out, index // folds] = index % folds
    return out[:, 0] if repeats == 1 else out


def held_out(fold_table: np.ndarray, folds: int) -> np.ndarray:
    """(images, heads) booleans: head ``r * folds + k`` (repeat r, fold k) never trains on the images of its fold.

    ``fold_table`` is (images,) or (images, repeats); a fold number >= ``folds`` belongs to no head.
    """
    table = np.asarray(fold_table).reshape(len(fold_table), -1)
    heads = np.arange(folds)
    return np.concatenate([table[:, [r]] == heads[None, :] for r in range(table.shape[1])], axis=1)


def training_mask(held: np.ndarray) -> np.ndarray:
    """(images, heads) loss weights: 1 where the head trains on the image, 0 on the images it holds out."""
    return (~np.asarray(held, dtype=bool)).astype(np.float32)


def out_of_fold(per_head: np.ndarray, held: np.ndarray) -> np.ndarray:
    """(images, classes): each image's probabilities averaged over the heads that never trained on it.

    ``per_head`` is (images, heads, classes). Images no head holds out (the training part of a holdout) get
    NaN rows; callers keep only held-out images.
    """
    held = np.asarray(held, dtype=bool)
    count = held.sum(axis=1, keepdims=True)
    total = np.einsum("ih,ihc->ic", held.astype(np.float64), per_head.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def holdout_folds(n: int, val_indices: Sequence[int]) -> np.ndarray:
    """A holdout as folds for one head: fold 0 the validation images, fold 1 (no head) the training images."""
    fold_of = np.ones(n, dtype=np.int32)
    fold_of[np.asarray(val_indices, dtype=int)] = 0
    return fold_of
