"""Finding labelled images on disk: folder-per-class trees, split folders, CSV manifests.

Nothing is opened here but folders and the CSV: what each file is (an image, a broken link, a
named pipe) is for verification (:mod:`toolkit.data.verify`) to say. Every oddity found on the way is
recorded as a :class:`Problem`, never dropped without a word.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.core.paths import is_within

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jfif"})
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
SEPARATOR = ";"  # class names in one `labels` cell
LABELS_COLUMN = "labels"


class DatasetError(UserError):
    """The data cannot be used for training; the message says what to fix."""


def printable(path: str) -> str:
    """``path`` as text that can be printed and written anywhere: bytes that are not UTF-8 shown as ``\\xe9``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str  # printable (:func:`printable`): it goes into reports, JSON and the terminal
    reason: str
    severity: str  # "skipped" (file not used), "warning" (used, but look at it), "info" (handled)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", printable(self.path))


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")  # .DS_Store, ._resource forks, .git ...


def walk_files(folder: Path, problems: list[Problem]) -> list[Path]:
    """Every entry under ``folder`` that is not a folder, hidden ones left out, sorted.

    Symbolic links to folders are followed once; a link to a folder already searched, or to
    ``folder`` itself or above it (a loop), is listed in ``problems`` and not followed. Links
    that point nowhere, named pipes and devices are returned like files: verification says
    what they are (:func:`toolkit.data.verify.verify_file`).
    """
    top = Path(os.path.realpath(folder))
    seen: set[Path] = set()
    out: list[Path] = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = Path(os.path.realpath(current))
        if seen and (real in seen or is_within(top, real)):
            problems.append(Problem(current, f"symbolic link to {real}, a folder already searched (a loop); "
                                             "not followed", "warning"))
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            if Path(d).suffix.lower() in IMAGE_EXTENSIONS:
                problems.append(Problem(os.path.join(current, d), "a folder named like an image; searched as a "
                                                                  "folder", "info"))
        out += [Path(current) / f for f in files if not f.startswith(".")]
    return sorted(out)


def _scan_class_tree(root: Path, problems: list[Problem]) -> dict[str, list[str]]:
    """{class name: image paths} for root/<class>/**; hidden files and non-images are left out."""
    found: dict[str, list[str]] = {}
    top = root.resolve()
    for entry in sorted(p for p in root.iterdir() if not _is_hidden(p)):
        if entry.is_symlink() and not entry.exists():
            problems.append(Problem(str(entry), "symbolic link to nothing (broken); ignored", "warning"))
            continue
        if not entry.is_dir():
            problems.append(Problem(str(entry), "not inside a class folder; ignored", "info"))
            continue
        if printable(entry.name) != entry.name:
            problems.append(Problem(str(entry), "class folder name is not valid UTF-8; class ignored (rename the "
                                                "folder, e.g. with convmv)", "warning"))
            continue
        if entry.is_symlink() and is_within(top, entry.resolve()):
            problems.append(Problem(str(entry), f"symbolic link to {entry.resolve()}, which holds the data folder "
                                                "itself (a loop); not a class, ignored", "warning"))
            continue
        files = walk_files(entry, problems)
        images = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        for p in files:
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(str(p), f"not an image file name ({p.suffix or 'no extension'}); ignored", "info"))
        if not images:
            problems.append(Problem(str(entry), "empty class folder (no images); class ignored", "warning"))
            continue
        found[entry.name] = images
    return found


def _find_child(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    return None


def has_labels_column(csv_path: Path) -> bool:
    """Whether the manifest's header names a ``labels`` column (multi-label data, :mod:`toolkit.data.multilabel`)."""
    import pandas as pd

    try:
        columns = pd.read_csv(csv_path, nrows=0).columns
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError):
        return False  # the single-label reader says what is wrong with the file
    if LABELS_COLUMN in columns and "label" in columns:
        raise DatasetError(f"{csv_path}: has both a `label` and a `labels` column; keep `label` (one class per "
                           f"image) or `labels` (class names joined by {SEPARATOR!r}, several per image), not both")
    return LABELS_COLUMN in columns


def _read_manifest(csv_path: Path, problems: list[Problem]) -> dict[str, dict[str, list[str]]]:
    """{split: {class: paths}} from a CSV with path,label[,split] columns."""
    import pandas as pd

    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{csv_path}: cannot be read as CSV ({exc}). Expected columns path,label[,split].") from exc
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {sorted(missing)}. Received columns: {list(frame.columns)}; "
            "expected path,label and optionally split (train/val/test)."
        )
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    aliases = {alias: split for split, names in SPLIT_NAMES.items() for alias in names}
    first_row: dict[Path, tuple[int, str, str]] = {}  # path: (line, label, split) of its first row
    conflicting: set[Path] = set()
    for row_number, row in enumerate(frame.itertuples(index=False), start=2):
        rel, label = str(row.path).strip(), str(row.label).strip()
        split = aliases.get(str(getattr(row, "split", "train") or "train").strip().lower())
        if not rel or not label:
            problems.append(Problem(f"{csv_path}:{row_number}", "empty path or label; row ignored", "skipped"))
            continue
        if split is None:
            problems.append(Problem(f"{csv_path}:{row_number}", f"unknown split {row.split!r} (use train/val/test); row ignored", "skipped"))
            continue
        path = (csv_path.parent / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
        if not path.exists():
            problems.append(Problem(str(path), f"listed in {csv_path.name} (line {row_number}) but missing", "skipped"))
            continue
        if path in first_row:
            line, first_label, first_split = first_row[path]
            if (first_label, first_split) != (label, split):
                conflicting.add(path)
                problems.append(Problem(str(path), f"listed twice in {csv_path.name} with different labels or splits "
                                        f"(line {line}: {first_label}/{first_split}, line {row_number}: {label}/{split}); "
                                        "every row of it skipped", "skipped"))
            else:
                problems.append(Problem(str(path), f"listed twice in {csv_path.name} (lines {line} and {row_number}); "
                                        "used once", "info"))
            continue
        first_row[path] = (row_number, label, split)
        out[split][label].append(str(path))
    for path in conflicting:
        _, label, split = first_row[path]
        out[split][label].remove(str(path))
    return out


def check_source(root: str | Path) -> None:
    """Raise the data error early (before a run folder is made) when ``root`` is neither a folder nor a CSV."""
    root = Path(root)
    if root.exists() and not root.is_dir() and root.suffix.lower() != ".csv":
        raise DatasetError(
            f"--data {str(root)!r} is a file, not a folder or a .csv manifest. Pass the folder that holds one "
            "sub-folder per class (or train/ and val/), or a CSV manifest with path,label columns."
        )
    if not (root.is_dir() or (root.is_file() and root.suffix.lower() == ".csv")):
        raise DatasetError(
            f"Data folder not found. Received: data={str(root)!r}. Pass a folder with one sub-folder per class, "
            "a folder with train/ and val/ splits, or a CSV manifest with path,label columns."
        )


def _check_split_names(root: Path) -> None:
    """Refuse a folder where a split name (train/, val/, test/...) stands beside other folders: it could be a split
    or a class named like one, and guessing either way trains the wrong thing."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    splits = [n for n in folders if n.lower() in {a for names in SPLIT_NAMES.values() for a in names}]
    others = [n for n in folders if n not in splits]
    if splits and others:
        shown = ", ".join(f"{n}/" for n in others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise DatasetError(
            f"--data {str(root)!r} holds {', '.join(f'{n}/' for n in splits)} beside {shown}: is "
            f"{splits[0]}/ a split or a class? If a split, put every class folder inside the split folders; if a class, "
            f"rename it (e.g. {splits[0]}_class/).")


def discover(root: Path, problems: list[Problem]) -> tuple[dict[str, dict[str, list[str]]], dict[str, str], str]:
    """({split: {class: paths}}, {split: where it comes from}, description of the source)."""
    check_source(root)
    if root.is_file():
        if has_labels_column(root):
            raise DatasetError(f"{root}: its `labels` column makes it multi-label data, which `toolkit finetune` trains "
                               "a multi-label run on and `toolkit evaluate` measures such a run with; this takes one "
                               "class per image: give each image one class in a `label` column, or use a multi-label run")
        layout = _read_manifest(root, problems)
        return layout, {split: f"rows with split {split} in {root}" for split in layout}, f"CSV manifest {root}"
    _check_split_names(root)
    train_dir = _find_child(root, SPLIT_NAMES["train"])
    if train_dir is None:
        return {"train": _scan_class_tree(root, problems)}, {"train": str(root)}, f"folder-per-class tree {root}"
    layout, where = {"train": _scan_class_tree(train_dir, problems)}, {"train": str(train_dir)}
    for split in ("val", "test"):
        child = _find_child(root, SPLIT_NAMES[split])
        if child is not None:
            layout[split], where[split] = _scan_class_tree(child, problems), str(child)
    return layout, where, f"split folders under {root}"
