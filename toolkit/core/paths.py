"""Where an output may go: names that fit the filesystem, locations that can be written, outputs kept apart
from the inputs they are made from. Checked before any work starts (:mod:`toolkit.core.outputs` uses these)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

from toolkit.core.errors import UserError

NAME_MAX = 255  # bytes in one file name (ext4, XFS, APFS, NTFS)


def is_within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def is_plain_name(name: object) -> bool:
    """``name`` is one entry's name inside a folder: a non-empty string, not ``.``/``..``, no separator or NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in ("/", "\0", os.sep)))


def fit_name(name: str, reserve: int = 0) -> str:
    """``name`` shortened (its stem cut, a hash of the whole name added, its suffix kept) so that it and
    ``reserve`` more bytes fit in one file name."""
    room = NAME_MAX - reserve
    if len(name.encode("utf-8", "surrogateescape")) <= room:
        return name
    suffix = "".join(Path(name).suffixes[-2:])[-40:]
    tag = "-" + hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    stem = name[: len(name) - len(suffix)] if suffix else name
    keep = room - len((tag + suffix).encode("utf-8", "surrogateescape"))
    short = stem.encode("utf-8", "surrogateescape")[:max(keep, 1)].decode("utf-8", "ignore")
    return short + tag + suffix


def staging_name(target: Path) -> str:
    """The name of the sibling a replacement of ``target`` is written into: ``.NAME.partial``, shortened to fit."""
    return "." + fit_name(target.name, reserve=len(".") + len(".partial")) + ".partial"


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


def check_location(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output whose folder cannot be made or written: checked before any work is done."""
    path = Path(path)
    if len(path.name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise UserError(f"{flag} {str(path)[:60]!r}...: its last part is longer than {NAME_MAX} bytes, the most a "
                        "file name can hold. Choose a shorter name.")
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            raise UserError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a broken symbolic link. Choose another {flag}.")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder, so nothing can be written "
                        f"below it. Choose another {flag}.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: the folder {str(ancestor)!r} cannot be written (read-only or not "
                        f"yours). Choose another {flag}.")


# ----------------------------------------------------------------------------- markers
