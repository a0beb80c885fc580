"""Command-line flags generated from the configuration's own fields (as Lightning CLI does).

Every field of :class:`toolkit.config.settings.FinetuneConfig` becomes ``--field-name`` (every field of its
``augment`` table ``--augment.field-name``) with the type, help text and allowed values of its
declaration, so a setting is declared once. Besides: ``--set KEY=VALUE`` for any key (dotted for
``augment.``, the value read as a TOML value, as big_vision's ``--config.x=...``), and the aliases
users reach for first: ``--epochs``, ``--lr``, ``--img-size``. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import tomllib
import typing
from typing import Any

from toolkit.config.settings import AugmentConfig, FinetuneConfig
from toolkit.core.errors import UserError

AUGMENT = "augment"
# Flags of the finetune command that are not settings.
NOT_SETTINGS = frozenset({"data"})


def _flag(name: str, prefix: str = "") -> str:
    return f"--{prefix}{name.replace('_', '-')}"


def _add_field(group, field: dataclasses.Field, annotation: Any, shown: Any, prefix: str = "") -> None:
    """The flag of one field; ``shown`` is the value a run without the flag uses (the default recipe's)."""
    meta = field.metadata
    default = tuple(shown) if isinstance(shown, list) else shown
    kwargs: dict[str, Any] = {"dest": f"{prefix}{field.name}", "default": None}
    help_text = meta.get("help", "")
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is tuple:
        kwargs.update(nargs=len(typing.get_args(annotation)), type=float, metavar=("MIN", "MAX"))
    elif annotation is int:
        kwargs["type"] = int
    elif annotation is float or float in typing.get_args(annotation):
        kwargs["type"] = float
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if default not in (None, ""):
        help_text += f" (default: {default!r})"
    group.add_argument(_flag(field.name, prefix), help=help_text, **kwargs)


def default_values() -> dict[str, Any]:
    """What a run started without flags uses: every field's default, with the default recipe's values on top
    (``augment`` a dict). Read from the TOML alone: nothing heavy is imported."""
    from toolkit.config.recipes import DEFAULT_RECIPE, read_recipe

    recipe = read_recipe(DEFAULT_RECIPE)
    values = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name != AUGMENT}
    augment = {f.name: f.default for f in dataclasses.fields(AugmentConfig)}
    augment.update(recipe.pop(AUGMENT, {}))
    return values | recipe | {AUGMENT: augment}


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration field (defaults None: the recipe's value stands unless a flag is given)."""
    from toolkit.config.recipes import DEFAULT_RECIPE

    shown = default_values()
    hints = typing.get_type_hints(FinetuneConfig)
    group = parser.add_argument_group(f"settings (each overrides the recipe's value; the defaults shown are what runs "
                                      f"without --recipe: the {DEFAULT_RECIPE!r} recipe's values, else the field's own)")
    for field in dataclasses.fields(FinetuneConfig):
        if field.name not in NOT_SETTINGS and field.name != AUGMENT:
            _add_field(group, field, hints[field.name], shown[field.name])
    group = parser.add_argument_group("augmentation settings ([augment] of the recipe)")
    augment_hints = typing.get_type_hints(AugmentConfig)
    for field in dataclasses.fields(AugmentConfig):
        _add_field(group, field, augment_hints[field.name], shown[AUGMENT][field.name], prefix=f"{AUGMENT}.")
    group = parser.add_argument_group("shortcuts")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="set any recipe key, e.g. --set head_epochs=5 --set augment.pca_sigma=0.2 (VALUE is read "
                       "as TOML: numbers, true/false, [0.5, 1.0], or a string)")
    group.add_argument("--epochs", type=int, default=None, help="the maximum epochs of both stages "
                       "(--head-epochs and --finetune-epochs)")
    group.add_argument("--lr", type=float, default=None, help="learning rate of stage 1 (--head-lr); stage 2's "
                       "(--finetune-lr) keeps its ratio to it from the recipe")
    group.add_argument("--img-size", dest="image_size_alias", type=int, default=None, help="alias of --image-size")


def setting_keys() -> list[str]:
    """Every key a setting can be given by: ``head_epochs``, ``augment.pca_sigma``, ..."""
    top = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != AUGMENT]
    return top + [f"{AUGMENT}.{f.name}" for f in dataclasses.fields(AugmentConfig)]


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["augment.pca_sigma=0.2", ...]`` → ``{"augment.pca_sigma": 0.2}``; unknown keys get a did-you-mean."""
    keys = setting_keys()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE. Received: --set {item!r}; e.g. --set augment.pca_sigma=0.2")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"--set: unknown key {key!r}.{hint} Keys: {', '.join(keys)}")
        try:
            out[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()  # a bare word: a string
    return out


def overrides_from_args(args: argparse.Namespace, recipe_values: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line: aliases first, then --set, then the flags themselves."""
    out: dict[str, Any] = {}
    if args.epochs is not None:
        out.update(head_epochs=args.epochs, finetune_epochs=args.epochs)
    if args.lr is not None:
        defaults = FinetuneConfig.__dataclass_fields__
        head = recipe_values.get("head_lr", defaults["head_lr"].default)
        tuned = recipe_values.get("finetune_lr", defaults["finetune_lr"].default)
        out.update(head_lr=args.lr, finetune_lr=args.lr * tuned / head)
    if args.image_size_alias is not None:
        out["image_size"] = args.image_size_alias
    out.update(parse_set(args.set))
    for key in setting_keys():
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def given_settings(args: argparse.Namespace) -> list[str]:
    """The setting flags given on the command line (their names as typed)."""
    names = [_flag(k) if not k.startswith(f"{AUGMENT}.") else f"--{k.replace('_', '-')}" for k in setting_keys()
             if getattr(args, k, None) is not None]
    names += [flag for flag, value in (("--epochs", args.epochs), ("--lr", args.lr), ("--img-size", args.image_size_alias))
              if value is not None]
    return names + (["--set"] if args.set else [])


def subcommand(sub, name: str, func, help: str, show_defaults: bool = False) -> argparse.ArgumentParser:
    """A sub-command's parser, which runs ``func(args)``; its ``--help`` description is ``func``'s docstring."""
    kwargs = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter} if show_defaults else {}
    parser = sub.add_parser(name, help=help, description=" ".join(inspect.getdoc(func).split()), **kwargs)
    parser.set_defaults(func=func)
    # -q / -v after the command too (`toolkit finetune ... -q`); absent there, the value before it stands
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as toolkit -v")
    noise.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as toolkit -q")
    return parser


class SuggestingParser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown-flag error says which known flag was probably meant, with the usage of the
    sub-command it was given to (``toolkit finetune --head-epoks 3`` shows finetune's usage, not the top level's)."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = next((action.choices.get(getattr(parsed, action.dest, None)) for action in self._actions
                           if isinstance(action, argparse._SubParsersAction)), None)
            (chosen or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str):
        if "unrecognized arguments:" in message:
            unknown = message.split("unrecognized arguments:", 1)[1].split()
            known = sorted({s for p in _parsers(self) for s in p._option_string_actions})
            hints = []
            for word in unknown:
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and all its sub-command parsers."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out
