"""Models out of the toolkit: SavedModel, TFLite (float, float16, int8) and ONNX exports that take raw RGB and give
``toolkit predict``'s probabilities (:mod:`~toolkit.deploy.export`), and what quantization costs in accuracy
(:mod:`~toolkit.deploy.quantize`)."""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "export": ["FORMATS", "export"],
})
