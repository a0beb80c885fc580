"""Run folders and every other folder the toolkit writes: file names, markers, atomic writes.

Every file of a run is written to a temporary name in the same folder and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted
run never leaves a half-written ``model.keras`` or ``metrics.json`` behind.

Every folder the toolkit creates (a run, an ensemble, an evaluation, CAMs, an
export) holds a marker file, :data:`MARKER`. ``--overwrite`` replaces only a
marked folder whose entries are all of the kinds the toolkit writes there, and
never one that is, contains or lies inside an input of the command. The
replacement is written into a temporary sibling and swapped in only when the
command succeeds, so a failed ``--overwrite`` leaves the old folder as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from toolkit.errors import UserError

# ----------------------------------------------------------------------------- file names

MARKER = ".toolkit-output"
LOCK_FILE = ".lock"
MODEL_FILE = "model.keras"
RECIPE_FILE = "recipe.toml"
STATE_FILE = "state.json"
CLASSES_FILE = "classes.json"
CALIBRATION_FILE = "calibration.json"
METRICS_FILE = "metrics.json"
PCA_FILE = "pca.json"
DATA_FILE = "data.json"
REPORT_FILE = "report.md"
REPORT_HTML_FILE = "report.html"
TENSORBOARD_DIR = "tensorboard"
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
ENSEMBLE_FILE = "ensemble.json"
CACHE_DIR = "cache"
FOLDS_FILE = "folds.csv"  # a cross-validated run: path, label, fold of every labelled image
CV_BEST_FILE = "cv.best.npz"  # a cross-validated run: every fold head's weights at its own best epoch
AUDIT_FILE = "audit.csv"  # toolkit audit (and a cross-validated run): the findings, most suspicious first
AUDIT_GALLERY = "audit.png"
AUDIT_MANIFEST = "audit-manifest.csv"  # path,label[,split] with the suggested labels applied
AUDIT_SUMMARY = "audit.json"
UNKNOWN_FILE = "unknown.npz"  # what --unknown scores with (toolkit.unknown)
_AUDIT = (AUDIT_FILE, AUDIT_GALLERY, AUDIT_MANIFEST, AUDIT_SUMMARY)

_COMMON = (MARKER, LOCK_FILE, ".tmp-*")
# What the toolkit writes at the top of each kind of folder; --overwrite refuses a folder holding anything else.
WRITTEN: dict[str, tuple[str, ...]] = {
    "run": _COMMON + (MODEL_FILE, RECIPE_FILE, STATE_FILE, CLASSES_FILE, CALIBRATION_FILE, METRICS_FILE, PCA_FILE,
                      DATA_FILE, REPORT_FILE, REPORT_HTML_FILE, HISTORY_FILE, CURVES_FILE, "*.weights.h5", CACHE_DIR,
                      TENSORBOARD_DIR, FOLDS_FILE, CV_BEST_FILE, UNKNOWN_FILE) + _AUDIT,
    "ensemble": _COMMON + (ENSEMBLE_FILE, METRICS_FILE),  # and its member runs, each marked itself
    "evaluation": _COMMON + (METRICS_FILE, "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv",
                             "mistakes.png"),
    "explain": _COMMON + ("*.png",),
    "audit": _COMMON + _AUDIT + (CACHE_DIR,),
    "export": _COMMON + (CLASSES_FILE, "savedmodel", "model.tflite", "model-fp16.tflite", "model-int8.tflite",
                         "model.onnx", "export.json"),
}
# The header every predictions CSV starts with: --overwrite replaces only such a file.
PREDICTIONS_HEADER = "path,label,probability"


class RunExistsError(UserError):
    pass


def default_run_dir(backbone: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{backbone}"


def is_within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_apart(out: str | Path, inputs: Mapping[str, Sequence[str | Path]]) -> None:
    """Refuse an output that is, contains or lies inside an input (``{flag: [paths]}``)."""
    target = Path(out).resolve()
    for flag, paths in inputs.items():
        for given in paths:
            source = Path(given).resolve()
            if target == source:
                why = f"is the same path as {flag}"
            elif is_within(source, target):
                why = f"contains {flag} {str(given)!r}"
            elif is_within(target, source):
                why = f"lies inside {flag} {str(given)!r}"
            else:
                continue
            raise UserError(f"--out {str(out)!r} {why}; writing there could destroy the input. "
                            "Choose an --out outside every input.")


def marker_kind(path: Path) -> str | None:
    """The kind of toolkit folder ``path`` is, from its marker; None for a folder the toolkit did not create."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def foreign_entries(path: Path) -> list[str]:
    """Entries of a marked folder that the toolkit does not write there (all of them if unmarked)."""
    kind = marker_kind(path)
    patterns = WRITTEN.get(kind or "", ())
    out = []
    for entry in sorted(path.iterdir()):
        if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            continue
        if kind == "ensemble" and entry.is_dir() and marker_kind(entry) == "run" and not foreign_entries(entry):
            continue
        out.append(entry.name)
    return out


def check_replaceable(path: str | Path, overwrite: bool) -> bool:
    """Whether ``path`` holds something that ``--overwrite`` is to replace; refuses what it must not.

    An absent or empty folder needs nothing replaced. A non-empty one is replaced only with
    ``overwrite`` and only if the toolkit made it and wrote everything in it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {str(path)!r} is a file, not a folder. Choose a folder path for --out.")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not overwrite:
        raise RunExistsError(
            f"--out {str(path)!r} already exists and is not empty. "
            "Choose another --out, resume a run with --resume, or pass --overwrite to replace it."
        )
    if marker_kind(path) is None:
        raise UserError(f"--overwrite refused: --out {str(path)!r} was not created by toolkit (no {MARKER} "
                        "marker), so it may hold your own files. Choose another --out, or move it away yourself.")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--overwrite refused: --out {str(path)!r} holds files toolkit did not write ({shown}). "
                        "Move them out first, or choose another --out.")
    return True


def mark(path: Path, kind: str) -> None:
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    write_json(path / MARKER, {"kind": kind, "created": stamp})


def staging_dir(target: Path, kind: str) -> Path:
    """The marked temporary sibling a replacement of ``target`` is written into (emptied if left over)."""
    stage = target.with_name(f".{target.name}.partial")
    if stage.exists():
        if marker_kind(stage) is None:
            raise UserError(f"{stage} exists and was not made by toolkit; move it away, then run again.")
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    mark(stage, kind)
    return stage


def replace_dir(stage: Path, target: Path) -> None:
    """Swap a finished ``stage`` in for ``target``; the old folder is deleted only after the swap."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(stage, target)
    except OSError:
        if old is not None:
            os.replace(old / target.name, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(path: str | Path, overwrite: bool, kind: str = "run",
                    inputs: Mapping[str, Sequence[str | Path]] | None = None) -> Path:
    """Create and mark a folder to write into; returns it.

    When ``path`` holds an earlier output that ``overwrite`` replaces, the folder returned is
    a staging sibling: :func:`replace_dir` swaps it in once the work has succeeded.
    """
    path = Path(path)
    check_apart(path, inputs or {})
    if check_replaceable(path, overwrite):
        return staging_dir(path, kind)
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    return path


@contextlib.contextmanager
def output_dir(path: str | Path, overwrite: bool, kind: str,
               inputs: Mapping[str, Sequence[str | Path]] | None = None) -> Iterator[Path]:
    """A folder for a command's outputs that appears only when the command succeeds.

    The outputs are written into a marked temporary sibling, which replaces ``path`` at the end;
    on an error it is deleted, and whatever was at ``path`` stays as it was.
    """
    target = Path(path)
    check_apart(target, inputs or {})
    check_replaceable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_dir(target, kind)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, target)


def check_output_file(path: str | Path, overwrite: bool, inputs: Mapping[str, Sequence[str | Path]],
                      header: str = PREDICTIONS_HEADER) -> Path:
    """Refuse a CSV ``--out`` that is a folder, an input, or a file toolkit did not write (by its header)."""
    path = Path(path)
    check_apart(path, inputs)
    if path.is_dir():
        raise UserError(f"--out {str(path)!r} is a folder; --out names the CSV file to write, "
                        f"e.g. {str(path / 'predictions.csv')!r}.")
    if path.exists():
        if not overwrite:
            raise RunExistsError(f"--out {str(path)!r} already exists. Choose another --out, or pass --overwrite "
                                 "to replace it.")
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            first = ""
        if not first.startswith(header):
            raise UserError(f"--overwrite refused: {str(path)!r} is not a predictions CSV written by toolkit (its "
                            f"first line is not '{header},...'). Choose another --out.")
    return path


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder: a second process training it is refused."""
    import fcntl

    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by another toolkit process (its {LOCK_FILE} is locked). Wait for "
                            "that process to finish, or stop it, then run again.") from None
        yield
    finally:
        os.close(fd)


def read_json(path: Path, what_to_do: str) -> Any:
    """A JSON file of a run; a missing or corrupt one is a user error naming the file and ``what_to_do``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing. {what_to_do}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                        f"{what_to_do}") from None


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends with the target's whole name: savers that check
    # extensions (Keras wants ".weights.h5", ".keras") accept it.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give run files normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise UserError(f"TOML cannot hold {value!r}; settings must be finite numbers")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: dict[str, Any]) -> str:
    """Serialise a config of scalars, lists and one level of tables to TOML (stdlib has only a reader)."""
    lines: list[str] = []
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    for key, value in config.items():
        if key not in tables and value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
