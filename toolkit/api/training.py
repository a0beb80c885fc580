"""Training from Python and from ``toolkit finetune``: one code path.

:func:`finetune` takes a data folder and settings by name; :func:`train` takes a built
:class:`~toolkit.config.settings.FinetuneConfig` (what the CLI builds from its flags); both decide between one run
and an ensemble of fold members, and return the same :class:`~toolkit.api.run.Run`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolkit.api.run import Run
from toolkit.core.processes import refuse_in_a_starting_worker

logger = logging.getLogger(__name__)


def finetune(data: str | Path, out: str | Path | None = None, *, recipe: str | Path = "quick",
             overwrite: bool = False, ensemble: str | None = None, verbose: int = 0, **settings: Any) -> Run:
    """Train a classifier on ``data`` into the run folder ``out`` and return it.

    Args:
        data: a folder with one sub-folder per class, a folder with ``train/`` and ``val/`` splits, or a CSV
            manifest (``path,label[,split]``); a manifest with a ``labels`` column (class names joined by ``;``)
            trains a multi-label classifier (``Run.macro_ap`` is then its estimate).
        out: the run folder to create (default ``runs/<date>-<time>-<backbone>``). It must not exist, unless
            ``overwrite`` and it holds an earlier toolkit output.
        recipe: a shipped recipe name (``quick``, ``small-data``, ``accurate``) or the path of a TOML recipe.
        ensemble: comma-separated backbone names, or a number of seeds, for an ensemble of independent members.
        verbose: 0 quiet, 1 progress bars, 2 one line per epoch.
        **settings: any recipe key (``backbone="efficientnet_lite0"``, ``head_epochs=5``, ``freeze="auto"``);
            augmentation keys as ``augment={"pca_sigma": 0.1}``. They override the recipe, as flags do.

    Returns:
        The trained :class:`~toolkit.api.run.Run`.

    Raises:
        toolkit.core.errors.UserError: bad input (an unknown setting, a folder that cannot train); nothing is written.
    """
    from toolkit.config.recipes import build_config

    refuse_in_a_starting_worker("toolkit.finetune")
    overrides = {key: value for key, value in settings.items() if key != "augment"}
    augment = settings.get("augment") or {}
    if not isinstance(augment, dict):
        from toolkit.core.errors import UserError

        raise UserError(f"augment must be a dict of augmentation settings, e.g. augment={{'pca_sigma': 0.1}}. "
                        f"Received: augment={augment!r}")
    overrides |= {f"augment.{key}": value for key, value in augment.items()}
    overrides["data"] = str(Path(data).resolve())  # recorded absolute, so the run resumes from any directory
    return train(build_config(recipe, overrides), out, overwrite=overwrite, ensemble=ensemble, verbose=verbose)


def train(config, out: str | Path | None = None, *, overwrite: bool = False, ensemble: str | None = None,
          verbose: int = 0) -> Run:
    """Train ``config`` (a :class:`~toolkit.config.settings.FinetuneConfig`): one run, an ensemble of ``ensemble``
    members, or, for ``--cv K`` with a freeze plan that trains backbone stages, K fold members in one ensemble."""
    refuse_in_a_starting_worker("toolkit.train")
    from toolkit.core.quiet import import_tensorflow
    from toolkit.train import finetune as single
    from toolkit.train.ensemble import finetune_ensemble

    import_tensorflow()
    if ensemble:
        from toolkit.data.multilabel import is_multilabel

        if config.data and is_multilabel(config.data):
            from toolkit.core.errors import UserError

            raise UserError(f"--ensemble: not available for multi-label data ({config.data} has a `labels` column); "
                            f"a multi-label run already averages its fold heads. Drop --ensemble. Received: "
                            f"ensemble={ensemble!r}")
        return Run.from_result(finetune_ensemble(config, ensemble, out=out, overwrite=overwrite, verbose=verbose))
    prepared = single.prepare(config, out, overwrite, verbose)
    if prepared.fold_members:
        k = prepared.fold_members
        logger.info("--cv %d with a plan that trains backbone stages: %d members, each validating on its own fold, "
                    "into one ensemble folder (about %dx the time of one run)", k, k, k)
        return Run.from_result(finetune_ensemble(prepared.config, f"folds:{k}", out=prepared.target,
                                                 overwrite=overwrite, verbose=verbose))
    return Run.from_result(single.finetune(prepared, verbose))


def resume(run: str | Path, verbose: int = 0) -> Run:
    """Continue an interrupted run or ensemble folder from its last finished epoch (its settings are the ones in
    its ``recipe.toml``); a finished run whose swap into the folder it replaces was refused finishes the swap."""
    from toolkit.core import runs
    from toolkit.core.quiet import import_tensorflow
    from toolkit.train import finetune as single
    from toolkit.train.ensemble import finetune_ensemble

    refuse_in_a_starting_worker("toolkit.resume")
    import_tensorflow()
    folder = Path(run).resolve()  # a sibling it replaces is found beside its real location
    if (folder / runs.ENSEMBLE_FILE).is_file():
        return Run.from_result(finetune_ensemble(None, "", resume=folder, verbose=verbose))
    return Run.from_result(single.resume(folder, verbose=verbose))
