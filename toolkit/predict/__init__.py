"""Trained models out: loading run and ensemble folders (:mod:`~toolkit.predict.members`), prediction with
test-time augmentation (:mod:`~toolkit.predict.inference`), calibration (:mod:`~toolkit.predict.calibration`), the
unknown-class score (:mod:`~toolkit.predict.unknown`), evaluation (:mod:`~toolkit.predict.evaluate`), class-activation
maps (:mod:`~toolkit.predict.explain`) and their figures (:mod:`~toolkit.predict.figures`)."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "members": ["Member", "load_member", "load_models"],
    "inference": ["collect_images", "predict_ensemble", "predictions_frame"],
    "calibration": ["apply_temperature", "calibrate"],
    "evaluate": ["classification_metrics", "evaluate"],
    "explain": ["class_activation_map", "explain"],
})
