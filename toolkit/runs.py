"""Run folders: creation without clobbering, and atomic file writes.

Every file of a run is written to a temporary name in the same folder and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted
run never leaves a half-written ``model.keras`` or ``metrics.json`` behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class RunExistsError(FileExistsError):
    pass


def default_run_dir(backbone: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{backbone}"


def prepare_run_dir(path: str | Path, overwrite: bool) -> Path:
    """Create the run folder; an existing non-empty one is refused unless ``overwrite``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunExistsError(
                f"Run folder already exists and is not empty. Received: out={str(path)!r}. "
                "Choose another --out, resume it with --resume, or pass --overwrite to replace it."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"TOML cannot hold {value!r}")
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
