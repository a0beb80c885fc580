"""Training: the freeze plan from the data (:mod:`~toolkit.train.freeze`), the two stages
(:mod:`~toolkit.train.stages`), the feature cache (:mod:`~toolkit.train.feature_cache`), cross-validation folds and
fold heads (:mod:`~toolkit.train.folds`, :mod:`~toolkit.train.fold_heads`, :mod:`~toolkit.train.cross_validate`),
ensembles (:mod:`~toolkit.train.ensemble`), resumable run state (:mod:`~toolkit.train.run_state`), tf.distribute
(:mod:`~toolkit.train.distribute`) and the run's report (:mod:`~toolkit.train.report`), wired together in
:mod:`~toolkit.train.finetune`."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submodules=["finetune"], submod_attrs={
    "freeze": ["FreezePlan", "plan_freeze"],
    "run_state": ["AccuracyGateError", "FinetuneResult"],
    "ensemble": ["finetune_ensemble"],
})
