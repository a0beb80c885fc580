"""Finding labelled images on disk: folder-per-class trees, with or without
``train/`` / ``val/`` / ``test/`` splits, and a seeded stratified split when
there is no validation folder.

This module only lists files and labels; decoding lives in
:mod:`toolkit.pipeline`. Class names are sorted so that label indices do not
depend on the file system's listing order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TRAIN_NAMES = ("train",)
VAL_NAMES = ("val", "validation", "valid")
TEST_NAMES = ("test",)


class DatasetError(ValueError):
    """The data cannot be used for training; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Image paths with integer labels into ``class_names``."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    train: Split
    val: Split
    test: Split | None
    class_names: tuple[str, ...]
    val_source: str  # "folder" or "stratified split (fraction f, seed s)"


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)), key=lambda p: p.name)


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*") if p.is_file() and not _is_hidden(p) and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_class_tree(root: Path, class_names: tuple[str, ...] | None = None) -> Split:
    """All images under ``root/<class>/`` (recursively), labelled by sub-folder."""
    folders = _class_folders(root)
    names = tuple(p.name for p in folders) if class_names is None else class_names
    index = {n: i for i, n in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in index:
            raise DatasetError(
                f"{folder}: class {folder.name!r} is not among the training classes {list(names)}; "
                "every split must use the same class folders."
            )
        images = _list_images(folder)
        if not images:
            logger.warning("%s: empty class folder (no images); ignored", folder)
        paths += [str(p) for p in images]
        labels += [index[folder.name]] * len(images)
    return Split(tuple(paths), tuple(labels), names)


def _find_child(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return None


def stratified_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Split each class separately so that the validation set keeps the class mix."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1). Received: val_fraction={val_fraction!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    val_idx: list[int] = []
    for c in range(len(split.class_names)):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # keep at least one image on each side
        else:
            n_val = 0
        val_idx += idx[:n_val].tolist()
    val_set = set(val_idx)
    train_idx = [i for i in range(len(split)) if i not in val_set]
    val_idx.sort()

    def take(indices: list[int]) -> Split:
        return Split(tuple(split.paths[i] for i in indices), tuple(split.labels[i] for i in indices), split.class_names)

    return take(train_idx), take(val_idx)


def load_splits(data: str | Path, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Discover the dataset at ``data`` and return train / val (/ test) splits.

    Raises:
        DatasetError: missing folder, no images, or fewer than two classes.
    """
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"Data folder not found. Received: data={str(data)!r}. Pass a folder with one sub-folder per class.")
    train_dir = _find_child(root, TRAIN_NAMES)
    base = train_dir or root
    train = scan_class_tree(base)
    present = [name for name, n in train.counts().items() if n > 0]
    if len(train) == 0:
        raise DatasetError(
            f"{base}: no images found. Expected one sub-folder per class holding images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    if len(present) < 2:
        raise DatasetError(
            f"{base}: found images for {len(present)} class(es) {present}; a classifier needs at least two "
            "class folders with images."
        )
    val_dir = _find_child(root, VAL_NAMES) if train_dir else None
    test_dir = _find_child(root, TEST_NAMES) if train_dir else None
    if val_dir is not None:
        val = scan_class_tree(val_dir, train.class_names)
        source = f"folder {val_dir.name}/"
    else:
        train, val = stratified_split(train, val_fraction, seed)
        source = f"stratified split (fraction {val_fraction}, seed {seed})"
    test = scan_class_tree(test_dir, train.class_names) if test_dir is not None else None
    return DatasetSplits(train, val, test, train.class_names, source)
