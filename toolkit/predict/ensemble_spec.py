"""``ensemble.json``: an ensemble folder's members, their weights and what it replaces, read as checked input.

An ensemble folder is input like any flag: its members must be sub-folders of the ensemble folder itself
(never ``../x`` or an absolute path, never a link leading out of it), its weights finite and positive, one
per member, and what it replaces the sibling it was created beside (:class:`toolkit.core.outputs.Replacement`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from toolkit.core import outputs, paths, runs
from toolkit.core.errors import UserError

MAX_MEMBERS = 1000


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
    members: list[str]  # sub-folder names, in order
    weights: list[float]  # one per member, > 0
    replaces: outputs.Replacement | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"members": list(self.members), "weights": list(self.weights)}
        if self.replaces is not None:
            out["replaces"] = self.replaces.to_json()
        return out


def read_ensemble(folder: Path) -> EnsembleSpec:
    """``folder/ensemble.json``, every value checked before it is used."""
    path = folder / runs.ENSEMBLE_FILE
    values = runs.read_json(path, "It lists the ensemble's members: restore it, or train the ensemble again.")
    fix = "restore it, or train the ensemble again"
    if not isinstance(values, dict) or not isinstance(values.get("members"), list) or not values["members"]:
        raise UserError(f"{path} must be an object whose 'members' lists the member folders; {fix}. "
                        f"Received: {values!r:.100}")
    members = values["members"]
    if len(members) > MAX_MEMBERS:
        raise UserError(f"{path} lists {len(members)} members (at most {MAX_MEMBERS}); {fix}.")
    real = folder.resolve()
    for name in members:
        if (not paths.is_plain_name(name) or "\\" in name or not (folder / name).is_dir()
                or (folder / name).resolve().parent != real):
            raise UserError(f"{path}: member {name!r:.80} is not a sub-folder of {folder}; members must lie inside the "
                            f"ensemble folder. {fix[0].upper() + fix[1:]}.")
    if len(set(members)) != len(members):
        raise UserError(f"{path} lists a member twice; {fix}. Received: members={members!r:.100}")
    weights = values.get("weights")
    if weights is None:
        weights = [1.0] * len(members)
    if (not isinstance(weights, list) or len(weights) != len(members)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                       for w in weights)):
        raise UserError(f"{path}: 'weights' must be one finite number > 0 per member ({len(members)}); {fix}. "
                        f"Received: weights={weights!r:.100}")
    replaces = values.get("replaces")
    if replaces is not None:
        replaces = outputs.Replacement.from_json(replaces, folder, path)
    return EnsembleSpec(list(members), [float(w) for w in weights], replaces)


def check_weights(weights, count: int) -> list[float]:
    """``--weights``: one finite number > 0 per ``--model``."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UserError(f"--weights needs one weight per --model. Received: {len(weights)} weights for {count} models; "
                        "give one number per --model, or leave --weights out for equal weights.")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise UserError(f"--weights must be finite numbers > 0 (relative weights of the models). Received: "
                        f"{bad[0]!r}; e.g. --weights 2 1.")
    return [float(w) for w in weights]
