"""Copy a torch ``state_dict`` (numpy arrays) into a Keras model, strictly.

Layout conversions (torch → Keras):

* ``Conv2D`` kernel: OIHW → HWIO;
* ``DepthwiseConv2D`` kernel: (C, 1, kh, kw) → (kh, kw, C, 1);
* ``BatchNormalization``: weight, bias, running_mean, running_var →
  gamma, beta, moving_mean, moving_variance;
* ``Dense``: (out, in) → (in, out).

"Strictly" as in torch's ``load_state_dict(strict=True)``: every mapped layer
must find all its tensors with the right shapes, and every tensor of the
checkpoint (but ``num_batches_tracked`` and the classifier when the model has
no top) must be used. A silent mismatch would give a backbone that trains but
has lost its ImageNet features.
"""

from __future__ import annotations

import keras
import numpy as np

from toolkit.backbones.weights import CheckpointError, StateDict

__all__ = ["load_torch_state"]


def _layer_arrays(layer: keras.layers.Layer, state: StateDict, prefix: str) -> list[np.ndarray]:
    def take(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise CheckpointError(f"checkpoint has no tensor {key!r} for layer {layer.name!r}")
        return state[key]

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        arrays = [take("weight").transpose(2, 3, 0, 1)]
        if layer.use_bias:
            arrays.append(take("bias"))
    elif isinstance(layer, keras.layers.Conv2D):
        arrays = [take("weight").transpose(2, 3, 1, 0)]
        if layer.use_bias:
            arrays.append(take("bias"))
    elif isinstance(layer, keras.layers.BatchNormalization):
        arrays = [take("weight"), take("bias"), take("running_mean"), take("running_var")]
    elif isinstance(layer, keras.layers.Dense):
        arrays = [take("weight").T, take("bias")]
    else:
        raise TypeError(f"no torch conversion for layer {layer.name!r} of type {type(layer).__name__}")
    return arrays


def load_torch_state(model: keras.Model, state: StateDict, mapping: dict[str, str], source: str) -> None:
    """Load ``state`` into ``model``'s layers named in ``mapping`` (keras name → torch prefix)."""
    used: set[str] = set()
    skipped_prefixes: set[str] = set()
    for layer_name, prefix in mapping.items():
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            skipped_prefixes.add(prefix)  # e.g. the classifier when include_top=False
            continue
        arrays = _layer_arrays(layer, state, prefix)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise CheckpointError(
                f"{source}: shape mismatch for layer {layer_name!r} ({prefix}): "
                f"model expects {expected}, checkpoint has {got}"
            )
        layer.set_weights([np.ascontiguousarray(a, dtype=np.float32) for a in arrays])
        used.update(k for k in state if k.startswith(prefix + "."))

    leftover = [
        k
        for k in state
        if k not in used
        and not k.endswith("num_batches_tracked")
        and not any(k.startswith(p + ".") for p in skipped_prefixes)
    ]
    if leftover:
        raise CheckpointError(
            f"{source}: {len(leftover)} checkpoint tensors have no place in the model "
            f"(first: {leftover[:3]}); the architecture does not match the checkpoint"
        )
