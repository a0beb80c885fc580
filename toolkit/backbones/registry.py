"""Backbone registry: one entry per backbone, with the metadata every other
part of the toolkit needs (timm / keras-hub style).

An entry says how to build the network, where its ImageNet weights come from,
what preprocessing is baked into it, its default input size, its ImageNet
top-1, which layer gives the last feature map, and its ordered stages (block
boundaries) -- the freeze policy unfreezes whole stages from the top down.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Callable, Literal

from toolkit.core.errors import UserError

if TYPE_CHECKING:  # keras is heavy; import it only where models are built
    import keras

__all__ = ["Stage", "BackboneSpec", "register", "get_spec", "names", "UnknownBackboneError"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A group of consecutive layers that is frozen or trained as one.

    ``prefix``: every layer of the stage has a name starting with it. The stage
    ends at the *last* layer (in the model's topological order) with that
    prefix, and everything after the previous stage's end belongs to it, so
    stages are found by name, never by a layer index. A backbone brought by the
    user names its stages' ends instead (``last``: the path of the stage's last
    unit, :mod:`toolkit.backbones.units`).
    """

    name: str
    prefix: str
    last: str | None = None


# builder(input_shape, include_top) builds the network. Returns the model (raw
# RGB in [0, 255] as input, preprocessing inside) and, for torch-ported
# families, the map {keras layer name: torch state_dict prefix} used to load
# their checkpoint. keras-imagenet builders also take weights= (Keras' own
# argument: None, "imagenet" or a weights file).
Builder = Callable[..., "tuple[keras.Model, dict[str, str] | None]"]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str
    builder: Builder
    weights_source: Literal["offline-torch", "keras-imagenet", "keras-hub", "keras-file"]
    preprocessing: str
    input_size: int
    imagenet_top1: float | None
    feature_layer: str | None  # None: the model output (include_top=False) is the feature map
    stages: tuple[Stage, ...]
    params: int  # without the ImageNet top; a test checks it against the built model
    checkpoint: str | None = None  # offline-torch: file name in toolkit.backbones.weights.KNOWN_CHECKPOINTS
    keras_weights_file: str | None = None  # keras-imagenet: cache file name of the no-top weights
    description: str = ""
    fixed_size: bool = False  # the network takes only input_size (a ViT's position embeddings): no whole-image views


_REGISTRY: dict[str, BackboneSpec] = {}


class UnknownBackboneError(UserError):
    pass


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; unknown names get a did-you-mean."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownBackboneError(
            f"Unknown backbone. Received: backbone={name!r}.{hint} "
            f"Available: {', '.join(_REGISTRY)} (see `toolkit backbones`)."
        ) from None


def stage_boundaries(layer_names: list[str], stages: tuple[Stage, ...]) -> list[int]:
    """Index (into ``layer_names``, topological order) of the last layer of each stage.

    The last stage always runs to the end of the model, so layers Keras names
    automatically after the final block (``activation_19``) still belong to it.
    Raises ValueError when a stage's prefix matches no layer or the stages are
    out of order -- a registry bug that must not silently freeze the wrong layers.
    """
    ends: list[int] = []
    for i, stage in enumerate(stages):
        if stage.last is not None:
            matches = [j for j, n in enumerate(layer_names) if n == stage.last]
        else:
            matches = [j for j, n in enumerate(layer_names) if n.startswith(stage.prefix)]
        if not matches:
            raise ValueError(f"stage {stage.name!r}: no layer name starts with {stage.last or stage.prefix!r}")
        end = len(layer_names) - 1 if i == len(stages) - 1 else matches[-1]
        if ends and end <= ends[-1]:
            raise ValueError(f"stage {stage.name!r} ends before the previous stage; stages out of order")
        ends.append(end)
    return ends
