"""``toolkit finetune``: train a classifier on a folder of labelled images.

This first version trains the Network-in-Network head on a frozen, pretrained
backbone and writes a complete run folder. Freezing policy, two-stage
fine-tuning, feature caching and resuming build on it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import backbones, runs
from toolkit.augment import AugmentConfig
from toolkit.datasets import DatasetSplits, dataset_statistics, load_splits

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FinetuneConfig:
    data: str
    backbone: str = "mobilenet_v2"
    weights: str | None = "imagenet"
    image_size: int | None = None  # None: the backbone's own input size
    batch_size: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    label_smoothing: float = 0.1
    dropout: float = 0.2
    val_fraction: float = 0.2
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    verbose: int = 1  # Keras progress: 1 progress bar, 2 one line per epoch, 0 silent
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    crop_fraction: float = 0.875  # evaluation centre crop

    def validate(self) -> None:
        backbones.get_spec(self.backbone)  # did-you-mean on a bad name
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 32):
            raise ValueError(f"image_size must be an integer >= 32. Received: image_size={self.image_size!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0. Received: learning_rate={self.learning_rate!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: label_smoothing={self.label_smoothing!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={self.dropout!r}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1]. Received: crop_fraction={self.crop_fraction!r}")
        self.augment.validate()


@dataclasses.dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict[str, Any]


def _one_hot(num_classes: int):
    import tensorflow as tf

    return lambda images, labels: (images, tf.one_hot(labels, num_classes))


def _per_class_accuracy(labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        mask = labels == i
        out[name] = float((predicted[mask] == i).mean()) if mask.any() else None
    return out


def finetune(config: FinetuneConfig) -> FinetuneResult:
    import keras

    from toolkit.augment import pca_statistics
    from toolkit.head import build_classifier
    from toolkit.pipeline import make_dataset

    config.validate()
    spec = backbones.get_spec(config.backbone)
    image_size = config.image_size or spec.input_size
    run_dir = runs.prepare_run_dir(config.out or runs.default_run_dir(config.backbone), config.overwrite)
    keras.utils.set_random_seed(config.seed)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    splits: DatasetSplits = load_splits(config.data, config.val_fraction, config.seed, progress=config.verbose > 0)
    num_classes = len(splits.class_names)
    pca = pca_statistics(list(splits.train.decode_paths), seed=config.seed) if config.augment.pca_sigma > 0 else None
    timings["data_s"] = time.perf_counter() - start
    log_problems(splits)

    start = time.perf_counter()
    backbone = backbones.create(config.backbone, input_shape=(image_size, image_size, 3), weights=config.weights)
    backbone.trainable = False
    model = build_classifier(backbone, num_classes, input_shape=(image_size, image_size, 3), dropout=config.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    timings["build_s"] = time.perf_counter() - start
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    logger.info(
        "finetune: backbone %s (%s px), %d/%d parameters trainable, all %d backbone stages frozen; "
        "%d train / %d val images (val: %s), %d classes",
        config.backbone, image_size, trainable, model.count_params(), len(spec.stages),
        len(splits.train), len(splits.val), splits.val_source, num_classes,
    )

    to_one_hot = _one_hot(num_classes)
    train_ds = make_dataset(
        splits.train, image_size, config.batch_size, training=True, seed=config.seed,
        augment_config=config.augment, pca=pca, crop_fraction=config.crop_fraction,
    ).map(to_one_hot)
    val_ds = make_dataset(splits.val, image_size, config.batch_size, training=False, crop_fraction=config.crop_fraction).map(to_one_hot)

    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, verbose=config.verbose)
    timings["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    probs = model.predict(
        make_dataset(splits.val, image_size, config.batch_size, training=False, crop_fraction=config.crop_fraction), verbose=0
    )
    labels = np.asarray(splits.val.labels)
    predicted = probs.argmax(axis=1)
    eps = 1e-7
    metrics = {
        "val_accuracy": float((predicted == labels).mean()),
        "val_loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)).mean()),
        "n_val": int(len(labels)),
        "per_class_accuracy": _per_class_accuracy(labels, predicted, splits.class_names),
        "class_names": list(splits.class_names),
        "epochs_run": len(history.history.get("loss", [])),
    }
    timings["evaluate_s"] = time.perf_counter() - start
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}

    _write_run(run_dir, model, config, image_size, splits, history.history, metrics, pca)
    logger.info("finetune: validation accuracy %.4f on %d images; run written to %s", metrics["val_accuracy"], len(labels), run_dir)
    return FinetuneResult(run_dir, metrics)


def log_problems(splits: DatasetSplits) -> None:
    """Say, on the log, what was skipped and why (every file, by name) and what looks wrong."""
    skipped = splits.skipped()
    if skipped:
        logger.warning("%d unusable files skipped:", len(skipped))
        for p in skipped:
            logger.warning("  skipped %s: %s", p.path, p.reason)
    for p in splits.problems:
        if p.severity == "warning":
            logger.warning("data warning: %s: %s", p.path, p.reason)


def report_markdown(splits: DatasetSplits, stats: dict, sections: dict[str, str] | None = None) -> str:
    """The run's report.md: data summary, problems found, and any further sections."""
    lines = ["# Run report", "", "## Data", "", f"Source: {splits.source}; validation: {splits.val_source}.", ""]
    lines += ["| class | train | val |", "|---|---:|---:|"]
    for name in splits.class_names:
        lines.append(f"| {name} | {stats['train_per_class'][name]} | {stats['val_per_class'][name]} |")
    lines += ["", f"Imbalance ratio (largest / smallest train class): {stats['imbalance_ratio']}."]
    if "image_size" in stats:
        size = stats["image_size"]
        lines.append(f"Image sizes (w x h): min {size['min'][0]}x{size['min'][1]}, median {size['median'][0]}x{size['median'][1]}, "
                     f"max {size['max'][0]}x{size['max'][1]}.")
    lines += ["", "## Problems found", ""]
    if splits.problems:
        lines += ["| severity | file | reason |", "|---|---|---|"]
        for p in splits.problems:
            lines.append(f"| {p.severity} | `{p.path}` | {p.reason} |")
    else:
        lines.append("None.")
    for title, body in (sections or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"


def _write_run(run_dir: Path, model, config: FinetuneConfig, image_size: int, splits: DatasetSplits,
               history: dict[str, list[float]], metrics: dict[str, Any], pca: dict | None) -> None:
    import pandas as pd

    with runs.atomic_path(run_dir / "model.keras") as tmp:
        model.save(tmp)
    resolved = dataclasses.asdict(config) | {"image_size": image_size}
    resolved["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in resolved["augment"].items()}
    resolved["out"] = str(run_dir)
    runs.write_text(run_dir / "config.toml", runs.to_toml(resolved))
    runs.write_json(run_dir / "classes.json", list(splits.class_names))
    runs.write_json(run_dir / "metrics.json", metrics)
    if pca is not None:
        runs.write_json(run_dir / "pca.json", pca)
    stats = dataset_statistics(splits)
    runs.write_json(run_dir / "data.json", {"statistics": stats, "problems": [dataclasses.asdict(p) for p in splits.problems]})
    timings = "\n".join(f"- {k}: {v} s" for k, v in metrics["timings"].items())
    runs.write_text(run_dir / "report.md", report_markdown(splits, stats, {"Timings": timings}))
    buffer = io.StringIO()
    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    frame.to_csv(buffer, index=False)
    runs.write_text(run_dir / "history.csv", buffer.getvalue())
