"""Backbones the user brings: a keras-hub preset or a Keras model file, as ``--backbone`` (or ``backbone=``).

Three forms besides the registry's names (:func:`parse_source`):

* ``keras_hub:<preset>``: a preset keras-hub downloads where the network allows (``keras_hub:resnet_50_imagenet``);
* a local keras-hub preset folder (what ``Backbone.save_to_preset`` writes: ``config.json``, ``model.weights.h5``);
* a ``.keras`` file of a functional image model whose output is a spatial feature map.

Each becomes a model that takes raw RGB in [0, 255] like the registry's (:func:`build`): a preset's own image
converter (its scale and offset; the toolkit's pipeline does the resizing) or the stated ``backbone_preprocess`` is
a layer in front, and a transformer's token sequence is reshaped into its patch grid, so the Network-in-Network head,
the feature cache, class-activation maps and every export work unchanged. Its metadata (:func:`spec`) is read off the
built network: input size, parameters, and the stages the freeze plan counts (:mod:`toolkit.backbones.units`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from toolkit.backbones import preprocessing
from toolkit.backbones.registry import BackboneSpec
from toolkit.core.errors import UserError
from toolkit.core.runs import backbone_label

HUB_PREFIX = "keras_hub:"
HUB_EXTRA = 'pip install "toolkit-finetune[hub]"'
DEFAULT_SIZE = 224  # a network that takes any size and whose preset states none
PREPROCESS_CHOICES = ("auto", *preprocessing.PREPROCESS_MODES)  # toolkit.config.settings has the same list
FORMS = (f"a registry name (toolkit backbones), {HUB_PREFIX}<preset>, a keras-hub preset folder, or a .keras file "
         "of a functional image model")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "keras-hub" | "keras-file"
    location: str  # a preset name or handle, or an absolute path


def parse_source(text: str, strict: bool = True) -> Source | None:
    """What ``--backbone`` names, without loading anything; None for a registry name.

    ``strict``: a path that is neither a preset folder nor a ``.keras`` file is refused here, with what it is (not
    strict: the name's form only, as a finished run's recipe is read: its model no longer needs the preset).
    """
    text = str(text)
    if text.startswith(HUB_PREFIX):
        preset = text[len(HUB_PREFIX):]
        if not preset:
            raise UserError(f"--backbone {text!r} names no preset: use {HUB_PREFIX}<preset> "
                            "(e.g. keras_hub:resnet_50_imagenet) or a preset folder's path")
        return Source("keras-hub", preset)
    looks_like_path = text.endswith(".keras") or "/" in text or text.startswith((".", "~")) or Path(text).exists()
    if not looks_like_path:
        return None
    path = Path(text).expanduser().resolve()
    if not strict:
        return Source("keras-file" if text.endswith(".keras") else "keras-hub", str(path))
    if text.endswith(".keras"):
        if not path.is_file():
            raise UserError(f"--backbone {text!r}: no such file. Pass the path of a .keras model file, or "
                            f"{FORMS}")
        return Source("keras-file", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return Source("keras-hub", str(path))
    what = "a folder without config.json" if path.is_dir() else "a file that is not .keras" if path.is_file() \
        else "a path that does not exist"
    raise UserError(f"--backbone {text!r} is {what}, so not a backbone: pass {FORMS}")


def is_external(name: str) -> bool:
    """Whether ``name`` is a backbone brought by the user (by its form; nothing is checked or loaded)."""
    return parse_source(name, strict=False) is not None


def canonical(name: str) -> str:
    """``name`` as a run records it: a local preset or file by its absolute path (a run resumes from anywhere)."""
    source = parse_source(name)
    if source is None or (source.kind == "keras-hub" and str(name).startswith(HUB_PREFIX)):
        return name
    return source.location


# ----------------------------------------------------------------------------- loading


def import_hub(why: str = f"--backbone {HUB_PREFIX}... and preset folders"):
    """keras_hub, imported (which also registers its layers for loading a saved model); a one-line error naming the
    extra to install when it is missing."""
    try:
        import keras_hub
    except ImportError:
        raise UserError(f"{why} needs keras-hub: {HUB_EXTRA}") from None
    return keras_hub


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _load_hub(source: Source, load_weights: bool):
    """(the keras-hub backbone, its image converter or None)."""
    keras_hub = import_hub()
    where = source.location
    if Path(where).is_dir():
        _check_preset_config(Path(where))
    try:
        backbone = keras_hub.models.Backbone.from_preset(where, load_weights=load_weights)
    except Exception as exc:  # noqa: BLE001  (keras-hub raises ValueError, OSError, network errors...)
        hint = "" if Path(where).is_dir() else " (keras-hub downloads presets; this machine may be offline: save " \
                                               "the preset with save_to_preset and pass its folder)"
        raise UserError(f"--backbone: keras-hub could not load preset {where!r}: {type(exc).__name__}: "
                        f"{_one_line(exc)}{hint}") from exc
    converter = None
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(where)
    except Exception:  # noqa: BLE001  (a preset without an image converter: backbone_preprocess says)
        converter = None
    return backbone, converter


def _check_preset_config(folder: Path) -> None:
    """A local preset's config.json names a keras-hub model class: refuse anything else before keras-hub runs it."""
    path = folder / "config.json"
    if path.stat().st_size > 1 << 20:
        raise UserError(f"--backbone {str(folder)!r}: its config.json is {path.stat().st_size:,} bytes; a preset's is "
                        "a few KB. Not a keras-hub preset folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--backbone {str(folder)!r}: config.json is not JSON ({_one_line(exc)}); not a keras-hub "
                        "preset folder") from None
    module = config.get("module", "") if isinstance(config, dict) else ""
    if not (isinstance(module, str) and module.startswith("keras_hub.")):
        raise UserError(f"--backbone {str(folder)!r}: config.json does not describe a keras-hub model (module "
                        f"{module!r}); pass a folder written by keras_hub's save_to_preset, or {FORMS}")


def _load_file(source: Source):
    import keras

    try:
        return keras.saving.load_model(source.location, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001  (Keras raises ValueError, TypeError... for what it will not load)
        text = _one_line(exc)
        if "safe_mode" in text and ("lambda" in text.lower() or "deserializ" in text):
            why = ("it holds Python code (a Lambda layer) that Keras' safe mode refuses to run; rebuild the model "
                   "with stock layers, or save its weights into a model built from registered layer classes")
        else:
            why = f"Keras cannot load it ({type(exc).__name__}: {text})"
        raise UserError(f"--backbone {source.location!r}: {why}") from exc


def _image_input(model, where: str):
    """The model's one image input (height, width, 3), or a user error saying what the model takes instead."""
    inputs = model.inputs if isinstance(model.inputs, (list, tuple)) else [model.inputs]
    shapes = [tuple(i.shape) for i in inputs]
    if len(inputs) != 1 or len(shapes[0]) != 4 or shapes[0][-1] != 3:
        names = ", ".join(f"{getattr(i, 'name', '?')} {tuple(i.shape)}" for i in inputs)
        kind = "a text or multi-input model" if len(inputs) != 1 or len(shapes[0]) != 4 else "not an RGB model"
        raise UserError(f"--backbone {where!r} is {kind} (inputs: {names}); the toolkit needs an image backbone "
                        "taking (height, width, 3) images")
    return shapes[0]


def _feature_rank(model, where: str) -> int:
    """4 for a spatial feature map, 3 for a token sequence; a user error for anything else (pooled vectors)."""
    output = model.output
    if isinstance(output, (list, tuple, dict)):
        raise UserError(f"--backbone {where!r} has several outputs; the toolkit needs one feature map")
    rank = len(output.shape)
    if rank not in (3, 4):
        raise UserError(f"--backbone {where!r} gives {tuple(output.shape)}, not a spatial feature map (batch, height, "
                        "width, channels): the head needs the map before pooling. Save the model up to its last "
                        "feature map (keras.Model(model.input, model.get_layer(NAME).output))")
    return rank


def _has_own_preprocessing(model) -> bool:
    import keras

    first = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][:3]
    return any(isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) for layer in first)


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The user's network as loaded, and what was read off it."""

    network: object  # keras.Model: the keras-hub backbone or the file's model
    converter: object | None  # a keras-hub ImageConverter, when the preset has one
    size: int  # the input size: the converter's, the network's own when fixed, else DEFAULT_SIZE
    fixed: bool  # the network takes only size x size images
    tokens: bool  # the output is a token sequence (a transformer), reshaped into its patch grid
    where: str
    kind: str


def load(name: str, load_weights: bool = True) -> Loaded:
    source = parse_source(name)
    if source is None:
        raise ValueError(f"{name!r} is a registry name, not a backbone brought by the user")
    if source.kind == "keras-hub":
        network, converter = _load_hub(source, load_weights)
    else:
        network, converter = _load_file(source), None
    if not _is_functional(network):
        raise UserError(f"--backbone {source.location!r} is a subclassed model, not a functional one: its layers "
                        "cannot be found in order, so neither frozen by stage nor exported. Build it with the "
                        "functional API (keras.Model(inputs, outputs))")
    shape = _image_input(network, source.location)
    tokens = _feature_rank(network, source.location) == 3
    fixed = shape[1] is not None and shape[2] is not None
    size = DEFAULT_SIZE
    if converter is not None and getattr(converter, "image_size", None):
        size = int(converter.image_size[0])
    elif fixed:
        size = int(shape[1])
    if fixed and (shape[1] != shape[2] or (converter is not None and converter.image_size and
                                              tuple(converter.image_size) != (shape[1], shape[2]))):
        raise UserError(f"--backbone {source.location!r} takes only {shape[1]}x{shape[2]} images, and the toolkit's "
                        "views are square at one size: save the network for square inputs")
    return Loaded(network, converter, size, fixed, tokens, source.location, source.kind)


def _is_functional(model) -> bool:
    try:
        return bool(model.inputs) and model.output is not None
    except (AttributeError, ValueError):
        return False


def preprocessing_mode(loaded: Loaded, preprocess: str) -> str:
    """What turns raw RGB into the network's pixels: ``converter`` (the preset's own), or a named mode. ``auto``
    takes the converter, else ``raw`` when the network's first layers rescale or normalise; else it must be said."""
    if preprocess not in PREPROCESS_CHOICES:
        raise UserError(f"Unknown backbone_preprocess. Received: backbone_preprocess={preprocess!r}; allowed: "
                        f"{', '.join(PREPROCESS_CHOICES)}")
    if preprocess != "auto":
        return preprocess
    if loaded.converter is not None:
        return "converter"
    if _has_own_preprocessing(loaded.network):
        return "raw"
    raise UserError(f"--backbone {loaded.where!r}: how the network expects its pixels is not in the "
                    f"{'preset (no image converter)' if loaded.kind == 'keras-hub' else 'file (no Rescaling or Normalization layer first)'}"
                    f"; state it with --backbone-preprocess {'|'.join(preprocessing.PREPROCESS_MODES)} "
                    "(tf: [-1, 1]; torch: ImageNet mean/std; caffe: BGR minus mean; unit: [0, 1]; raw: [0, 255])")


def describe_preprocessing(loaded: Loaded, mode: str) -> str:
    if mode == "converter":
        return preprocessing.describe_scale_offset(loaded.converter.scale, loaded.converter.offset)
    return f"{mode}: {preprocessing.PREPROCESS_MODES[mode]}"


def preprocessing_text(name: str, preprocess: str) -> str:
    """What ``toolkit backbones --check`` shows: the preprocessing a run puts in front of ``name``."""
    loaded = _probe(name)
    return describe_preprocessing(loaded, preprocessing_mode(loaded, preprocess))


def wrap(loaded: Loaded, mode: str, input_shape: tuple | None = None, name: str = "external_backbone"):
    """raw RGB → preprocessing → the user's network (→ its tokens as a patch grid): the toolkit's backbone."""
    import keras
    from keras import layers

    shape = (loaded.size, loaded.size, 3) if loaded.fixed or input_shape is None else tuple(input_shape)
    inputs = keras.Input(shape=shape, name="image")
    if mode == "converter":
        x = preprocessing.scale_offset(loaded.converter.scale, loaded.converter.offset)(inputs)
    else:
        x = preprocessing.apply(mode, inputs)
    x = loaded.network(x)
    if loaded.tokens:
        count, width = x.shape[1], x.shape[2]
        side = math.isqrt(count or 0)
        if not count or not side or loaded.size % side:
            raise UserError(f"--backbone {loaded.where!r} gives {count} tokens for {loaded.size} px images, which do "
                            "not form a square patch grid; the head needs a spatial map")
        x = layers.Cropping1D((count - side * side, 0), name="prefix_tokens_dropped")(x)  # class and register tokens
        x = layers.Reshape((side, side, width), name="patch_grid")(x)
    return keras.Model(inputs, x, name=name)


def build(name: str, input_shape: tuple | None = None, weights: str | None = "imagenet", preprocess: str = "auto"):
    """The toolkit's backbone for ``name`` (raw RGB in, feature map out). ``weights``: "imagenet" (or any
    non-None): the preset's or file's own weights; None: the same network with random weights."""
    import keras

    if weights not in ("imagenet", None):
        raise UserError(f"--weights {str(weights)!r}: a backbone brought as a preset or a .keras file carries its own "
                        "weights; use --weights imagenet (its own) or none (random)")
    loaded = load(name, load_weights=weights is not None)
    if weights is None and loaded.kind == "keras-file":
        loaded = dataclasses.replace(loaded, network=keras.models.clone_model(loaded.network))  # initialised anew
    return wrap(loaded, preprocessing_mode(loaded, preprocess), input_shape, backbone_label(name).replace(".", "_"))


@functools.lru_cache(maxsize=4)
def _probe(name: str) -> Loaded:
    """The network without its weights, for what is read off it (never trained: :func:`build` loads anew)."""
    return load(name, load_weights=False)


def check(name: str, preprocess: str, image_size: int) -> int:
    """Refuse a backbone a run cannot use before its folder exists; the input size the run trains at."""
    loaded = _probe(name)
    preprocessing_mode(loaded, preprocess)
    if loaded.fixed and image_size not in (0, loaded.size):
        raise UserError(f"--image-size {image_size}: the backbone {name!r} takes only {loaded.size} px images (its "
                        f"position embeddings are fixed); use --image-size {loaded.size} or 0")
    return image_size or loaded.size


@functools.lru_cache(maxsize=16)
def spec(name: str) -> BackboneSpec:
    """Registry-style metadata of a user's backbone, read off the built network (cached per name)."""
    from toolkit.backbones.units import infer_stages

    loaded = _probe(name)
    model = wrap(loaded, "raw")
    family = (f"keras-hub {type(loaded.network).__name__}" if loaded.kind == "keras-hub"
              else f".keras file ({loaded.network.name})")
    mode = "converter" if loaded.converter is not None else "auto"
    return BackboneSpec(
        name=name,
        family=family,
        builder=functools.partial(_builder, name),
        weights_source=loaded.kind,
        preprocessing=describe_preprocessing(loaded, mode) if mode == "converter" else "backbone_preprocess",
        input_size=loaded.size,
        imagenet_top1=None,
        feature_layer=None,
        stages=infer_stages(model, loaded.size, loaded.tokens),
        params=int(loaded.network.count_params()),
        description=loaded.where,
        fixed_size=loaded.fixed,
    )


def _builder(name: str, input_shape: tuple, include_top: bool, weights="imagenet", preprocess: str = "auto"):
    if include_top:
        raise UserError(f"--backbone {name!r} has no ImageNet classifier top: only its feature map is used")
    return build(name, input_shape, weights, preprocess), None
