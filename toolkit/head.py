"""Network-in-Network classification head and the full classifier.

NIN head: an (optional) 1x1 bottleneck conv + BN + ReLU (NIN's mlpconv), dropout,
then a 1x1 conv giving one map per class, global average pooling, softmax.
No Flatten or Dense, so the model is fully convolutional (any input size) and
the per-class maps -- the layer named :data:`CLASS_MAPS` -- are
class-activation maps for free (``toolkit explain``).

The head's layers are created once (:class:`NINHead`) and applied twice: to
cached backbone features while the backbone is frozen, and on top of the
backbone in the full classifier -- the same layer objects, so the weights
trained on the cache are the classifier's weights.
"""

from __future__ import annotations

import keras
from keras import layers

CLASS_MAPS = "class_maps"
LOGITS = "class_logits"
PROBS = "probs"
BACKBONE = "backbone"


class NINHead:
    def __init__(self, num_classes: int, bottleneck: int = 0, dropout: float = 0.2):
        self.num_classes = num_classes
        self.bottleneck = bottleneck
        self.layers: list[layers.Layer] = []
        if bottleneck:
            self.layers += [
                layers.Conv2D(bottleneck, 1, use_bias=False, name="nin_bottleneck_conv"),
                layers.BatchNormalization(name="nin_bottleneck_bn"),
                layers.ReLU(name="nin_bottleneck_relu"),
            ]
        if dropout:
            self.layers.append(layers.Dropout(dropout, name="nin_dropout"))
        self.layers += [
            layers.Conv2D(num_classes, 1, name=CLASS_MAPS),
            layers.GlobalAveragePooling2D(name=LOGITS),
            # float32 softmax keeps probabilities exact under mixed precision.
            layers.Activation("softmax", dtype="float32", name=PROBS),
        ]

    @property
    def is_linear(self) -> bool:
        """Without a bottleneck the head is linear up to the softmax: conv1x1 and
        average pooling commute, so it can train on pooled features exactly."""
        return not self.bottleneck

    def __call__(self, features: keras.KerasTensor) -> keras.KerasTensor:
        x = features
        for layer in self.layers:
            x = layer(x)
        return x

    def on_features(self, feature_shape: tuple) -> keras.Model:
        """The head alone, on cached backbone features of ``feature_shape`` (h, w, c)."""
        inputs = keras.Input(shape=feature_shape, name="features")
        return keras.Model(inputs, self(inputs), name="nin_head")


def build_classifier(
    backbone: keras.Model,
    head: NINHead,
    input_shape: tuple = (None, None, 3),
    batchnorm_inference: bool = True,
) -> keras.Model:
    """raw RGB → backbone → NIN head → class probabilities.

    With ``batchnorm_inference`` (the default) the backbone is called with
    ``training=False``, as the Keras transfer-learning guide says. Note that in
    Keras 3's functional API an outer ``model(x, training=True)`` (what ``fit``
    does) overrides that recorded argument, so what actually keeps BatchNorm in
    inference mode during fine-tuning is :func:`toolkit.freeze.apply_plan`
    leaving the BatchNorm layers ``trainable=False`` (a frozen Keras 3
    BatchNorm always uses its moving statistics); tests check both.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    # Same layers under a stable name, so the backbone is found by name whatever its family.
    backbone = keras.Model(backbone.input, backbone.output, name=BACKBONE)
    features = backbone(inputs, training=False) if batchnorm_inference else backbone(inputs)
    return keras.Model(inputs, head(features), name="classifier")
