"""The grammar of the settings that are more than a number or a name: ``cv``, ``fold`` and ``freeze``.

Parsed here, below everything that uses them, so a recipe or a flag is refused before any work starts;
what the parsed values mean for a run is decided in :mod:`toolkit.train.folds` and :mod:`toolkit.train.freeze`.
"""

from __future__ import annotations

from typing import Sequence

from toolkit.core.errors import UserError

CV_MODES = ("auto", "off")


def parse_cv(value: str) -> int | str:
    """``auto``, ``off``, or the number of folds (an integer >= 2)."""
    text = str(value).strip().lower()
    if text in CV_MODES:
        return text
    try:
        folds = int(text)
    except ValueError:
        folds = None
    if folds is None or folds < 2:
        raise UserError(f"cv must be auto, off or a number of folds >= 2 (at most the image count of the smallest "
                        f"class). Received: cv={value!r}")
    return folds


def parse_fold(value: str) -> tuple[int, int] | None:
    """``k/K`` as (k - 1, K), 0-based; '' as None."""
    if not value:
        return None
    try:
        k, folds = (int(part) for part in str(value).split("/"))
    except ValueError:
        k, folds = 0, 0
    if not (folds >= 2 and 1 <= k <= folds):
        raise UserError(f"fold must be k/K with K >= 2 and 1 <= k <= K (validate on fold k of K). Received: fold={value!r}")
    return k - 1, folds


FREEZE_MODES = ("auto", "all", "none")


def parse_freeze(freeze: str | float, stages: Sequence[str]) -> tuple[str, float | str]:
    """``freeze`` as (kind, value): ("auto" | "all" | "none", mode), ("stage", name) or ("fraction", f in [0, 1]).
    ``stages``: the backbone's stage names, bottom to top."""
    value = str(freeze).strip()
    if value in FREEZE_MODES:
        return value, value
    if value in stages:
        return "stage", value
    try:
        fraction = float(value)
    except ValueError:
        raise UserError(
            f"Unknown freeze mode. Received: freeze={freeze!r}. Allowed: auto, all, none, a fraction of stages "
            f"to unfreeze in [0, 1], or a stage name ({', '.join(stages)})."
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"A freeze fraction must be in [0, 1]. Received: freeze={freeze!r}")
    return "fraction", fraction
