"""How a backbone expects its pixels, as stock Keras layers inside the model (so a saved model takes raw RGB in
[0, 255] and loads in Keras' safe mode).

The named conventions (:data:`PREPROCESS_MODES`) are the ones the field's networks were trained with; a model file
brought with ``--backbone FILE.keras`` states its own with ``backbone_preprocess`` (or holds it as its first layer:
``raw``). A keras-hub preset brings its image converter's scale and offset (:func:`scale_offset`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
LAYER_NAME = "preprocess"

# name: what the network expects, in words (``toolkit backbones --check`` prints it)
PREPROCESS_MODES = {
    "raw": "raw RGB in [0, 255] (the model preprocesses itself)",
    "unit": "x / 255, RGB in [0, 1]",
    "tf": "x / 127.5 - 1, RGB in [-1, 1]",
    "torch": "x / 255, then ImageNet mean/std per channel (torchvision)",
    "caffe": "RGB to BGR, minus the ImageNet BGR mean (caffe)",
}


def apply(mode: str, x, name: str = LAYER_NAME):
    """``x`` (raw RGB) turned into what a ``mode`` network expects (``x`` itself for ``raw``)."""
    from keras import layers

    if mode == "raw":
        return x
    if mode == "unit":
        return layers.Rescaling(1.0 / 255, name=name)(x)
    if mode == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)(x)
    if mode == "torch":
        return normalization(tuple(255.0 * m for m in IMAGENET_MEAN), tuple(255.0 * s for s in IMAGENET_STD), name)(x)
    if mode == "caffe":
        return caffe(x, name)
    raise ValueError(f"Unknown preprocessing. Received: backbone_preprocess={mode!r}; allowed: "
                     f"{', '.join(PREPROCESS_MODES)}")


def normalization(mean: Sequence[float], std: Sequence[float], name: str = LAYER_NAME):
    """``(x - mean) / std`` on raw RGB, as a stock Keras layer."""
    from keras import layers

    return layers.Normalization(mean=list(mean), variance=[s * s for s in std], name=name)


def scale_offset(scale, offset, name: str = LAYER_NAME):
    """``x * scale + offset`` (each a number or one per channel): a keras-hub image converter's arithmetic."""
    from keras import layers

    def value(v, neutral: float):
        if v is None:
            return neutral
        array = np.asarray(v, dtype=np.float64).reshape(-1)
        return float(array[0]) if array.size == 1 else [float(a) for a in array]

    return layers.Rescaling(value(scale, 1.0), offset=value(offset, 0.0), name=name)


def caffe(x, name: str = LAYER_NAME):
    """RGB to BGR and minus the ImageNet BGR mean, as a frozen 1x1 convolution: a stock layer rather than a
    Lambda, so the saved model loads in Keras' safe mode."""
    from keras import layers

    layer = layers.Conv2D(3, 1, name=name, trainable=False)
    y = layer(x)
    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([kernel, -np.asarray(CAFFE_BGR_MEAN, dtype=np.float32)])
    return y


def describe_scale_offset(scale, offset) -> str:
    """A keras-hub converter's arithmetic in words: ``x * 0.0171..0.0175 + (-2.12..-1.80)``."""
    def words(v) -> str:
        if v is None:
            return "none"
        array = np.asarray(v, dtype=np.float64).reshape(-1)
        return f"{array[0]:.4g}" if array.size == 1 or np.allclose(array, array[0]) else \
            "(" + ", ".join(f"{a:.4g}" for a in array) + ")"

    return f"x * {words(scale)} + {words(offset)} (the preset's image converter)"
