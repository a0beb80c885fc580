"""How much of the backbone to fine-tune, decided from how much data there is.

The rule (``--freeze auto``) is a pure function of dataset statistics and the
backbone's stage list, stated here and in docs/guide/training.md:

==========================  =====================================
mean train images / class   backbone stages unfrozen (of S)
==========================  =====================================
< 200                       none: only the head trains
200 – 599                   the top third: ceil(S / 3)
600 – 1999                  the top two thirds: ceil(2 S / 3)
>= 2000                     all S, from the pretrained start
==========================  =====================================

Why images per class: fine-tuning a stage adds hundreds of thousands of
parameters; with a few dozen examples per class they memorise the training
set, while the ImageNet features with a trained linear head already separate
most photo classes (the PyTorch tutorial's ants/bees: 0.948 as fixed feature
extractor vs 0.935 fine-tuned). Stages are unfrozen from the top because the
top stages hold the most task-specific, least transferable features.

Manual modes: ``all`` (freeze the whole backbone: head only), ``none``
(freeze nothing), a fraction in [0, 1] of stages to unfreeze (rounded up to
whole stages), or a stage name: that stage and every stage above it train.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from toolkit.config.choices import parse_freeze

AUTO_RULE: tuple[tuple[float, float, str], ...] = (
    # (min mean images per class, fraction of stages unfrozen, words)
    (2000, 1.0, "all stages"),
    (600, 2 / 3, "top two thirds of the stages"),
    (200, 1 / 3, "top third of the stages"),
    (0, 0.0, "head only"),
)


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    mode: str
    unfrozen: int  # how many top stages train
    total: int
    stages: tuple[str, ...]  # all stage names, bottom to top
    reason: str

    @property
    def head_only(self) -> bool:
        return self.unfrozen == 0

    @property
    def first_trainable_stage(self) -> int:
        """Index of the lowest stage that trains (== total when none does)."""
        return self.total - self.unfrozen

    def describe(self) -> str:
        return f"{self.reason}; {self.unfrozen} of {self.total} stages unfrozen"


def _stages_for_fraction(fraction: float, total: int) -> int:
    return min(total, math.ceil(fraction * total - 1e-9))


def plan_freeze(freeze: str | float, train_images: int, num_classes: int, stages: Sequence[str],
                counted: str | None = None) -> FreezePlan:
    """Decide which stages train. Pure: same inputs, same plan.

    ``train_images`` / ``num_classes`` is the images per class the rule reads. Multi-label data passes the number of
    (image, label) pairs and says so in ``counted``, so that the rule reads the images per label.

    Raises:
        ValueError: an unknown mode or stage name, or a fraction outside [0, 1].
    """
    stages = tuple(stages)
    total = len(stages)
    kind, value = parse_freeze(freeze, stages)
    if kind == "auto":
        per_class = train_images / max(num_classes, 1)
        upper = None
        for threshold, fraction, words in AUTO_RULE:
            if per_class >= threshold:
                unfrozen = _stages_for_fraction(fraction, total)
                band = f"{threshold}-{upper - 1}" if upper else f">= {threshold}"
                if threshold == 0:
                    band = f"< {upper}"
                counts, per = (counted, "label") if counted else (f"{train_images} training images, {num_classes} "
                                                                  "classes", "class")
                reason = f"auto: {counts}, {per_class:.0f} per {per} (rule: {band} per {per}) → {words}"
                return FreezePlan("auto", unfrozen, total, stages, reason)
            upper = threshold
    if kind == "all":
        return FreezePlan("all", 0, total, stages, "freeze=all: whole backbone frozen, head only")
    if kind == "none":
        return FreezePlan("none", total, total, stages, "freeze=none: every stage fine-tuned")
    if kind == "stage":
        unfrozen = total - stages.index(value)
        return FreezePlan("stage", unfrozen, total, stages, f"freeze={value}: stage {value!r} and above train")
    fraction = value
    unfrozen = _stages_for_fraction(fraction, total)
    return FreezePlan("fraction", unfrozen, total, stages, f"freeze={fraction:g}: top {fraction:.0%} of the stages")


def apply_plan(backbone, stage_ends: Sequence[int], plan: FreezePlan, train_batchnorm: bool = False) -> dict[str, int]:
    """Set ``trainable`` on the backbone's units (:func:`toolkit.backbones.units.units`: its layers, a nested
    network's layers, a transformer's blocks) at stage boundaries (``stage_ends`` index the units).

    Units up to the end of the highest frozen stage are frozen; the rest train,
    except BatchNormalization layers (at any depth) unless ``train_batchnorm``. Keeping them
    ``trainable=False`` is what holds them in inference mode (ImageNet
    statistics) during fine-tuning: Keras 3 lets the outer ``training=True`` of
    ``fit`` override a nested ``backbone(x, training=False)`` call.
    Recompile the model after calling this: Keras reads ``trainable`` at compile.
    """
    import keras

    from toolkit.backbones.units import units

    backbone.trainable = True
    cut = -1 if plan.first_trainable_stage == 0 else stage_ends[plan.first_trainable_stage - 1]
    counts = {"frozen_layers": 0, "trainable_layers": 0}
    for index, unit in enumerate(units(backbone)):
        trains = index > cut
        unit.layer.trainable = trains
        if trains and not train_batchnorm:
            for layer in unit.layer._flatten_layers(include_self=True, recursive=True):  # BatchNorm inside a block too
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        if unit.layer.weights:
            trainable = trains and (train_batchnorm or not isinstance(unit.layer, keras.layers.BatchNormalization))
            counts["trainable_layers" if trainable else "frozen_layers"] += 1
    if plan.head_only:
        backbone.trainable = False
    return counts
