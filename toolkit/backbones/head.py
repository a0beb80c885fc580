"""Network-in-Network classification head and the full classifier.

NIN head: an (optional) 1x1 bottleneck conv + BN + ReLU (NIN's mlpconv), dropout,
then a 1x1 conv giving one map per class, global average pooling, softmax. For multi-label data (an image holds
several classes) each class map is pooled by log-sum-exp (:class:`LogSumExpPooling2D`) and scored by a sigmoid:
average pooling dilutes a class that fills one corner with the cells where it is absent (measured in
docs/benchmarks/multilabel.md).
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
FOLD_PROBS = "fold_probs"
BACKBONE = "backbone"


LSE_SHARPNESS = 5.0  # r of log-sum-exp pooling: 0 is average pooling, infinity max pooling


@keras.saving.register_keras_serializable(package="toolkit")
class LogSumExpPooling2D(layers.Layer):
    """(batch, h, w, c) -> (batch, c): ``(1/r) log(mean(exp(r x)))`` over the cells, a smooth maximum between
    average pooling (r -> 0) and max pooling (r -> infinity); computed stably (``logsumexp``)."""

    def __init__(self, sharpness: float = LSE_SHARPNESS, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(sharpness, (int, float)) and 0 < sharpness < 1e4):
            raise ValueError(f"sharpness must be a number in (0, 1e4). Received: sharpness={sharpness!r}")
        self.sharpness = float(sharpness)

    def call(self, inputs):
        from keras import ops

        cells = ops.reshape(inputs, (ops.shape(inputs)[0], -1, ops.shape(inputs)[-1]))
        count = ops.cast(ops.shape(cells)[1], inputs.dtype)
        return (ops.logsumexp(self.sharpness * cells, axis=1) - ops.log(count)) / self.sharpness

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "sharpness": self.sharpness}


def _pooling(multi_label: bool) -> layers.Layer:
    return LogSumExpPooling2D(name=LOGITS) if multi_label else layers.GlobalAveragePooling2D(name=LOGITS)


class NINHead:
    def __init__(self, num_classes: int, bottleneck: int = 0, dropout: float = 0.2, prefix: str = "",
                 multi_label: bool = False):
        self.num_classes = num_classes
        self.bottleneck = bottleneck
        self.multi_label = multi_label
        self.layers: list[layers.Layer] = []
        if bottleneck:
            self.layers += [
                layers.Conv2D(bottleneck, 1, use_bias=False, name=f"{prefix}nin_bottleneck_conv"),
                layers.BatchNormalization(name=f"{prefix}nin_bottleneck_bn"),
                layers.ReLU(name=f"{prefix}nin_bottleneck_relu"),
            ]
        if dropout:
            self.layers.append(layers.Dropout(dropout, name=f"{prefix}nin_dropout"))
        self.layers += [
            layers.Conv2D(num_classes, 1, name=f"{prefix}{CLASS_MAPS}"),
            _pooling(multi_label),
            # float32 keeps probabilities exact under mixed precision.
            layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32", name=PROBS),
        ]

    @property
    def is_linear(self) -> bool:
        """Without a bottleneck the head is linear up to the softmax: conv1x1 and
        average pooling commute, so it can train on pooled features exactly (not so log-sum-exp pooling)."""
        return not self.bottleneck and not self.multi_label

    def __call__(self, features: keras.KerasTensor) -> keras.KerasTensor:
        x = features
        for layer in self.layers:
            x = layer(x)
        return x

    def maps(self, features: keras.KerasTensor) -> keras.KerasTensor:
        """The per-class maps only (the layers before pooling)."""
        x = features
        for layer in self.layers[:-2]:
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
    inference mode during fine-tuning is :func:`toolkit.train.freeze.apply_plan`
    leaving the BatchNorm layers ``trainable=False`` (a frozen Keras 3
    BatchNorm always uses its moving statistics); tests check both.
    """
    fixed = tuple(backbone.input.shape[1:])
    if fixed[0] is not None:  # a backbone that takes one size only (a ViT): the classifier too
        input_shape = fixed
    inputs = keras.Input(shape=input_shape, name="image")
    # Same layers under a stable name, so the backbone is found by name whatever its family.
    backbone = keras.Model(backbone.input, backbone.output, name=BACKBONE)
    features = backbone(inputs, training=False) if batchnorm_inference else backbone(inputs)
    return keras.Model(inputs, head(features), name="classifier")


class FoldHeads:
    """K NIN heads on one backbone, one per cross-validation fold (``--cv K``): one network, one backbone pass.

    The heads' class maps are the layer named :data:`CLASS_MAPS`, K x C channels (head k's at k*C .. k*C+C-1),
    pooled, split per head (:data:`FOLD_PROBS`: a softmax per head, shape (K, C)) and averaged
    (:data:`PROBS`). Without a bottleneck the K heads are one 1x1 convolution with K x C filters (a CPU step
    then costs what one head's does); with one, each head has its own bottleneck and class-map convolution,
    concatenated. Keras' own layers only, so the saved model loads in safe mode and ``predict``,
    ``evaluate`` and ``export`` see an ordinary classifier.
    """

    def __init__(self, count: int, num_classes: int, bottleneck: int = 0, dropout: float = 0.2,
                 multi_label: bool = False):
        self.count, self.num_classes, self.bottleneck = count, num_classes, bottleneck
        self.multi_label = multi_label
        if bottleneck:
            self.heads = [NINHead(num_classes, bottleneck, dropout, prefix=f"fold{k}_", multi_label=multi_label)
                          for k in range(count)]
            self.concat = layers.Concatenate(name=CLASS_MAPS)
        else:
            self.dropout = layers.Dropout(dropout, name="nin_dropout") if dropout else None
            self.maps_conv = layers.Conv2D(count * num_classes, 1, name=CLASS_MAPS)
        self.pool = _pooling(multi_label)  # per channel, so per head and class
        self.split = layers.Reshape((count, num_classes), name="fold_logits")
        self.softmax = layers.Activation("sigmoid" if multi_label else "softmax", dtype="float32", name=FOLD_PROBS)
        self.mean = layers.GlobalAveragePooling1D(dtype="float32", name=PROBS)  # the mean over the K heads

    @property
    def is_linear(self) -> bool:
        return not self.bottleneck and not self.multi_label

    def head_weights(self, k: int) -> list:
        """Head k's own weights (numpy arrays), as one NINHead of the same settings holds them."""
        if self.bottleneck:
            return [w for layer in self.heads[k].layers[:-2] for w in layer.get_weights()]
        kernel, bias = self.maps_conv.get_weights()
        part = slice(k * self.num_classes, (k + 1) * self.num_classes)
        return [kernel[..., part].copy(), bias[part].copy()]

    def set_head_weights(self, k: int, weights: list) -> None:
        if self.bottleneck:
            it = iter(weights)
            for layer in self.heads[k].layers[:-2]:
                if layer.weights:
                    layer.set_weights([next(it) for _ in layer.weights])
            return
        kernel, bias = self.maps_conv.get_weights()
        part = slice(k * self.num_classes, (k + 1) * self.num_classes)
        kernel[..., part], bias[part] = weights
        self.maps_conv.set_weights([kernel, bias])

    def fold_logits(self, features: keras.KerasTensor) -> keras.KerasTensor:
        """(batch, K, C): each head's logits."""
        if self.bottleneck:
            maps = self.concat([head.maps(features) for head in self.heads])
        else:
            maps = self.maps_conv(self.dropout(features) if self.dropout else features)
        return self.split(self.pool(maps))

    def per_fold(self, features: keras.KerasTensor) -> keras.KerasTensor:
        """(batch, K, C): each head's probabilities."""
        return self.softmax(self.fold_logits(features))

    def __call__(self, features: keras.KerasTensor) -> keras.KerasTensor:
        return self.mean(self.per_fold(features))

    def on_features(self, feature_shape: tuple) -> keras.Model:
        """The K heads alone, on cached backbone features of ``feature_shape``, giving (batch, K, C)."""
        inputs = keras.Input(shape=feature_shape, name="features")
        return keras.Model(inputs, self.per_fold(inputs), name="fold_heads")


def is_multi_label(model) -> bool:
    """Whether a classifier's class maps are pooled by log-sum-exp into sigmoids (a multi-label head)."""
    return any(isinstance(layer, LogSumExpPooling2D) for layer in model.layers)


def feature_width(model) -> int:
    """Channels of the pooled backbone features :func:`pooled_model` gives."""
    return int(model.get_layer(BACKBONE).output.shape[-1])


def pooled_model(model):
    """``model`` with a second output: the backbone's features averaged over space (what the score uses)."""
    import keras

    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(BACKBONE) + 1]  # the head's first layer: its input is the backbone's output
    pooled = keras.layers.GlobalAveragePooling2D(name="unknown_pool")(after.input)
    return keras.Model(model.input, [model.output, pooled])
