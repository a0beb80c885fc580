"""The public Python API, the same code the ``toolkit`` command runs.

- :func:`finetune` trains a run from a data folder and returns a :class:`Run`; :func:`resume` continues one.
- :func:`load` opens a run folder; :meth:`Run.predict`, :meth:`Run.embed`, :meth:`Run.evaluate`, :meth:`Run.explain` and
  :meth:`Run.export` are the commands of the same names.
- :func:`embed` gives images' pooled backbone features, of a run or of a backbone alone; :meth:`Run.embed` a run's.
- :func:`audit` audits a dataset's labels.

Nothing here imports TensorFlow until a function needs it.
"""

from toolkit.api.audit import audit
from toolkit.api.run import Predictions, Run, embed, evaluate, load, predict
from toolkit.api.training import finetune, resume, train

__all__ = ["Predictions", "Run", "audit", "embed", "evaluate", "finetune", "load", "predict", "resume", "train"]
