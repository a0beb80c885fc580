"""Layers shared by the torch-ported families (MobileNetV2, EfficientNet-Lite).

Both are stacks of MBConv (inverted residual) blocks without squeeze-excite;
they differ in padding (torch's symmetric padding vs TF ``same``), BatchNorm
constants and the torch parameter names, which the caller passes in.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import keras
from keras import layers

Padding = Literal["torch", "same"]


@dataclasses.dataclass(frozen=True)
class BNConfig:
    epsilon: float
    momentum: float  # Keras convention: 1 - torch momentum


@dataclasses.dataclass(frozen=True)
class TorchNames:
    """torch state_dict prefixes of one MBConv block (``expand_*`` None when expand ratio is 1)."""

    expand_conv: str | None
    expand_bn: str | None
    dw_conv: str
    dw_bn: str
    project_conv: str
    project_bn: str


def conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    padding: Padding,
    bn: BNConfig,
    mapping: dict[str, str],
    torch_conv: str,
    torch_bn: str,
    depthwise: bool = False,
    activation: bool = True,
) -> keras.KerasTensor:
    """Conv (or depthwise conv) + BatchNorm (+ ReLU6), recording the torch names.

    ``padding="torch"`` reproduces ``nn.Conv2d(padding=k // 2)``: symmetric
    zero padding then a valid conv. Keras ``same`` pads stride-2 convs
    asymmetrically (more at bottom/right), which shifts every stride-2 layer
    by half a pixel relative to torch and ruins ported weights.
    """
    if padding == "torch" and kernel > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        conv_padding = "valid"
    else:
        conv_padding = "same"
    if depthwise:
        conv = layers.DepthwiseConv2D(kernel, strides=stride, padding=conv_padding, use_bias=False, name=f"{name}_conv")
    else:
        conv = layers.Conv2D(filters, kernel, strides=stride, padding=conv_padding, use_bias=False, name=f"{name}_conv")
    x = conv(x)
    x = layers.BatchNormalization(epsilon=bn.epsilon, momentum=bn.momentum, name=f"{name}_bn")(x)
    mapping[f"{name}_conv"] = torch_conv
    mapping[f"{name}_bn"] = torch_bn
    if activation:
        x = layers.ReLU(6.0, name=f"{name}_relu")(x)
    return x


def mbconv(
    x: keras.KerasTensor, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int,
    name: str, padding: Padding, bn: BNConfig, mapping: dict[str, str], torch_names: TorchNames,
) -> keras.KerasTensor:
    """Inverted residual: 1x1 expand → kxk depthwise → 1x1 linear projection (+ identity)."""
    shortcut = x
    hidden = in_channels * expand_ratio
    if expand_ratio != 1:
        x = conv_bn(x, hidden, 1, 1, f"{name}_expand", padding, bn, mapping, torch_names.expand_conv, torch_names.expand_bn)
    x = conv_bn(x, hidden, kernel, stride, f"{name}_dw", padding, bn, mapping, torch_names.dw_conv, torch_names.dw_bn, depthwise=True)
    x = conv_bn(
        x, out_channels, 1, 1, f"{name}_project", padding, bn, mapping,
        torch_names.project_conv, torch_names.project_bn, activation=False,
    )
    if stride == 1 and in_channels == out_channels:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return x


TOP_LAYER = "predictions"


def classifier_top(x: keras.KerasTensor, dropout: float) -> keras.KerasTensor:
    """ImageNet top: global average pool → dropout → 1000 logits (no softmax).

    Builders map :data:`TOP_LAYER` to the torch classifier whether or not they
    add the top, so the strict loader knows those tensors are accounted for.
    """
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    return layers.Dense(1000, name=TOP_LAYER)(x)


def normalization(mean: tuple[float, ...], std: tuple[float, ...]) -> layers.Layer:
    """``(x - mean) / std`` on raw RGB, as a stock (safe-mode loadable) Keras layer."""
    from toolkit.backbones.preprocessing import normalization as stock

    return stock(mean, std)
