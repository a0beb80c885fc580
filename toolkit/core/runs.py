"""Run folders' file names, and how every file is written: atomically, and read back as checked input.

Every file of a run is written to a temporary name in the same folder and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted
run never leaves a half-written ``model.keras`` or ``metrics.json`` behind.
Which folders ``--overwrite`` may replace is :mod:`toolkit.core.outputs`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from toolkit.core.errors import UserError

# ----------------------------------------------------------------------------- file names

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
OOF_FILE = "out-of-fold.csv"  # a multi-label run: every labelled image's out-of-fold probabilities and labels
THRESHOLDS_FILE = "thresholds.json"  # a multi-label run: each label's decision threshold (its presence marks one)
UNKNOWN_FILE = "unknown.npz"  # what --unknown scores with (toolkit.predict.unknown)
TMP_TAIL_BYTES = 120  # of a target's name kept at the end of its temporary name
# The header every predictions CSV starts with: --overwrite replaces only such a file.
PREDICTIONS_HEADER = "path,label,probability"
MULTILABEL_PREDICTIONS_HEADER = "path,labels,prob_"  # a multi-label run's predictions


def backbone_label(backbone: str) -> str:
    """A backbone as part of a file name: its registry name, or the last part of a preset's or file's path."""
    name = Path(str(backbone).removeprefix("keras_hub:").rstrip("/")).name.removesuffix(".keras") or "backbone"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60]


def default_run_dir(backbone: str, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-<backbone label>``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{backbone_label(backbone)}"


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
    # The temporary name ends with the target's name (its end, for a long one): savers that check
    # extensions (Keras wants ".weights.h5", ".keras") accept it, and it fits in a file name.
    tail = target.name.encode("utf-8", "surrogateescape")[-TMP_TAIL_BYTES:].decode("utf-8", "ignore")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{tail}", dir=target.parent)
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
