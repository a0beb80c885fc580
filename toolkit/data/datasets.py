"""Finding labelled images, checking them, splitting them, describing them.

Three layouts are understood:

* a folder-per-class tree (class = sub-folder, searched recursively);
* a tree with ``train/``, ``val/`` or ``validation/``, ``test/`` splits, each
  folder-per-class;
* a CSV manifest (read with pandas) with ``path,label`` columns, paths
  relative to the CSV, and an optional ``split`` column (train/val/test).

Without a validation split, a stratified split with a seed is held out. Class
names are sorted, so label indices never depend on listing order. Every file
is verified by decoding (:mod:`toolkit.data.verify`); unusable files are skipped
and reported with their reason, and the rest trains.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.data.discovery import IMAGE_EXTENSIONS, DatasetError, Problem, discover
from toolkit.data.verify import ImageRecord, VerificationCache, verify_files

logger = logging.getLogger(__name__)

# Fewer training images than this in a class: the run trains, with a warning.
FEW_TRAIN_IMAGES = 5


class VerifiedPaths:
    """What to decode for images listed by ``paths`` with their verification ``records`` (None before verifying):
    a converted copy where the original could not be decoded by TensorFlow as it is, and whether it is a JPEG."""

    paths: tuple[str, ...]
    records: tuple[ImageRecord, ...] | None

    @property
    def decode_paths(self) -> tuple[str, ...]:
        return tuple(r.decode_path for r in self.records) if self.records is not None else self.paths

    @property
    def is_jpeg(self) -> tuple[bool, ...]:
        if self.records is not None:
            return tuple(r.is_jpeg for r in self.records)
        return tuple(Path(p).suffix.lower() in (".jpg", ".jpeg", ".jfif") for p in self.paths)


@dataclasses.dataclass(frozen=True)
class Split(VerifiedPaths):
    """Images with integer labels into ``class_names``; ``records`` once verified."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}

    def __add__(self, other: "Split") -> "Split":
        """Both splits' images in one (same classes)."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot join splits with classes {self.class_names} and {other.class_names}")
        records = self.records + other.records if self.records is not None and other.records is not None else None
        return Split(self.paths + other.paths, self.labels + other.labels, self.class_names, records)

    def take(self, indices) -> "Split":
        records = tuple(self.records[i] for i in indices) if self.records is not None else None
        return Split(tuple(self.paths[i] for i in indices), tuple(self.labels[i] for i in indices), self.class_names, records)



@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    train: Split
    val: Split
    test: Split | None
    class_names: tuple[str, ...]
    val_source: str
    problems: tuple[Problem, ...] = ()
    source: str = ""

    @property
    def val_is_given(self) -> bool:
        """The data has its own validation split (not one held out by :func:`stratified_split`)."""
        return not self.val_source.startswith("stratified")

    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "skipped"]


# ----------------------------------------------------------------------------- splitting


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
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0  # keep one on each side
        val_idx += idx[:n_val].tolist()
    val_set = set(val_idx)
    train_idx = [i for i in range(len(split)) if i not in val_set]
    return split.take(train_idx), split.take(sorted(val_idx))


def _make_split(by_class: dict[str, list[str]], class_names: tuple[str, ...], records: dict[str, ImageRecord] | None,
                where: str, problems: list[Problem]) -> Split:
    index = {n: i for i, n in enumerate(class_names)}
    paths, labels, recs = [], [], []
    for name, files in sorted(by_class.items()):
        if name not in index:
            problems.append(Problem(where, f"class {name!r} is not among the training classes; its images are ignored", "warning"))
            continue
        for f in files:
            if records is not None:
                r = records[f]
                if not r.ok:
                    continue
                recs.append(r)
            paths.append(f)
            labels.append(index[name])
    return Split(tuple(paths), tuple(labels), class_names, tuple(recs) if records is not None else None)


def verify_listing(paths: Sequence[str], problems: list[Problem], cache: VerificationCache | None = None,
                   progress: bool = False) -> dict[str, ImageRecord]:
    """{path: verdict} for ``paths``; each unusable file goes to ``problems`` as skipped, each converted one as
    handled."""
    records = {r.path: r for r in verify_files(paths, cache, progress=progress)}
    for r in records.values():
        if not r.ok:
            problems.append(Problem(r.path, r.reason, "skipped"))
        elif r.reason:
            problems.append(Problem(r.path, r.reason, "info"))
    return records


def load_splits(
    data: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: bool = True,
    cache: VerificationCache | None = None,
    progress: bool = False,
    min_classes: int = 2,
) -> DatasetSplits:
    """Discover, verify and split the dataset at ``data``.

    Raises:
        DatasetError: nothing usable (missing folder; no images or fewer than ``min_classes``
            classes with usable images).
    """
    root = Path(data)
    problems: list[Problem] = []
    layout, where, source = discover(root, problems)

    records: dict[str, ImageRecord] | None = None
    if verify:
        all_paths = [p for split in layout.values() for files in split.values() for p in files]
        records = verify_listing(all_paths, problems, cache, progress)

    train_layout = layout.get("train", {})
    usable = {c: [p for p in files if records is None or records[p].ok] for c, files in train_layout.items()}
    for c, files in usable.items():
        if not files and train_layout[c]:
            problems.append(Problem(c, "every image of this class is unusable; class ignored", "warning"))
    class_names = tuple(sorted(c for c, files in usable.items() if files))
    problems += _case_twins(class_names, where.get("train", str(root)))
    skipped_files = [p.path for p in problems if p.severity == "skipped"]
    unusable = f"{len(skipped_files)} files were unusable{_examples(skipped_files)}"
    if not class_names and min_classes:
        raise DatasetError(
            f"{root}: no usable images found. Expected one sub-folder per class holding images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); {unusable}."
        )
    if len(class_names) < min_classes:
        lost = sorted(c for c, files in usable.items() if not files)
        raise DatasetError(
            f"{root}: found usable images for only one class {list(class_names)}; a classifier needs at least two "
            f"class folders with images"
            + (f" (every image of {lost} is unusable; {unusable})" if lost else "")
            + f". `toolkit inspect --data {root}` lists every problem."
        )

    train = _make_split(train_layout, class_names, records, str(root), problems)
    if "val" in layout:
        val = _make_split(layout["val"], class_names, records, str(root), problems)
        val_source = f"validation split from the data ({where['val']})"
    else:
        train, val = stratified_split(train, val_fraction, seed)
        val_source = f"stratified split (fraction {val_fraction}, seed {seed})"
    test = _make_split(layout["test"], class_names, records, str(root), problems) if "test" in layout else None

    if records is not None:
        problems += _duplicates(train, val, test)
    skipped = sum(p.severity == "skipped" for p in problems)
    if skipped:
        logger.warning("%d unusable files skipped (listed below, and in the run's report):", skipped)
    for p in problems:
        log = logger.warning if p.severity in ("skipped", "warning") else logger.debug
        log("%s: %s: %s", p.severity, p.path, p.reason)
    return DatasetSplits(train, val, test, class_names, val_source, tuple(problems), source)


def _examples(paths: list[str], most: int = 3) -> str:
    if not paths:
        return ""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ": " + ", ".join(paths[:most]) + more


def check_trainable(splits: DatasetSplits) -> list[str]:
    """Refuse splits a run cannot train and validate on; return warnings for ones it can, barely.

    Every class needs at least one training and one validation image.
    """
    train, val = splits.train.counts(), splits.val.counts()
    no_train = [c for c, n in train.items() if n == 0]
    if no_train:
        raise DatasetError(f"{splits.source}: classes {no_train} have no usable training images. Add images to "
                           "them, or remove those class folders.")
    no_val = [c for c, n in val.items() if n == 0]
    if no_val:
        if not splits.val_is_given:
            raise DatasetError(
                f"{splits.source}: classes {no_val} have only 1 usable image; a class needs at least 2 (one to "
                "train on, one to validate on). Add images to them, or remove those class folders.")
        raise DatasetError(f"{splits.source}: the {splits.val_source} has no usable images of classes {no_val}. "
                           "Put at least one image of every class in it.")
    few = {c: n for c, n in train.items() if n < FEW_TRAIN_IMAGES}
    if few:
        return [f"only {', '.join(f'{n} {c}' for c, n in few.items())} training images (fewer than "
                f"{FEW_TRAIN_IMAGES} per class): expect a weak, unstable classifier"]
    return []


def _case_twins(class_names: Sequence[str], where: str) -> list[Problem]:
    """Classes whose names differ only in case (``ants``, ``ANTS``): separate classes, which is rarely meant."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in class_names:
        groups[name.casefold()].append(name)
    return [Problem(where, f"classes {' and '.join(repr(n) for n in names)} differ only in upper/lower case; they are "
                           "trained as separate classes. Merge their folders (or labels) if they are one class", "warning")
            for names in groups.values() if len(names) > 1]


def _duplicates(train: Split, val: Split, test: Split | None) -> list[Problem]:
    """Byte-identical files: across train and val/test (leakage) or within one split."""
    where: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split is None or split.records is None:
            continue
        for r in split.records:
            where[r.sha1].append((name, r.path))
    problems = []
    for group in where.values():
        if len(group) < 2:
            continue
        splits = {s for s, _ in group}
        others = ", ".join(f"{s}:{p}" for s, p in group[1:])
        if "train" in splits and splits & {"val", "test"}:
            problems.append(Problem(group[0][1], f"leakage: byte-identical copies in train and {'/'.join(sorted(splits - {'train'}))} ({others})", "warning"))
        else:
            problems.append(Problem(group[0][1], f"byte-identical duplicate ({others})", "info"))
    return problems


# ----------------------------------------------------------------------------- statistics


def dataset_statistics(splits: DatasetSplits) -> dict:
    """Counts per class and split, imbalance ratio and image-size summary (pure)."""
    counts = splits.train.counts()
    nonzero = [n for n in counts.values() if n > 0]
    stats = {
        "classes": len(splits.class_names),
        "class_names": list(splits.class_names),
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test) if splits.test is not None else 0,
        "train_per_class": counts,
        "val_per_class": splits.val.counts(),
        "min_per_class": min(nonzero, default=0),
        "max_per_class": max(nonzero, default=0),
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 2) if nonzero else 0.0,
        "val_source": splits.val_source,
        "skipped_files": len(splits.skipped()),
    }
    records = [r for s in (splits.train, splits.val, splits.test) if s is not None and s.records for r in s.records]
    if records:
        w = np.array([r.width for r in records])
        h = np.array([r.height for r in records])
        stats["image_size"] = {
            "min": [int(w.min()), int(h.min())],
            "median": [int(np.median(w)), int(np.median(h))],
            "max": [int(w.max()), int(h.max())],
        }
    return stats
