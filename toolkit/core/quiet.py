"""TensorFlow imported with its C++ start-up chatter hidden, for the command line and the Python API alike."""

from __future__ import annotations

import os
import sys


def import_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow with its C++ chatter (oneDNN, cudart_stub, cpu_feature_guard, cuInit) hidden.

    Some of those lines are written to file descriptor 2 before any log level applies, and they bury the messages
    users need to read. ``verbose`` (the CLI's ``-v``) or ``TOOLKIT_TF_CHATTER=1`` shows them all. Python errors still
    surface: an exception raised by the import propagates after stderr is restored.
    """
    if verbose or os.environ.get("TOOLKIT_TF_CHATTER") or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): import as is
        import tensorflow  # noqa: F401
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401,F811
    finally:
        os.dup2(saved, 2)
        os.close(saved)
