"""toolkit: transfer learning for small-data image classification (Keras 3 / TensorFlow).

Installed as the distribution ``toolkit-finetune``; imported as ``toolkit``; run as the ``toolkit`` command.
Importing the package imports nothing heavy: TensorFlow loads only inside the functions that need it.
"""

from __future__ import annotations

DISTRIBUTION = "toolkit-finetune"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
