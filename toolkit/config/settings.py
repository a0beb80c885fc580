"""The training configuration, declared once: every setting with its default, help text and allowed values.

:class:`FinetuneConfig` (and its ``[augment]`` table, :class:`AugmentConfig`) is the one place a
setting exists. The recipes (TOML, :mod:`toolkit.config.recipes`) set its fields, and the command line's
flags are generated from its fields (:mod:`toolkit.cli.flags`): field ``head_epochs`` is
``--head-epochs``, ``augment.pca_sigma`` is ``--augment.pca-sigma``, each with the help text and
choices of its metadata. This module imports nothing heavy, so ``toolkit --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from toolkit.core.errors import UserError

CROP_MODES = ("random_resized", "resize_crop", "none")
CLASS_WEIGHT_MODES = ("auto", "on", "off")
CACHE_MODES = ("auto", "off")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")  # see toolkit.train.distribute
PREPROCESS_CHOICES = ("auto", "raw", "unit", "tf", "torch", "caffe")  # toolkit.backbones.preprocessing
# Bounds of the numbers that size tensors: past them a run only exhausts memory (a 30000 px image is a 10 GB
# batch) or stalls; the largest ImageNet backbones train at 600 px.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
MAX_BATCH_SIZE = 1024  # images per batch (per replica)
MAX_EPOCHS = 10_000
MAX_SEED = 2**32 - 1  # Keras' and NumPy's seeds


class RecipeError(UserError):
    pass


def setting(default: Any = None, help: str = "", choices: tuple[str, ...] | None = None, factory=None,
            metavar: str | None = None) -> Any:
    """A config field with its command-line help (and allowed values) in its metadata."""
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every op has its parameters here and can be switched off."""

    crop: str = setting("random_resized", "training crop: random_resized (Inception), resize_crop (resize 256, "
                        "random 224) or none (the evaluation centre crop)", CROP_MODES)
    crop_scale: tuple[float, float] = setting((0.25, 1.0), "random_resized: area fraction range (min max)")
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "random_resized: aspect ratio range (min max)")
    resize_crop_fraction: float = setting(0.875, "resize_crop: crop side / resized side (224/256 as in AlexNet)")
    flip: bool = setting(True, "mirror left-right with probability 1/2")
    colour_shift: float = setting(20.0, "largest per-channel RGB offset (0: off)")
    pca_sigma: float = setting(0.1, "std of AlexNet PCA colour alphas (0: off)")

    def validate(self) -> None:
        if self.crop not in CROP_MODES:
            raise RecipeError(f"Unknown crop mode. Received: crop={self.crop!r}; allowed: {', '.join(CROP_MODES)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise RecipeError(f"crop_scale must satisfy 0 < min <= max <= 1. Received: crop_scale={self.crop_scale!r}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise RecipeError(f"crop_ratio must satisfy 0 < min <= max. Received: crop_ratio={self.crop_ratio!r}")
        if not 0 < self.resize_crop_fraction <= 1:
            raise RecipeError(
                f"resize_crop_fraction must be in (0, 1]. Received: resize_crop_fraction={self.resize_crop_fraction!r}"
            )
        if self.colour_shift < 0:
            raise RecipeError(f"colour_shift must be >= 0. Received: colour_shift={self.colour_shift!r}")
        if self.pca_sigma < 0:
            raise RecipeError(f"pca_sigma must be >= 0. Received: pca_sigma={self.pca_sigma!r}")


@dataclasses.dataclass
class FinetuneConfig:
    """Every setting of a run. A config is validated once, when it is built (``__post_init__``)."""

    data: str = setting("", "dataset folder or CSV manifest", metavar="DIR|CSV")
    backbone: str = setting("mobilenet_v2", "a registry name (`toolkit backbones` lists them), keras_hub:PRESET, a "
                            "keras-hub preset folder, or a .keras file of a functional image model; for the last three "
                            "the freeze plan's stages are inferred: where the feature map's resolution halves "
                            "(convolutional networks) or the transformer blocks in 4 even groups (ViTs); `toolkit "
                            "backbones --check SPEC` shows them", metavar="NAME|PATH")
    backbone_preprocess: str = setting("auto", "how a preset or .keras backbone expects its pixels: auto (the "
                                       "preset's image converter, or raw when the model's first layer rescales), "
                                       "raw [0, 255], unit [0, 1], tf [-1, 1], torch (ImageNet mean/std), caffe (BGR "
                                       "minus mean)", metavar="|".join(PREPROCESS_CHOICES))
    weights: str = setting("imagenet", "'imagenet' (a preset's or file's own weights), 'none' for random init, or a "
                           "path to a Keras weights file (or torch .pth for mobilenet_v2 / efficientnet_lite*)")
    image_size: int = setting(0, "input size in pixels (0: the backbone's own)")
    batch_size: int = setting(32, "images per batch (per replica under a strategy)")
    freeze: str = setting("auto", "auto (from the data: docs/guide/training.md), all (head only), none (all stages train), a "
                          "fraction of stages to unfreeze in [0, 1], or a stage name (it and those above train)")
    # stage 1: the head on the frozen backbone
    head_epochs: int = setting(30, "maximum epochs of stage 1 (head)")
    head_lr: float = setting(1e-3, "Adam learning rate of stage 1")
    # stage 2: the unfrozen stages, when the freeze plan unfreezes any
    finetune_epochs: int = setting(10, "maximum epochs of stage 2 (unfrozen stages)")
    finetune_lr: float = setting(1e-4, "peak learning rate of stage 2 (top stage)")
    stage_lr_decay: float = setting(0.5, "each stage further down trains at this multiple of the one above")
    warmup_epochs: int = setting(1, "linear warm-up epochs of stage 2")
    train_batchnorm: bool = setting(False, "update BatchNorm statistics in unfrozen stages (default: inference mode)")
    # both stages
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    dropout: float = setting(0.2, "dropout before the class maps")
    bottleneck: int = setting(0, "channels of the head's 1x1 bottleneck conv (0: none)")
    class_weights: str = setting("auto", "inverse-frequency class weights (auto: on past 3:1 imbalance)",
                                 CLASS_WEIGHT_MODES)
    early_stopping_patience: int = setting(5, "epochs without a lower validation loss before a stage stops")
    cache_features: str = setting("auto", "train the head on cached backbone features", CACHE_MODES)
    cache_views: int = setting(4, "most views per image in the feature cache (one is the plain centre crop)")
    cache_view_budget: int = setting(4000, "views in all in the cache: large datasets get fewer per image")
    cv: str = setting("auto", "cross-validation folds: K >= 2 trains K fold heads on all labelled images (head-only "
                      "runs); auto: 5 when the plan is head only and the data has no validation split; off: holdout",
                      metavar="K|auto|off")
    cv_repeats: int = setting(3, "repeats of the K-fold split with other shuffles: the model averages K x repeats "
                              "heads; the estimate scores each image by as many heads that never saw it (the split "
                              "repeated K x repeats times, the extra heads not shipped)")
    fold: str = setting("", "validate on fold k of K of all labelled images (k/K, 1 <= k <= K; the split of --cv K, "
                        "with the run's seed): what each member of a cross-validated ensemble trains with", metavar="k/K")
    val_fraction: float = setting(0.2, "held-out fraction when the data has no validation split, in (0, 1)")
    crop_fraction: float = setting(0.875, "evaluation centre crop: crop side / shorter image side")
    seed: int = setting(0, "seed for the split, augmentation and initialisation (>= 0)")
    mixed_precision: bool = setting(False, "float16 compute (GPUs)")
    min_accuracy: float | None = setting(None, "exit with status 3 if the final validation accuracy is below this")
    albumentations: str = setting("", "an albumentations Compose saved with albumentations.save (JSON or YAML): "
                                  "training views come from it, in worker processes, instead of [augment]")
    strategy: str = setting("auto", "tf.distribute strategy: auto (mirrored over >1 GPU, else default), default (one "
                            "device), mirrored (all local GPUs), multi-worker (one process per machine, configured "
                            "by TF_CONFIG; needs --out on a shared filesystem). Learning rates scale linearly with "
                            "the replicas", STRATEGIES)
    data_service: str = setting("", "decode and augment training images on tf.data service workers (`toolkit "
                                "data-service`) registered with this dispatcher", metavar="grpc://HOST:PORT")
    augment: AugmentConfig = setting(factory=AugmentConfig, help="training augmentation ([augment] in a recipe)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from toolkit import backbones
        from toolkit.backbones.external import parse_source

        try:
            external = parse_source(self.backbone, strict=False) is not None  # loaded when a run prepares
        except UserError as exc:
            raise RecipeError(str(exc)) from None
        if not external:
            backbones.get_spec(self.backbone)  # did-you-mean on a bad name
            if self.backbone_preprocess != "auto":
                raise RecipeError(f"backbone_preprocess applies to a backbone brought as a keras-hub preset or a "
                                  f".keras file; {self.backbone!r} holds its own. Received: "
                                  f"backbone_preprocess={self.backbone_preprocess!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{f.name} must be a finite number. Received: {f.name}={value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise RecipeError(f"seed must be an integer in [0, {MAX_SEED}] (2**32 - 1). Received: seed={self.seed!r}")
        for name in ("batch_size", "head_epochs", "cache_views", "cache_view_budget", "cv_repeats"):
            _positive_int(self, name)
        for name in ("finetune_epochs", "warmup_epochs", "early_stopping_patience", "bottleneck", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise RecipeError(f"{name} must be an integer >= 0. Received: {name}={value!r}")
        check_image_size(self.image_size, "image_size", allow_zero=True)
        for name, most in (("batch_size", MAX_BATCH_SIZE), ("head_epochs", MAX_EPOCHS), ("finetune_epochs", MAX_EPOCHS),
                           ("warmup_epochs", MAX_EPOCHS), ("early_stopping_patience", MAX_EPOCHS),
                           ("cache_views", 100), ("cv_repeats", 100), ("bottleneck", 65_536),
                           ("cache_view_budget", 10_000_000)):
            if getattr(self, name) > most:
                raise RecipeError(f"{name} must be at most {most}. Received: {name}={getattr(self, name)!r}")
        for name in ("head_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{name} must be > 0. Received: {name}={getattr(self, name)!r}")
        for name, lo, hi in (("label_smoothing", 0, 1), ("dropout", 0, 1)):
            value = getattr(self, name)
            if not lo <= value < hi:
                raise RecipeError(f"{name} must be in [{lo}, {hi}). Received: {name}={value!r}")
        if not 0 < self.val_fraction < 1:
            raise RecipeError(f"val_fraction must be in (0, 1): both sides of the split need images. "
                              f"Received: val_fraction={self.val_fraction!r}")
        if not 0 < self.crop_fraction <= 1:
            raise RecipeError(f"crop_fraction must be in (0, 1]. Received: crop_fraction={self.crop_fraction!r}")
        if not 0 < self.stage_lr_decay <= 1:
            raise RecipeError(f"stage_lr_decay must be in (0, 1]. Received: stage_lr_decay={self.stage_lr_decay!r}")
        from toolkit.config.choices import parse_cv, parse_fold

        try:
            parse_cv(self.cv)
            parse_fold(self.fold)
        except UserError as exc:
            raise RecipeError(str(exc)) from None
        _choice(self, "class_weights", CLASS_WEIGHT_MODES)
        _choice(self, "backbone_preprocess", PREPROCESS_CHOICES)
        _choice(self, "cache_features", CACHE_MODES)
        _choice(self, "strategy", STRATEGIES)
        if self.data_service:
            if not self.data_service.startswith("grpc://") or ":" not in self.data_service[len("grpc://"):]:
                raise RecipeError(f"data_service must be the dispatcher's grpc://host:port. "
                                  f"Received: data_service={self.data_service!r}")
            if self.albumentations:
                raise RecipeError("data_service runs TensorFlow ops only; albumentations (Python) cannot run on its "
                                  f"workers. Received: data_service={self.data_service!r}, "
                                  f"albumentations={self.albumentations!r}; drop one of them")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise RecipeError(f"min_accuracy must be in [0, 1]. Received: min_accuracy={self.min_accuracy!r}")
        from toolkit.config.choices import parse_freeze

        if not external:  # a preset's or file's stages are known once it is loaded (toolkit.train.freeze)
            parse_freeze(self.freeze, [s.name for s in backbones.get_spec(self.backbone).stages])
        try:
            self.augment.validate()
        except RecipeError as exc:
            raise RecipeError(f"[augment] {exc}") from None


def check_image_size(value, name: str = "image_size", allow_zero: bool = False) -> None:
    """An input size in pixels: [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE] (or 0, the backbone's own, where allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and (
            MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE or (allow_zero and value == 0)):
        return
    zero = "0 (the backbone's own) or " if allow_zero else ""
    raise RecipeError(f"{name} must be {zero}an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels. "
                      f"Received: {name}={value!r}")


def _positive_int(config: FinetuneConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecipeError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _choice(config: FinetuneConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise RecipeError(f"Unknown {name}. Received: {name}={value!r}; allowed: {', '.join(allowed)}")
