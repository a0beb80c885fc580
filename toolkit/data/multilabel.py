"""Multi-label data: a CSV manifest whose ``labels`` column names every class an image holds.

A cell holds class names joined by ``;`` (``cat;dog``); whitespace around a name is ignored, an empty cell means
the image holds none of the classes, a name repeated in one cell counts once (noted). A manifest with both a
``label`` and a ``labels`` column is refused: which one is meant cannot be guessed. Folder trees stay single-label.

Folds keep every label's share in every fold where the counts allow (iterative stratification, Sechidis et al.
2011, as implemented by the ``iterative-stratification`` package).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.data.discovery import LABELS_COLUMN, SEPARATOR, SPLIT_NAMES, DatasetError, Problem, has_labels_column
from toolkit.data.datasets import VerifiedPaths, verify_listing
from toolkit.data.verify import ImageRecord, VerificationCache

__all__ = ["LABELS_COLUMN", "SEPARATOR", "has_labels_column", "is_multilabel", "load_multilabel", "parse_cell",
           "stratified_folds"]


@dataclasses.dataclass(frozen=True)
class LabelCell:
    """One parsed ``labels`` cell: the class names in order of first mention, and the names written twice."""

    names: tuple[str, ...]
    repeated: tuple[str, ...] = ()


def is_multilabel(data: str | Path) -> bool:
    """Whether ``data`` is a CSV manifest with a ``labels`` column (both ``label`` and ``labels``: a user error)."""
    path = Path(data)
    return path.is_file() and path.suffix.lower() == ".csv" and has_labels_column(path)


def parse_cell(cell: str) -> LabelCell:
    """``" cat ; dog;cat"`` -> names ``("cat", "dog")``, repeated ``("cat",)``; ``""`` -> no names."""
    names: list[str] = []
    repeated: list[str] = []
    for part in str(cell).split(SEPARATOR):
        name = part.strip()
        if not name:
            continue
        (repeated if name in names else names).append(name)
    return LabelCell(tuple(names), tuple(dict.fromkeys(repeated)))


@dataclasses.dataclass(frozen=True)
class MultiLabelSplit(VerifiedPaths):
    """Images of one split and the classes each holds, as a 0/1 matrix over ``class_names``."""

    paths: tuple[str, ...]
    targets: np.ndarray  # (images, classes) uint8
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...] | None = None  # once verified: what to decode (converted copies) and how

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: "MultiLabelSplit") -> "MultiLabelSplit":
        """Both splits' images in one (same classes)."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot join splits with classes {self.class_names} and {other.class_names}")
        records = self.records + other.records if self.records is not None and other.records is not None else None
        return MultiLabelSplit(self.paths + other.paths, np.concatenate([self.targets, other.targets]),
                               self.class_names, records)

    def counts(self) -> dict[str, int]:
        """Images per label."""
        return {name: int(n) for name, n in zip(self.class_names, self.targets.sum(axis=0))}

    def unlabelled(self) -> int:
        """Images that hold none of the classes."""
        return int((self.targets.sum(axis=1) == 0).sum())


@dataclasses.dataclass(frozen=True)
class MultiLabelData:
    splits: dict[str, MultiLabelSplit]  # "train", and "val" / "test" where the manifest names them
    class_names: tuple[str, ...]
    problems: tuple[Problem, ...]
    source: str

    def labelled(self) -> MultiLabelSplit:
        """The images a run trains and cross-validates on: the train rows and the val rows, pooled (test rows are
        left for evaluation)."""
        train = self.splits["train"]
        return train + self.splits["val"] if "val" in self.splits else train

    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "skipped"]


def read_manifest(csv_path: Path, problems: list[Problem],
                  class_names: Sequence[str] | None = None) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """{split: [(path, class names)]} from a CSV with path,labels[,split] columns; rows that cannot be used go to
    ``problems``. With ``class_names`` (a trained run's classes), a name outside them is a user error."""
    import pandas as pd

    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if "path" not in frame.columns:
        raise DatasetError(f"{csv_path}: missing column 'path'. Received columns: {list(frame.columns)}; expected "
                           f"path,labels and optionally split (train/val/test).")
    aliases = {alias: split for split, names in SPLIT_NAMES.items() for alias in names}
    known = set(class_names) if class_names is not None else None
    out: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    first: dict[Path, tuple[int, tuple[str, ...], str]] = {}  # path: (line, names, split) of its first row
    conflicting: set[Path] = set()
    for row_number, row in enumerate(frame.itertuples(index=False), start=2):
        where = f"{csv_path}:{row_number}"
        rel = str(row.path).strip()
        split = aliases.get(str(getattr(row, "split", "train") or "train").strip().lower())
        if not rel:
            problems.append(Problem(where, "empty path; row ignored", "skipped"))
            continue
        if split is None:
            problems.append(Problem(where, f"unknown split {row.split!r} (use train/val/test); row ignored", "skipped"))
            continue
        cell = parse_cell(getattr(row, LABELS_COLUMN))
        if cell.repeated:
            problems.append(Problem(where, f"{', '.join(cell.repeated)} written twice in one cell; counted once",
                                    "info"))
        unknown = [n for n in cell.names if known is not None and n not in known]
        if unknown:
            raise DatasetError(f"{where}: labels {unknown} are not among the classes {sorted(known)}; correct the "
                               "names or train a model that knows them")
        path = Path(rel) if Path(rel).is_absolute() else (csv_path.parent / rel).resolve()
        if not path.exists():
            problems.append(Problem(str(path), f"listed in {csv_path.name} (line {row_number}) but missing", "skipped"))
            continue
        if path in first:
            line, first_names, first_split = first[path]
            if (set(first_names), first_split) != (set(cell.names), split):
                conflicting.add(path)
                problems.append(Problem(str(path), f"listed twice in {csv_path.name} with different labels or splits "
                                                   f"(lines {line} and {row_number}); every row of it skipped",
                                        "skipped"))
            else:
                problems.append(Problem(str(path), f"listed twice in {csv_path.name} (lines {line} and "
                                                   f"{row_number}); used once", "info"))
            continue
        first[path] = (row_number, cell.names, split)
        out.setdefault(split, []).append((str(path), cell.names))
    for split in out:
        out[split] = [(p, names) for p, names in out[split] if Path(p) not in conflicting]
    return out


def targets_matrix(label_sets: Sequence[Sequence[str]], class_names: Sequence[str]) -> np.ndarray:
    """0/1 matrix (images, classes): row i has a 1 for every class image i holds."""
    index = {name: i for i, name in enumerate(class_names)}
    out = np.zeros((len(label_sets), len(class_names)), np.uint8)
    for row, names in enumerate(label_sets):
        out[row, [index[n] for n in names]] = 1
    return out


def load_multilabel(csv_path: str | Path, cache: VerificationCache | None = None, progress: bool = False,
                    class_names: Sequence[str] | None = None) -> MultiLabelData:
    """Read and verify a multi-label manifest; unusable images are skipped and listed. The classes are every name
    the training rows use (sorted), or ``class_names`` when given."""
    csv_path = Path(csv_path)
    problems: list[Problem] = []
    layout = read_manifest(csv_path, problems, class_names)
    every = [path for rows in layout.values() for path, _ in rows]
    records = verify_listing(every, problems, cache, progress)
    usable = {split: [(p, names) for p, names in rows if records[p].ok] for split, rows in layout.items()}
    if class_names is None:
        class_names = tuple(sorted({n for _, names in usable.get("train", []) for n in names}))
        for split, rows in usable.items():
            for p, names in rows:
                for n in names:
                    if n not in class_names:
                        problems.append(Problem(p, f"label {n!r} is not used by any training image; ignored here",
                                                "warning"))
    class_names = tuple(class_names)
    if not usable.get("train"):
        raise DatasetError(f"{csv_path}: no usable training images; `toolkit inspect --data {csv_path}` lists why")
    splits = {split: MultiLabelSplit(tuple(p for p, _ in rows),
                                     targets_matrix([[n for n in names if n in class_names] for _, names in rows],
                                                    class_names), class_names, tuple(records[p] for p, _ in rows))
              for split, rows in usable.items() if rows}
    return MultiLabelData(splits, class_names, tuple(problems), f"multi-label CSV manifest {csv_path}")


def check_fold_counts(targets: np.ndarray, class_names: Sequence[str], folds: int, where: str) -> None:
    """A label held by fewer images than folds cannot be in every fold: a user error that says which and how many."""
    counts = targets.sum(axis=0)
    short = {name: int(n) for name, n in zip(class_names, counts) if n < folds}
    if short:
        shown = ", ".join(f"{name} ({n} image{'s' * (n != 1)})" for name, n in sorted(short.items()))
        fewer = f", or use fewer folds (--cv {int(counts.min())})" if counts.min() >= 2 else ""
        raise DatasetError(f"{where}: labels held by fewer images than the {folds} folds: {shown}; add images of "
                           f"them or remove them from the manifest{fewer}")


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each image, every label spread over the folds in proportion (iterative stratification)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    out = np.empty(len(targets), np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(targets)), targets)):
        out[held] = k
    return out


def co_occurrence(targets: np.ndarray) -> np.ndarray:
    """(classes, classes) counts: images holding both classes; the diagonal is each class's count."""
    t = targets.astype(np.int64)
    return t.T @ t
