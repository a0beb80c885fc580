"""``toolkit backbones``: the registry's backbones, or (``--check SPEC``) one backbone built and described."""

from __future__ import annotations

import argparse


def cmd_backbones(args: argparse.Namespace) -> int:
    """List registered backbones: name, parameters (without the ImageNet classifier), default input size,
    ImageNet top-1 (%), whether their ImageNet weights can be loaded on this machine now (installed
    offline package, Keras cache, or a download is needed), and family. With --check SPEC (a registry name,
    keras_hub:<preset>, a keras-hub preset folder or a .keras file): build that backbone with its weights and print
    its input size, preprocessing, parameters and the stages the freeze plan counts."""
    if args.check:
        return _check(args.check, args.backbone_preprocess)
    from toolkit import backbones

    rows = []
    for name in backbones.names():
        spec = backbones.get_spec(name)
        available, where = backbones.weights_available(name)
        top1 = f"{spec.imagenet_top1:.1f}" if spec.imagenet_top1 is not None else "-"
        rows.append((name, f"{spec.params / 1e6:.1f}M", str(spec.input_size), top1,
                     f"{'yes' if available else 'no'} ({where})", spec.family))
    _table(("name", "params", "input", "top-1", "weights here now", "family"), rows)
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _check(name: str, preprocess: str) -> int:
    from toolkit import backbones
    from toolkit.backbones import external
    from toolkit.backbones.units import STAGE_RULE, units
    from toolkit.config.settings import FinetuneConfig
    from toolkit.core.quiet import import_tensorflow

    FinetuneConfig(backbone=name, backbone_preprocess=preprocess)  # validated as built
    import_tensorflow()
    if external.is_external(name):
        name = external.canonical(name)
        external.check(name, preprocess, 0)
    spec = backbones.get_spec(name)
    available, where = backbones.weights_available(name)
    model = backbones.create(name, input_shape=(None, None, 3), weights="imagenet" if available else None,
                             preprocess=preprocess)
    shown = external.preprocessing_text(name, preprocess) if external.is_external(name) else spec.preprocessing
    print(f"backbone       {name} ({spec.family})")
    print(f"weights        {'loaded' if available else 'not here (random)'}: {where}")
    print(f"input          {spec.input_size} px{' only (fixed)' if spec.fixed_size else ' (any size; the default)'}")
    print(f"preprocessing  {shown} (inside the model: it takes raw RGB in [0, 255])")
    print(f"parameters     {spec.params:,}")
    print(f"output         {model.output_shape[-1]} channels, a {_map(model, spec.input_size)} feature map")
    found = units(model)
    ends = backbones.stage_end_indices(model, spec)
    print(f"{len(spec.stages)} stages ({STAGE_RULE}):")
    rows, start = [], 0
    for stage, end in zip(spec.stages, ends):
        weighted = sum(1 for unit in found[start:end + 1] if unit.layer.weights)
        params = sum(unit.layer.count_params() for unit in found[start:end + 1] if unit.layer.weights)
        rows.append((stage.name, f"{found[start].path} … {found[end].path}", str(weighted), f"{params:,}"))
        start = end + 1
    _table(("stage", "units", "with weights", "parameters"), rows)
    return 0


def _map(model, size: int) -> str:
    import keras

    try:
        shape = model.compute_output_spec(keras.KerasTensor((1, size, size, 3))).shape
    except Exception:  # noqa: BLE001
        return "spatial"
    return f"{shape[1]}x{shape[2]}"


def add_backbones_command(sub: argparse._SubParsersAction) -> None:
    from toolkit.cli.flags import subcommand

    p = subcommand(sub, "backbones", cmd_backbones, "list the available backbones, or check one (--check SPEC)")
    p.add_argument("--check", metavar="SPEC", default=None, help="build this backbone (a registry name, "
                   "keras_hub:<preset>, a keras-hub preset folder or a .keras file) and print its stages, input size, "
                   "preprocessing and parameters")
    p.add_argument("--backbone-preprocess", default="auto", help="how a preset or .keras file expects its pixels "
                   "(finetune's --backbone-preprocess)")
