"""Network-in-Network classification head and the full classifier.

NIN head: an (optional) 1x1 bottleneck conv + BN + ReLU + dropout, then a 1x1
conv giving one map per class, global average pooling, softmax. No Flatten or
Dense, so the model is fully convolutional (any input size) and the per-class
maps -- the layer named :data:`CLASS_MAPS` -- are class-activation maps for
free (``toolkit explain``).
"""

from __future__ import annotations

import keras
from keras import layers

CLASS_MAPS = "class_maps"
LOGITS = "class_logits"
PROBS = "probs"
BACKBONE = "backbone"


def nin_head(features: keras.KerasTensor, num_classes: int, bottleneck: int = 0, dropout: float = 0.2) -> keras.KerasTensor:
    x = features
    if bottleneck:
        x = layers.Conv2D(bottleneck, 1, use_bias=False, name="nin_bottleneck_conv")(x)
        x = layers.BatchNormalization(name="nin_bottleneck_bn")(x)
        x = layers.ReLU(name="nin_bottleneck_relu")(x)
    if dropout:
        x = layers.Dropout(dropout, name="nin_dropout")(x)
    maps = layers.Conv2D(num_classes, 1, name=CLASS_MAPS)(x)
    logits = layers.GlobalAveragePooling2D(name=LOGITS)(maps)
    # float32 softmax keeps probabilities exact under mixed precision.
    return layers.Activation("softmax", dtype="float32", name=PROBS)(logits)


def build_classifier(
    backbone: keras.Model,
    num_classes: int,
    input_shape: tuple = (None, None, 3),
    bottleneck: int = 0,
    dropout: float = 0.2,
) -> keras.Model:
    """raw RGB → backbone (BatchNorm always in inference mode) → NIN head → probabilities.

    The backbone is called with ``training=False`` as the Keras transfer
    learning guide requires: its BatchNorm layers keep their ImageNet
    statistics even when some of its stages are unfrozen for fine-tuning.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    # Same layers under a stable name, so the backbone is found by name whatever its family.
    backbone = keras.Model(backbone.input, backbone.output, name=BACKBONE)
    features = backbone(inputs, training=False)
    outputs = nin_head(features, num_classes, bottleneck, dropout)
    return keras.Model(inputs, outputs, name="classifier")
