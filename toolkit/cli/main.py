"""The ``toolkit`` command: one entry point, one subcommand per job.

Only this module configures logging and output; the library modules just log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger("toolkit")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("toolkit").setLevel(level)


# ----------------------------------------------------------------------------- finetune


def _cmd_finetune(args: argparse.Namespace) -> int:
    """Train an image classifier from a pretrained backbone. DATA is a folder with one sub-folder per
    class, a folder with train/ and val/ (or validation/) sub-folders that each hold one sub-folder per
    class, or a CSV manifest with path,label[,split] columns (paths relative to the CSV); a manifest with a
    labels column (class names joined by ';') trains a multi-label classifier instead (fold heads on the
    frozen backbone, a threshold per label; docs/guide/multi-label.md). Without a
    validation split, a stratified split of --val-fraction is held out. Every image is verified by
    decoding; unusable files are skipped and listed. Stage 1 trains a Network-in-Network head (1x1 conv
    per class + global average pooling) on the frozen backbone, on cached features; stage 2 fine-tunes
    the stages the freeze plan unfreezes. Settings come from --recipe; flags given here override it.
    Every recipe key is a flag (--head-epochs; --augment.pca-sigma) and can be set with --set KEY=VALUE.
    Writes model.keras, recipe.toml, classes.json, pca.json, history.csv, curves.png, metrics.json,
    data.json, calibration.json, report.md, report.html and, with the tensorboard package installed,
    tensorboard/ into the run folder. Exit
    status: 0 done, 2 bad input, 3 accuracy gate failed."""
    from toolkit.api.training import resume, train
    from toolkit.core.uncertainty import describe
    from toolkit.train.run_state import AccuracyGateError

    verbose = 0 if args.quiet else 1 if sys.stdout.isatty() else 2
    try:
        if args.resume:
            _refuse_flags_with_resume(args)
            result = resume(args.resume, verbose=verbose)
        else:
            result = train(_config_from_args(args), args.out, overwrite=args.overwrite, ensemble=args.ensemble,
                           verbose=verbose)
    except AccuracyGateError as exc:
        print(f"toolkit finetune: accuracy gate failed: {exc}", file=sys.stderr)
        return 3
    for name, accuracy in result.members.items():
        print(f"member {name}: validation accuracy {accuracy:.4f}")
    from toolkit.train.report import accuracy_line, freeze_line

    m = result.metrics
    if result.plan is not None:
        print(freeze_line(result.plan, m))
    kind = "ensemble " if result.members else ""
    if result.members and "cv" not in m:
        print(f"{kind}validation accuracy: {describe(m['val_accuracy'], m['n_val'], m['val_accuracy_ci95'])}")
    else:
        print(accuracy_line(m))
    print(f"{kind or 'run '}folder: {result.path}")
    return 0


def _refuse_flags_with_resume(args: argparse.Namespace) -> None:
    """--resume continues a run exactly as recorded in its recipe.toml: other settings would be ignored."""
    from toolkit.cli.flags import given_settings
    from toolkit.core.errors import UserError

    given = [f"--{key}" for key in ("data", "recipe", "out", "ensemble") if getattr(args, key) is not None]
    given += given_settings(args) + (["--overwrite"] if args.overwrite else [])
    if given:
        raise UserError(f"--resume continues {args.resume!r} with the settings in its recipe.toml; it takes no other "
                        f"settings. Received: {', '.join(given)}. Drop them, or start a new run with --out to change "
                        "settings.")


def _config_from_args(args: argparse.Namespace):
    """The recipe, with the flags given on the command line on top."""
    from toolkit.cli.flags import overrides_from_args
    from toolkit.config.recipes import build_config, read_recipe
    from toolkit.core.errors import UserError

    if not args.data:
        raise UserError("finetune needs --data (or --resume RUN). Received: data=None")
    data = str(Path(args.data).resolve())  # recorded absolute, so the run resumes from any directory
    overrides = overrides_from_args(args, read_recipe(args.recipe or "quick")) | {"data": data}
    return build_config(args.recipe, overrides)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from toolkit.cli.flags import add_setting_flags, subcommand

    p = subcommand(sub, "finetune", _cmd_finetune, "train a classifier on a folder of labelled images")
    p.add_argument("--data", help="dataset folder or CSV manifest (see above)")
    p.add_argument("--recipe", default=None, help="a recipe shipped with toolkit (quick, small-data, accurate) or a "
                   "TOML file's path (default: quick)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date>-<time>-<backbone>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    p.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run (or ensemble folder) "
                   "from its last finished epoch")
    p.add_argument("--ensemble", metavar="SPEC", default=None, help="train independent members into one ensemble "
                   "folder: comma-separated backbones (mobilenet_v2,efficientnet_lite0) or a number of seeds (3)")
    add_setting_flags(p)


# ----------------------------------------------------------------------------- data-service


def _cmd_data_service(args: argparse.Namespace) -> int:
    """Offload image decoding and augmentation to other machines' CPUs when the training machine's CPU is
    the bottleneck. Start one dispatcher and any number of workers (they must see the data at the same
    paths), then train with `toolkit finetune --data-service grpc://DISPATCHER:PORT`. Runs until
    interrupted."""
    from toolkit.core import paths
    from toolkit.core.errors import UserError
    from toolkit.train import distribute

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0-65535 (0: any free port). Received: port={args.port}")
    if args.work_dir:
        if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
            raise UserError(f"--work-dir {args.work_dir!r} is a file; the dispatcher keeps its journal in a folder. "
                            "Choose a folder path.")
        paths.check_location(Path(args.work_dir) / "journal", "--work-dir")
    if args.role == "dispatcher":
        server = distribute.start_dispatcher(args.port, args.work_dir)
        print(f"tf.data service dispatcher: {server.target} (pass --data-service {server.target} to finetune)", flush=True)
    else:
        if not args.dispatcher:
            raise UserError("a worker needs --dispatcher grpc://HOST:PORT. Received: dispatcher=None")
        server = distribute.start_worker(args.dispatcher, args.port, args.host)
        print(f"tf.data service worker serving {args.dispatcher}", flush=True)
    server.join()  # until interrupted
    return 0


def _add_data_service(sub: argparse._SubParsersAction) -> None:
    from toolkit.cli.flags import subcommand

    p = subcommand(sub, "data-service", _cmd_data_service,
                   "run a tf.data service dispatcher or worker for offloaded input preprocessing", show_defaults=True)
    p.add_argument("role", choices=("dispatcher", "worker"))
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    p.add_argument("--dispatcher", help="worker: the dispatcher's grpc://HOST:PORT")
    p.add_argument("--host", default="localhost", help="worker: the host name the dispatcher and clients reach it by")
    p.add_argument("--work-dir", default="", help="dispatcher: folder for its journal (fault-tolerant restarts)")


# ----------------------------------------------------------------------------- inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Verify every image of DATA (decoding it; verdicts are cached) and print the classes, images per
    class and split, the imbalance ratio, image sizes, and every problem found: files that will be
    skipped (with the reason), warnings such as train/test leakage, and files handled automatically
    (EXIF rotation, CMYK, transparency, huge images); then the freeze plan --freeze auto would choose.
    A CSV manifest with a `labels` column (class names joined by ';', several per image) is described as
    multi-label data: images per label, images with no label, label co-occurrence, and the fewest images of a
    label in any of 5 iteratively stratified folds. Exit status 2 (after the report) when the data cannot train."""
    from toolkit.config.settings import MAX_SEED
    from toolkit.core.errors import UserError
    from toolkit.data.datasets import DatasetError, check_trainable, dataset_statistics, load_splits

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1): both sides of the split need images. Received: "
                        f"val_fraction={args.val_fraction}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}]. Received: seed={args.seed}")
    from toolkit.data.discovery import has_labels_column

    if Path(args.data).is_file() and has_labels_column(Path(args.data)):
        return _inspect_multilabel(args)
    splits = load_splits(args.data, args.val_fraction, args.seed, progress=True, min_classes=0)
    stats = dataset_statistics(splits)
    print(f"data: {splits.source}")
    print(f"classes: {stats['classes']}; train {stats['train_images']}, val {stats['val_images']} "
          f"({stats['val_source']}), test {stats['test_images']}")
    width = max([len(n) for n in splits.class_names] + [5])
    print(f"  {'class':<{width}}  train    val")
    for name in splits.class_names:
        print(f"  {name:<{width}}  {stats['train_per_class'][name]:>5}  {stats['val_per_class'][name]:>5}")
    print(f"imbalance ratio (largest/smallest train class): {stats['imbalance_ratio']}")
    if "image_size" in stats:
        s = stats["image_size"]
        print(f"image sizes (w x h): min {s['min'][0]}x{s['min'][1]}, median {s['median'][0]}x{s['median'][1]}, "
              f"max {s['max'][0]}x{s['max'][1]}")
    _print_problems(splits.problems, args.all_problems)
    try:
        if len(splits.class_names) < 2:
            raise DatasetError(f"usable images for {len(splits.class_names)} classes {list(splits.class_names)}; a "
                               "classifier needs at least two class folders with usable images")
        warnings = check_trainable(splits)
    except DatasetError as exc:
        print(f"cannot train on this data: {exc}")
        return 2
    for warning in warnings:
        print(f"warning: {warning}")
    from toolkit import backbones
    from toolkit.train.freeze import plan_freeze

    spec = backbones.get_spec(args.backbone)
    plan = plan_freeze("auto", len(splits.train), len(splits.class_names), [s.name for s in spec.stages])
    print(f"freeze plan for --freeze auto with {args.backbone}: {plan.describe()}")
    return 0


def _print_problems(problems, all_problems: bool) -> None:
    skipped = sum(p.severity == "skipped" for p in problems)
    print(f"problems: {skipped} files skipped, {sum(p.severity == 'warning' for p in problems)} warnings, "
          f"{sum(p.severity == 'info' for p in problems)} handled automatically")
    for p in problems:
        if all_problems or p.severity != "info":
            path = p.path.replace("\n", "\\n")  # one line per problem, whatever the file name holds
            print(f"  {p.severity:<8} {path}: {p.reason}")


def _inspect_multilabel(args: argparse.Namespace) -> int:
    """inspect for a multi-label manifest: images per label and split, label co-occurrence, unlabelled images, the
    folds, the freeze plan (training pools the train and val rows, as a multi-label run does)."""
    import pandas as pd

    from toolkit.data.datasets import DatasetError
    from toolkit.data.multilabel import check_fold_counts, co_occurrence, load_multilabel, stratified_folds
    from toolkit.train.folds import AUTO_FOLDS

    data = load_multilabel(args.data, progress=True)
    names = data.class_names
    train = data.labelled()
    sizes = ", ".join(f"{split} {len(part)}" for split, part in data.splits.items())
    print(f"data: {data.source}")
    print(f"classes: {len(names)}; images: {sizes}; {train.targets.sum(axis=1).mean():.2f} labels per training "
          "image on average (training: the train and val rows, pooled)")
    table = pd.DataFrame({split: part.counts() for split, part in data.splits.items()}, index=list(names))
    print("images holding each label:\n" + "\n".join("  " + line for line in table.to_string().splitlines()))
    print("images holding no label: " + ", ".join(f"{split} {part.unlabelled()}" for split, part in
                                                  data.splits.items()))
    pairs = pd.DataFrame(co_occurrence(train.targets), index=list(names), columns=list(names))
    print("training images holding both labels (row and column):\n"
          + "\n".join("  " + line for line in pairs.to_string().splitlines()))
    _print_problems(data.problems, args.all_problems)
    try:
        if len(names) < 2:
            raise DatasetError(f"the training images use {len(names)} labels {list(names)}; a classifier needs two")
        check_fold_counts(train.targets, names, AUTO_FOLDS, str(args.data))
    except DatasetError as exc:
        print(f"cannot cross-validate this data: {exc}")
        return 2
    folds = stratified_folds(train.targets, AUTO_FOLDS, args.seed)
    least = min(int(train.targets[folds == k].sum(axis=0).min()) for k in range(AUTO_FOLDS))
    print(f"folds ({AUTO_FOLDS}, iterative stratification, seed {args.seed}): each fold holds at least {least} "
          f"image{'s' * (least != 1)} of every label")
    from toolkit import backbones
    from toolkit.train.multilabel_run import label_plan

    plan = label_plan("auto", train.targets, [s.name for s in backbones.get_spec(args.backbone).stages])
    print(f"freeze plan for --freeze auto with {args.backbone}: {plan.describe()}"
          + ("" if plan.head_only else " (a multi-label run trains the head alone on the frozen backbone)"))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from toolkit.cli.flags import subcommand

    p = subcommand(sub, "inspect", _cmd_inspect, "describe a dataset: classes, counts, image sizes, problems",
                   show_defaults=True)
    p.add_argument("--data", required=True, help="dataset folder or CSV manifest (as for finetune)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction when DATA has no val/ folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    p.add_argument("--all-problems", action="store_true", help="also list the files handled automatically")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone whose stages the freeze plan counts")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from toolkit.cli.flags import SuggestingParser, subcommand
    from toolkit.cli.backbones import add_backbones_command
    from toolkit.cli.inference import add_inference_commands

    parser = SuggestingParser(
        prog="toolkit",
        description="Transfer learning for small-data image classification (Keras 3 / TensorFlow).",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="debug logging, TensorFlow's own log lines, and "
                       "the traceback of an error")
    noise.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune(sub)
    add_inference_commands(sub)
    _add_inspect(sub)
    _add_data_service(sub)
    add_backbones_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    from toolkit.core.quiet import import_tensorflow

    import_tensorflow(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    from toolkit.core.errors import UserError

    try:
        return func(args)
    except KeyboardInterrupt:
        print("toolkit: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"toolkit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or a failure of the machine: one line, the traceback with -v
        if args.verbose:
            logger.exception("failed")
        print(f"toolkit {args.command}: unexpected error: {type(exc).__name__}: {_one_line(exc)} (run again with -v "
              "for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
