"""Every folder the toolkit writes for the user, and what ``--overwrite`` may replace.

Every folder the toolkit creates (a run, an ensemble, an evaluation, CAMs, an export, an audit) holds a
marker file, :data:`MARKER`, with its kind and a random identity. ``--overwrite`` replaces only

* a marked folder of the kind the command writes (:data:`REPLACEABLE`: a run never by an evaluation),
* every entry of which, at any depth, is one the toolkit writes there (:data:`WRITTEN`, :data:`INSIDE`),
* that is not, does not contain and does not lie inside an input of the command.

The replacement is written into a marked sibling (:func:`staging_dir`) and swapped in by :func:`replace_dir`
only when the command succeeds; the swap checks all of the above again, at that moment, against the identity
recorded when the command started. A run folder that records a folder to replace (``state.json``,
``ensemble.json``) is input, not authority: what it names is read with :func:`Replacement.from_json` and
must be the marked sibling the run was created beside, with the identity recorded then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from toolkit.core import runs
from toolkit.core.errors import UserError
from toolkit.core.paths import check_apart, check_location, fit_name, is_plain_name, staging_name

MARKER = ".toolkit-output"

_COMMON = (MARKER, runs.LOCK_FILE, ".tmp-*")
_AUDIT = (runs.AUDIT_FILE, runs.AUDIT_GALLERY, runs.AUDIT_MANIFEST, runs.AUDIT_SUMMARY)
# What the toolkit writes at the top of each kind of folder; --overwrite refuses a folder holding anything else.
WRITTEN: dict[str, tuple[str, ...]] = {
    "run": _COMMON + (runs.MODEL_FILE, runs.RECIPE_FILE, runs.STATE_FILE, runs.CLASSES_FILE, runs.CALIBRATION_FILE,
                      runs.METRICS_FILE, runs.PCA_FILE, runs.DATA_FILE, runs.REPORT_FILE, runs.REPORT_HTML_FILE,
                      runs.HISTORY_FILE, runs.CURVES_FILE, "*.weights.h5", runs.CACHE_DIR, runs.TENSORBOARD_DIR,
                      runs.FOLDS_FILE, runs.CV_BEST_FILE, runs.UNKNOWN_FILE, runs.THRESHOLDS_FILE,
                      runs.OOF_FILE) + _AUDIT,
    "ensemble": _COMMON + (runs.ENSEMBLE_FILE, runs.METRICS_FILE, runs.REPORT_HTML_FILE),  # and its member runs, each marked itself
    "evaluation": _COMMON + (runs.METRICS_FILE, "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv",
                             "mistakes.png", runs.REPORT_HTML_FILE, "per_label.csv"),
    "explain": _COMMON + ("*.png",),
    "audit": _COMMON + _AUDIT + (runs.REPORT_HTML_FILE,),
    "export": _COMMON + (runs.CLASSES_FILE, "savedmodel", "model.tflite", "model-fp16.tflite", "model-int8.tflite",
                         "model.onnx", "export.json", runs.THRESHOLDS_FILE),
}
# What the toolkit writes inside the sub-folders it makes (paths relative to them; ``*`` spans folders).
INSIDE: dict[str, tuple[str, ...]] = {
    runs.CACHE_DIR: ("features.npz", "features-*of*.npz", "cv-features.npz", "multilabel-features.npz", ".tmp-*"),
    runs.TENSORBOARD_DIR: ("*events.out.tfevents.*", "*.profile-empty", "*/plugins/profile/*"),
    "savedmodel": ("saved_model.pb", "fingerprint.pb", "keras_metadata.pb", "variables/variables.*", "assets/*"),
}
# The kinds of folder an output of each kind may replace: finetune writes a run or an ensemble (the
# freeze plan decides), so each may replace the other; everything else replaces only its own kind.
REPLACEABLE: dict[str, tuple[str, ...]] = {"run": ("run", "ensemble"), "ensemble": ("run", "ensemble")}


class RunExistsError(UserError):
    pass


# ----------------------------------------------------------------------------- paths and names


def read_marker(path: Path) -> dict[str, Any]:
    """``path``'s marker ({} for a folder the toolkit did not create, or a marker that is not one)."""
    try:
        if (path / MARKER).is_symlink():
            return {}
        values = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) and isinstance(values.get("kind"), str) else {}


def marker_kind(path: Path) -> str | None:
    """The kind of toolkit folder ``path`` is, from its marker; None for a folder the toolkit did not create."""
    return read_marker(path).get("kind")


def mark(path: Path, kind: str) -> str:
    """Mark ``path`` as a toolkit folder of ``kind``; returns its new identity."""
    identity = uuid.uuid4().hex
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    runs.write_json(path / MARKER, {"kind": kind, "created": stamp, "id": identity})
    return identity


def identity(path: Path) -> str:
    """The identity in ``path``'s marker; a marker written before markers held one gets one now."""
    marker = read_marker(path)
    if not isinstance(marker.get("id"), str) or not marker["id"]:
        marker["id"] = uuid.uuid4().hex
        runs.write_json(path / MARKER, marker)
    return marker["id"]


def foreign_entries(path: Path) -> list[str]:
    """Entries below a marked folder, at any depth, that the toolkit does not write there (all if unmarked)."""
    kind = marker_kind(path)
    patterns = WRITTEN.get(kind or "", ())
    out = []
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            out.append(entry.name)  # the toolkit writes no links
        elif kind == "ensemble" and entry.is_dir() and marker_kind(entry) == "run":
            out += [f"{entry.name}/{name}" for name in foreign_entries(entry)]
        elif not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            out.append(entry.name)
        elif entry.is_dir():
            if entry.name.startswith(".tmp-"):
                out.append(entry.name)  # temporary names are files
            else:
                out += [f"{entry.name}/{name}" for name in _unlisted(entry, INSIDE.get(entry.name, ()))]
        elif not entry.is_file():
            out.append(entry.name)  # a pipe, a socket or a device named like a toolkit file
    return out


def _unlisted(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    """Files (and links) below ``folder`` whose relative paths match none of ``patterns``."""
    out = []
    for current, dirs, files in os.walk(folder):
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(current, d))):
            full = os.path.join(current, name)
            rel = os.path.relpath(full, folder)
            if os.path.islink(full) or not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                out.append(rel)
    return sorted(out)


# ----------------------------------------------------------------------------- what --overwrite replaces


def check_replaceable(path: str | Path, overwrite: bool, kind: str) -> bool:
    """Whether ``path`` holds something that ``--overwrite`` is to replace; refuses what it must not.

    An absent or empty folder needs nothing replaced. A non-empty one is replaced only with
    ``overwrite``, only if the toolkit made it as an output that ``kind`` may replace, and only if
    the toolkit wrote everything in it.
    """
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"--out {str(path)!r} is a symbolic link; toolkit writes only into folders it can replace "
                        "whole. Choose the folder it points to, or another --out.")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(path)!r} is a file, not a folder. Choose a folder path for --out.")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not overwrite:
        raise RunExistsError(
            f"--out {str(path)!r} already exists and is not empty. "
            "Choose another --out, resume a run with --resume, or pass --overwrite to replace it."
        )
    found = marker_kind(path)
    if found is None:
        raise UserError(f"--overwrite refused: --out {str(path)!r} was not created by toolkit (no {MARKER} "
                        "marker), so it may hold your own files. Choose another --out, or move it away yourself.")
    if found not in REPLACEABLE.get(kind, (kind,)):
        raise UserError(f"--overwrite refused: --out {str(path)!r} holds a toolkit {found}, and this command writes "
                        f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}; --overwrite replaces only an output of the same "
                        "kind. Choose another --out.")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--overwrite refused: --out {str(path)!r} holds files toolkit did not write ({shown}). "
                        "Move them out first, or choose another --out.")
    return True


def check_output_dir(path: str | Path, overwrite: bool, kind: str,
                     inputs: Mapping[str, Sequence[str | Path]] | None = None) -> bool:
    """Everything about an output folder that can be checked before the work: apart from the inputs,
    writable, and empty or replaceable (:func:`check_replaceable`'s answer)."""
    check_apart(path, inputs or {})
    check_location(path)
    return check_replaceable(path, overwrite, kind)


@dataclasses.dataclass(frozen=True)
class Replacement:
    """The folder a staged output replaces when it is finished: a sibling's name and its marker's identity."""

    name: str
    id: str

    @classmethod
    def of(cls, target: Path) -> "Replacement":
        return cls(target.name, identity(target))

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "id": self.id}

    @classmethod
    def from_json(cls, value: Any, stage: Path, source: Path) -> "Replacement":
        """What ``source`` (a file of the staged folder ``stage``) says is replaced, refused unless it names the
        sibling that ``stage`` is the staging folder of, with an identity."""
        fix = (f"{source} names a folder to replace that this folder was not created beside; restore the file, or "
               "move the folder's contents to a new run yourself")
        if not isinstance(value, dict) or set(value) != {"name", "id"}:
            raise UserError(f"{fix}. Received: replaces={value!r:.120}")
        name, ident = value["name"], value["id"]
        if (not is_plain_name(name) or not isinstance(ident, str) or not ident
                or staging_name(Path(name)) != stage.name):
            raise UserError(f"{fix}. Received: replaces={value!r:.120}")
        return cls(name, ident)


def staging_dir(target: Path, kind: str) -> Path:
    """The marked temporary sibling a replacement of ``target`` is written into (emptied if left over)."""
    stage = target.with_name(staging_name(target))
    if stage.is_symlink() or (stage.exists() and marker_kind(stage) is None):
        raise UserError(f"{stage} exists and was not made by toolkit; move it away, then run again.")
    if stage.exists():
        foreign = foreign_entries(stage)
        if foreign:
            raise UserError(f"{stage} is a toolkit folder left by an earlier run, but holds files toolkit did not "
                            f"write ({', '.join(foreign[:5])}); move them out, then run again.")
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    mark(stage, kind)
    return stage


def replace_dir(stage: Path, target: Path, kind: str, expected: str | None, then: str = "") -> None:
    """Swap a finished ``stage`` in for its sibling ``target``, checked again now.

    ``target`` is replaced only when it is the staging folder's sibling and, if it holds anything, a
    marked output ``kind`` may replace, with the identity ``expected`` recorded when the work started
    and nothing in it that toolkit did not write. The old folder is deleted after the swap, and only
    after the same check on it there (a file added meanwhile puts everything back as it was). ``then``
    ends a refusal's message: what becomes of the finished output.
    """
    if target.parent.resolve() != stage.parent.resolve() or staging_name(target) != stage.name:
        raise UserError(f"{stage} cannot replace {target}: it is not that folder's staging folder.")
    keep = then or f"The finished output stays in {stage}."
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{target} is no longer a folder toolkit wrote; it was left as it is. {keep}")
    if target.exists() and any(target.iterdir()):
        if expected is None or read_marker(target).get("id") != expected:
            raise UserError(f"{target} is not the folder this output was started to replace (its {MARKER} differs); "
                            f"it was left as it is. {keep} Move one of them away yourself.")
        try:
            check_replaceable(target, True, kind)
        except UserError as exc:
            raise UserError(f"{exc} It was left as it is. {keep}") from None
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix="." + fit_name(target.name, reserve=20) + ".old-", dir=target.parent))
        os.replace(target, old / "folder")
        late = foreign_entries(old / "folder") if any((old / "folder").iterdir()) else []
        if late:  # written between the check and the move: undo
            os.replace(old / "folder", target)
            old.rmdir()
            raise UserError(f"{target} received files toolkit did not write ({', '.join(late[:5])}) while it was being "
                            f"replaced; it was left as it is. {keep}")
    try:
        os.replace(stage, target)
    except OSError:
        if old is not None:
            os.replace(old / "folder", target)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(path: str | Path, overwrite: bool, kind: str = "run",
                    inputs: Mapping[str, Sequence[str | Path]] | None = None) -> tuple[Path, Replacement | None]:
    """Create and mark a folder to write into: (the folder, what it replaces when finished, or None).

    When ``path`` holds an earlier output that ``overwrite`` replaces, the folder returned is a
    staging sibling: :func:`replace_dir` swaps it in once the work has succeeded.
    """
    path = Path(path)
    if check_output_dir(path, overwrite, kind, inputs):
        replacement = Replacement.of(path)
        return staging_dir(path, kind), replacement
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    return path, None


@contextlib.contextmanager
def output_dir(path: str | Path, overwrite: bool, kind: str,
               inputs: Mapping[str, Sequence[str | Path]] | None = None) -> Iterator[Path]:
    """A folder for a command's outputs that appears only when the command succeeds.

    The outputs are written into a marked temporary sibling, which replaces ``path`` at the end;
    on an error it is deleted, and whatever was at ``path`` stays as it was.
    """
    target = Path(path)
    expected = identity(target) if check_output_dir(target, overwrite, kind, inputs) else None
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(target, kind)
    try:
        yield stage
        replace_dir(stage, target, kind, expected, then="Nothing was written; run the command again then.")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_output_file(path: str | Path, overwrite: bool, inputs: Mapping[str, Sequence[str | Path]],
                      header: tuple[str, ...] = (runs.PREDICTIONS_HEADER, runs.MULTILABEL_PREDICTIONS_HEADER),
                      written_by_toolkit=None) -> Path:
    """Refuse a CSV ``--out`` that is a folder, an input, unwritable, or a file toolkit did not write (by its
    header, or ``written_by_toolkit(path) -> bool`` for another format)."""
    path = Path(path)
    check_apart(path, inputs)
    if path.is_dir():
        raise UserError(f"--out {str(path)!r} is a folder; --out names the CSV file to write, "
                        f"e.g. {str(path / 'predictions.csv')!r}.")
    check_location(path)
    if path.exists():
        if not overwrite:
            raise RunExistsError(f"--out {str(path)!r} already exists. Choose another --out, or pass --overwrite "
                                 "to replace it.")
        if written_by_toolkit is not None:
            if not path.is_file() or not written_by_toolkit(path):
                raise UserError(f"--overwrite refused: {str(path)!r} is not a file written by toolkit (not its "
                                "columns). Choose another --out.")
            return path
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline(max(map(len, header)) + 1)
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith(tuple(header)) or not path.is_file():
            raise UserError(f"--overwrite refused: {str(path)!r} is not a predictions CSV written by toolkit (its "
                            f"first line is not '{header[0]},...'). Choose another --out.")
    return path
