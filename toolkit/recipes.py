"""Training configuration: defaults, TOML recipes, and command-line overrides.

Precedence: :class:`FinetuneConfig` defaults < recipe file < flags given on
the command line. A recipe is a TOML file (``recipes/<name>.toml`` or any
path) whose top-level keys are :class:`FinetuneConfig` fields and whose
``[augment]`` table holds :class:`toolkit.augment.AugmentConfig` fields. The
resolved configuration is written into the run folder as ``recipe.toml``;
``--resume`` reads it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from toolkit.augment import AugmentConfig
from toolkit.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = "quick"
CLASS_WEIGHT_MODES = ("auto", "on", "off")
CACHE_MODES = ("auto", "off")
STRATEGIES = ("auto", "default", "mirrored", "multi-worker")  # see toolkit.distribute


class RecipeError(UserError):
    pass


@dataclasses.dataclass
class FinetuneConfig:
    data: str = ""
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"  # "imagenet", "none" (random init) or a weights file
    image_size: int = 0  # 0: the backbone's own input size
    batch_size: int = 32
    freeze: str = "auto"
    # stage 1: the head on the frozen backbone
    head_epochs: int = 30
    head_lr: float = 1e-3
    # stage 2: the unfrozen stages, when the freeze plan unfreezes any
    finetune_epochs: int = 10
    finetune_lr: float = 1e-4
    stage_lr_decay: float = 0.5  # each stage further down trains at this multiple of the one above
    warmup_epochs: int = 1
    train_batchnorm: bool = False  # False: BatchNorm stays in inference mode, also in unfrozen stages
    # both stages
    label_smoothing: float = 0.1
    dropout: float = 0.2
    bottleneck: int = 0  # channels of NIN's 1x1 bottleneck conv; 0 for none
    class_weights: str = "auto"  # auto: on past 3:1 imbalance
    early_stopping_patience: int = 5
    cache_features: str = "auto"  # auto: train the head on cached backbone features
    cache_views: int = 4  # most views per image in the cache (one is the plain centre crop)
    cache_view_budget: int = 4000  # views in all: large datasets need fewer views per image
    val_fraction: float = 0.2
    crop_fraction: float = 0.875
    seed: int = 0
    mixed_precision: bool = False
    min_accuracy: float | None = None
    # An albumentations Compose saved with albumentations.save(compose, path) (JSON or YAML). When set,
    # training views come from it, run in worker processes, instead of the [augment] ops.
    albumentations: str = ""
    # Scale-out (toolkit.distribute): batch_size is per replica; the learning rates are scaled by the replicas.
    strategy: str = "auto"
    # grpc://host:port of a tf.data service dispatcher: training images are decoded and augmented on its workers.
    data_service: str = ""
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    def validate(self) -> None:
        from toolkit import backbones

        backbones.get_spec(self.backbone)  # did-you-mean on a bad name
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{f.name} must be a finite number. Received: {f.name}={value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"seed must be an integer >= 0. Received: seed={self.seed!r}")
        for name in ("batch_size", "head_epochs", "cache_views", "cache_view_budget"):
            _positive_int(self, name)
        for name in ("finetune_epochs", "warmup_epochs", "early_stopping_patience", "bottleneck", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise RecipeError(f"{name} must be an integer >= 0. Received: {name}={value!r}")
        if self.image_size and self.image_size < 32:
            raise RecipeError(f"image_size must be 0 (backbone default) or >= 32. Received: image_size={self.image_size!r}")
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
        _choice(self, "class_weights", CLASS_WEIGHT_MODES)
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
        if self.albumentations and not Path(self.albumentations).is_file():
            raise RecipeError(f"albumentations file not found. Received: albumentations={self.albumentations!r}; "
                              "save a Compose with albumentations.save(compose, path)")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise RecipeError(f"min_accuracy must be in [0, 1]. Received: min_accuracy={self.min_accuracy!r}")
        from toolkit.freeze import plan_freeze

        plan_freeze(self.freeze, 1, 1, [s.name for s in backbones.get_spec(self.backbone).stages])
        try:
            self.augment.validate()
        except ValueError as exc:
            raise RecipeError(f"[augment] {exc}") from None


def _positive_int(config: FinetuneConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecipeError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _choice(config: FinetuneConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise RecipeError(f"Unknown {name}. Received: {name}={value!r}; allowed: {', '.join(allowed)}")


# Run control, not recipe content.
NOT_IN_RECIPE = frozenset({"data"})


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _accepts(annotation: Any, value: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(_accepts(a, v) for a, v in zip(args, value))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _coerce(annotation: Any, value: Any) -> Any:
    if typing.get_origin(annotation) is tuple and isinstance(value, list):
        return tuple(float(v) for v in value)
    if annotation is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and float in typing.get_args(annotation) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _unknown_key(where: str, key: str, allowed: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{where}: unknown key {key!r}.{hint} Allowed keys: {', '.join(sorted(allowed))}")


def _check_table(where: str, table: dict[str, Any], cls, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    types_ = {k: v for k, v in _field_types(cls).items() if k not in skip}
    out = {}
    for key, value in table.items():
        if key not in types_:
            raise _unknown_key(where, key, list(types_))
        if not _accepts(types_[key], value):
            raise RecipeError(f"{where}: wrong type for {key}. Received: {key}={value!r}; expected {types_[key]}")
        out[key] = _coerce(types_[key], value)
    return out


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe name (``quick``) or a path to a TOML file."""
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"Recipe file not found. Received: recipe={str(recipe)!r}")
        return path
    named = RECIPE_DIR / f"{recipe}.toml"
    if not named.is_file():
        available = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
        raise _unknown_key("recipe", str(recipe), available) from None
    return named


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """Parse and check a recipe: {field: value}, with ``augment`` as a dict."""
    path = resolve_recipe_path(recipe)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    augment = raw.pop("augment", {})
    if not isinstance(augment, dict):
        raise RecipeError(f"{path}: 'augment' must be a table ([augment]). Received: augment={augment!r}")
    out = _check_table(str(path), raw, FinetuneConfig, skip=NOT_IN_RECIPE | {"augment"})
    out["augment"] = _check_table(f"{path} [augment]", augment, AugmentConfig)
    return out


def build_config(recipe: str | Path | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """Defaults, then the recipe, then the non-None ``overrides`` (augment keys as ``augment.<key>``)."""
    values = read_recipe(recipe or DEFAULT_RECIPE)
    augment = values.pop("augment")
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("augment."):
            augment[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    config = FinetuneConfig(**values, augment=AugmentConfig(**augment))
    config.validate()
    return config


def config_to_dict(config: FinetuneConfig) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["augment"].items()}
    return out


def config_from_dict(values: dict[str, Any]) -> FinetuneConfig:
    values = dict(values)
    augment = _check_table("run recipe [augment]", values.pop("augment", {}), AugmentConfig)
    checked = _check_table("run recipe", values, FinetuneConfig, skip=frozenset({"augment"}))
    return FinetuneConfig(**checked, augment=AugmentConfig(**augment))


def load_config(path: Path) -> FinetuneConfig:
    """A run folder's ``recipe.toml``, read and validated; a damaged one is a user error naming it."""
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be read ({exc}); restore it, or start a new run with --out") from None
    try:
        config = config_from_dict(values)
        config.validate()
    except (RecipeError, TypeError) as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return config
