"""Training configuration: defaults, TOML recipes, and command-line overrides.

Precedence: :class:`FinetuneConfig` defaults < recipe file < flags given on
the command line. A recipe is a TOML file (a name of one shipped in the
package, ``recipes/<name>.toml`` in the repository, shipped as ``toolkit/recipe_files``, or any path) whose top-level
keys are :class:`FinetuneConfig` fields and whose ``[augment]`` table holds
:class:`toolkit.config.settings.AugmentConfig` fields. The
resolved configuration is written into the run folder as ``recipe.toml``;
``--resume`` reads it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from toolkit.config.settings import AugmentConfig, FinetuneConfig, RecipeError

RECIPE_DIR = importlib.resources.files("toolkit") / "recipe_files"  # package data: works from an installed wheel
DEFAULT_RECIPE = "quick"


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
    what = "recipe" if where == "--recipe" else "key"
    return RecipeError(f"{where}: unknown {what} {key!r}.{hint} Allowed {what}s: {', '.join(sorted(allowed))}")


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


def recipe_names() -> list[str]:
    """The recipes shipped in the package (``--recipe NAME``)."""
    return sorted(p.name[: -len(".toml")] for p in RECIPE_DIR.iterdir() if p.name.endswith(".toml"))


def resolve_recipe_path(recipe: str | Path):
    """A recipe name (``quick``: package data, read with importlib.resources) or a path to a TOML file."""
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"Recipe file not found. Received: recipe={str(recipe)!r}")
        return path
    named = RECIPE_DIR / f"{recipe}.toml"
    if not named.is_file():
        raise _unknown_key("--recipe", str(recipe), recipe_names()) from None
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
    """Defaults, then the recipe, then the non-None ``overrides`` (augment keys as ``augment.<key>``).

    The overrides are checked like recipe keys (names with a did-you-mean, types), and the
    result is validated once.
    """
    values = read_recipe(recipe or DEFAULT_RECIPE)
    augment = values.pop("augment")
    given = {k: v for k, v in overrides.items() if v is not None}
    top = {k: v for k, v in given.items() if not k.startswith("augment.")}
    nested = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("augment.")}
    values.update(_check_table("setting", top, FinetuneConfig, skip=frozenset({"augment"})))
    augment.update(_check_table("setting augment.", nested, AugmentConfig))
    return FinetuneConfig(**values, augment=AugmentConfig(**augment))  # validated as it is built


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
        return config_from_dict(values)  # validated as it is built
    except (RecipeError, TypeError) as exc:
        raise RecipeError(f"{path}: {exc}") from None
