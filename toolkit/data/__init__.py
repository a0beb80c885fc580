"""Images in: finding a dataset's images and labels (:mod:`~toolkit.data.discovery`), verifying each by decoding it
(:mod:`~toolkit.data.verify`), splitting (:mod:`~toolkit.data.datasets`), multi-label manifests and their folds
(:mod:`~toolkit.data.multilabel`), augmenting (:mod:`~toolkit.data.augment`,
:mod:`~toolkit.data.workers`) and the tf.data pipelines (:mod:`~toolkit.data.pipeline`); and what a dataset's
labels get wrong (:mod:`~toolkit.data.audit`, :mod:`~toolkit.data.near_duplicates`)."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "datasets": ["DatasetError", "DatasetSplits", "Split", "dataset_statistics", "load_splits"],
    "verify": ["ImageRecord", "verify_files"],
    "multilabel": ["MultiLabelData", "load_multilabel"],
    "augment": ["AugmentConfig", "pca_statistics"],
    "pipeline": ["make_dataset"],
    "audit": ["AuditInput", "find_issues", "write_audit"],
})
