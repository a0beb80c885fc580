"""A backbone's units (the layers the freeze plan switches, in order) and, for a backbone brought by the user,
the stages inferred from them.

*Units.* The backbone's layers in topological order; a nested functional model (a keras-hub backbone inside the
toolkit's wrapper) is expanded into its own layers, and a layer that holds a stack of repeated blocks (a transformer
encoder) into those blocks. Each unit has a path (``res_net_backbone/conv1_conv``); the registry's backbones are
flat, so their paths are their layer names.

*Stages* (:func:`infer_stages`), the rule ``--help`` and ``toolkit backbones --check`` state:

* a convolutional network (its feature map is spatial): a stage ends where the feature map's resolution halves;
  a stage without weights (the input, padding) joins the stage after it;
* a transformer (its output is a token sequence): its blocks are grouped into :data:`TRANSFORMER_STAGES` even
  stages (fewer when it has fewer blocks); the embedding joins the first stage, the final norm the last.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from toolkit.backbones.registry import Stage

TRANSFORMER_STAGES = 4
STAGE_RULE = ("a new stage where the feature map's resolution halves (convolutional networks), or the transformer "
              f"blocks in {TRANSFORMER_STAGES} even groups (ViTs)")


@dataclasses.dataclass(frozen=True)
class Unit:
    path: str
    layer: Any  # keras.layers.Layer
    stacked: bool = False  # one block of a stack of repeated blocks


def _is_graph(layer) -> bool:
    """A functional model (keras.Model built from inputs and outputs), whose layers are a graph in order."""
    import keras

    if not isinstance(layer, keras.Model):
        return False
    try:
        return bool(layer.inputs) and bool(layer.layers)
    except (AttributeError, ValueError):
        return False


def _stack(layer) -> list | None:
    """The direct sub-layers of ``layer`` when they hold a run of at least two blocks of one class with weights (a
    transformer encoder), else None. Keras keeps no public list of a layer's sub-layers, hence the private call."""
    subs = list(layer._flatten_layers(include_self=False, recursive=False))
    kinds = [type(s) if s.weights else None for s in subs]
    runs = [i for i in range(1, len(kinds)) if kinds[i] is not None and kinds[i] == kinds[i - 1]]
    return subs if runs else None


def units(model) -> list[Unit]:
    """The backbone's units in order (see the module's docstring)."""
    out: list[Unit] = []

    def walk(layers, prefix: str) -> None:
        for layer in layers:
            path = f"{prefix}{layer.name}"
            if _is_graph(layer):
                walk(layer.layers, f"{path}/")
                continue
            stack = _stack(layer) if layer.weights and not hasattr(layer, "kernel") else None
            if stack:
                kinds = [type(s) for s in stack]
                out.extend(Unit(f"{path}/{s.name}", s, stacked=bool(s.weights) and kinds.count(type(s)) > 1)
                           for s in stack)
            else:
                out.append(Unit(path, layer))

    walk(model.layers, "")
    return out


def _resolutions(model, size: int) -> dict[str, int]:
    """The output height of every unit with a spatial output, for a ``size`` x ``size`` input (shapes only)."""
    import keras

    found: dict[str, int] = {}

    def probe(graph, prefix: str, in_size: int) -> None:
        spatial = []
        for layer in graph.layers:
            if _is_graph(layer):  # its .output is a tensor of its own graph, not of this one: probed on its own
                continue
            try:
                if len(layer.output.shape) == 4:
                    spatial.append(layer)
            except (AttributeError, ValueError):  # a layer used twice has no single output
                continue
        try:
            channels = graph.inputs[0].shape[-1]
            specs = keras.Model(graph.inputs, [layer.output for layer in spatial]).compute_output_spec(
                keras.KerasTensor((1, in_size, in_size, channels)))
        except Exception:  # noqa: BLE001  (a graph whose shapes cannot be traced: no resolution-based stages)
            return
        heights = {layer.name: spec.shape[1] for layer, spec in zip(spatial, specs)}
        previous = in_size
        for layer in graph.layers:
            if _is_graph(layer):
                probe(layer, f"{prefix}{layer.name}/", previous)
            if heights.get(layer.name):
                found[f"{prefix}{layer.name}"] = previous = int(heights[layer.name])

    probe(model, "", size)
    return found


def infer_stages(model, size: int, tokens: bool) -> tuple[Stage, ...]:
    """The stages of a user's backbone (``tokens``: a transformer whose token sequence the wrapper reshaped into a
    map), each ending at a unit's path; at least one stage."""
    found = units(model)
    ends = _transformer_ends(found) if tokens else _resolution_ends(found, _resolutions(model, size), size)
    ends = ends[:-1] + [len(found) - 1]  # the last stage runs to the end (the wrapper's reshaping layers)
    return tuple(Stage(f"stage{i + 1}", "", last=found[end].path) for i, end in enumerate(ends))


def _resolution_ends(found: list[Unit], heights: dict[str, int], size: int) -> list[int]:
    starts, current = [0], size
    for index, unit in enumerate(found):
        height = heights.get(unit.path)
        if height and height <= current / 2:
            starts.append(index)
            current = height
        elif height and index == starts[-1]:
            current = height
    groups = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(found)])]
    merged: list[list[int]] = []
    carry: list[int] = []
    for group in groups:  # a stage without weights joins the next one (the last: the one before it)
        carry += group
        if any(found[i].layer.weights for i in group):
            merged.append(carry)
            carry = []
    if carry:
        if merged:
            merged[-1] += carry
        else:
            merged.append(carry)
    return [group[-1] for group in merged]


def _transformer_ends(found: list[Unit]) -> list[int]:
    blocks = [i for i, unit in enumerate(found) if unit.stacked]
    if not blocks:
        return [len(found) - 1]
    groups = np.array_split(np.asarray(blocks), min(TRANSFORMER_STAGES, len(blocks)))
    return [int(group[-1]) for group in groups]
