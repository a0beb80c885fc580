"""keras.applications families, wrapped so that each takes raw RGB in [0, 255].

Their ``imagenet`` weights are downloaded and cached by Keras
(``~/.keras/models``) where the network allows. Families whose Keras
preprocessing is a separate ``preprocess_input`` function (ResNet50: BGR +
mean subtraction; Xception: scale to [-1, 1]) get it as a stock layer inside
the model, so nothing outside the model needs to know.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from toolkit.backbones import preprocessing
from toolkit.backbones.registry import BackboneSpec, Stage


def _caffe_preprocess(x: keras.KerasTensor) -> keras.KerasTensor:
    return preprocessing.apply("caffe", x)


def _tf_preprocess(x: keras.KerasTensor) -> keras.KerasTensor:
    return preprocessing.apply("tf", x)


@dataclasses.dataclass(frozen=True)
class _App:
    name: str
    constructor: str  # attribute of keras.applications
    input_size: int
    top1: float
    params: int  # without the ImageNet top
    weights_file: str
    stages: tuple[Stage, ...]
    preprocessing: str
    external_preprocess: Callable[[keras.KerasTensor], keras.KerasTensor] | None = None


def _builder(app: _App):
    def build(input_shape: tuple, include_top: bool, weights: str | None = None) -> tuple[keras.Model, None]:
        """``weights``: None, "imagenet" (Keras downloads and caches) or a Keras weights file."""
        constructor = getattr(keras.applications, app.constructor)
        inputs = keras.Input(shape=input_shape, name="image")
        x = app.external_preprocess(inputs) if app.external_preprocess else inputs
        model = constructor(include_top=include_top, weights=weights, input_tensor=x)
        return keras.Model(inputs, model.output, name=app.name), None

    return build


def _prefix_stages(*prefixes: str) -> tuple[Stage, ...]:
    return tuple(Stage(f"stage{i + 1}", p) for i, p in enumerate(prefixes))


_APPS = (
    _App("resnet50", "ResNet50", 224, 74.9, 23_587_724, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
         _prefix_stages("conv1_", "conv2_", "conv3_", "conv4_", "conv5_"),
         "RGB→BGR, minus ImageNet mean (caffe)", _caffe_preprocess),
    *(
        _App(f"efficientnet_b{k}", f"EfficientNetB{k}", size, top1, params, f"efficientnetb{k}_notop.h5",
             _prefix_stages("block1", "block2", "block3", "block4", "block5", "block6", "top_"),
             "built into Keras model (rescale + normalise)")
        for k, size, top1, params in (
            (0, 224, 77.1, 4_049_571), (1, 240, 79.1, 6_575_239), (2, 260, 80.1, 7_768_569), (3, 300, 81.6, 10_783_535)
        )
    ),
    _App("efficientnet_v2_b0", "EfficientNetV2B0", 224, 78.7, 5_919_312, "efficientnetv2-b0_notop.h5",
         _prefix_stages("block1", "block2", "block3", "block4", "block5", "top_"),
         "built into Keras model (rescale + normalise)"),
    _App("convnext_tiny", "ConvNeXtTiny", 224, 81.3, 27_820_128, "convnext_tiny_notop.h5",
         _prefix_stages(*(f"convnext_tiny_stage_{i}" for i in range(4))),
         "built into Keras model (normalise)"),
    _App("mobilenet_v3_large", "MobileNetV3Large", 224, 75.6, 2_996_352,
         "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
         _prefix_stages("expanded_conv_2_", "expanded_conv_5_", "expanded_conv_9_", "expanded_conv_11_",
                        "expanded_conv_14_", "conv_1"),
         "built into Keras model (rescale)"),
    _App("xception", "Xception", 299, 79.0, 20_861_480, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
         _prefix_stages("block1_", "block2_", "block3_", "block4_", "block8_", "block12_", "block14_"),
         "x/127.5 - 1 (tf)", _tf_preprocess),
)

SPECS = tuple(
    BackboneSpec(
        name=app.name,
        family=f"keras.applications.{app.constructor}",
        builder=_builder(app),
        weights_source="keras-imagenet",
        preprocessing=app.preprocessing,
        input_size=app.input_size,
        imagenet_top1=app.top1,
        feature_layer=None,  # the model's output: include_top=False ends at the last feature map
        stages=app.stages,
        params=app.params,
        keras_weights_file=app.weights_file,
    )
    for app in _APPS
)
