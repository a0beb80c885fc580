"""toolkit: transfer learning for small-data image classification (Keras 3 / TensorFlow).

    import toolkit

    run = toolkit.finetune("data/sample", "runs/sample")   # -> toolkit.Run
    run.predict("new_photos/")                               # -> pandas.DataFrame
    run = toolkit.load("runs/sample")

Installed as the distribution ``toolkit-finetune``; imported as ``toolkit``; run as the ``toolkit`` command.
Importing the package imports nothing heavy: TensorFlow loads, with its C++ log quiet, inside the functions
that need it. The packages are the stages: ``data``, ``backbones``, ``train``, ``predict``, ``deploy``, ``api``
and ``cli`` over ``config`` and ``core``; imports run one way (see ``pyproject.toml``).
"""

from __future__ import annotations

DISTRIBUTION = "toolkit-finetune"
API = ("finetune", "resume", "load", "audit", "embed", "Run")
__all__ = ["__version__", *API]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    """The API's names, imported on first use (``import toolkit`` stays instant)."""
    if name in API:
        from toolkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
