"""The core every stage uses: user errors (:mod:`~toolkit.core.errors`), the run-folder file names and atomic
writes (:mod:`~toolkit.core.runs`), what ``--overwrite`` may replace (:mod:`~toolkit.core.outputs`), where outputs
may go (:mod:`~toolkit.core.paths`), accuracy intervals (:mod:`~toolkit.core.uncertainty`) and a quiet TensorFlow
import (:mod:`~toolkit.core.quiet`). Imports nothing of the toolkit's other packages."""

from toolkit.core.errors import UserError

__all__ = ["UserError"]
