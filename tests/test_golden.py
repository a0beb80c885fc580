"""Golden tests: the offline ImageNet backbones classify scikit-image's photos,
and their logits match those computed once from the same checkpoints by real
PyTorch (tests/golden/make_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.golden.images import EXPECTED_CLASSES, GOLDEN_IMAGES, golden_batch
from toolkit import backbones

REFERENCE = json.loads((Path(__file__).parent / "golden" / "reference_logits.json").read_text())
TOLERANCE = 1e-4


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_backbone_matches_torch_and_classifies_golden_photos(name):
    spec = backbones.get_spec(name)
    model = backbones.create(name, include_top=True)
    assert model.output_shape == (None, 1000)
    logits = model.predict(golden_batch(spec.input_size), verbose=0)
    for image, row in zip(GOLDEN_IMAGES, logits):
        top1 = int(np.argmax(row))
        assert top1 in EXPECTED_CLASSES[image], f"{name}: {image} → {top1}"
        ref = REFERENCE[name][image]
        assert top1 == ref["top5"][0]
        for index, value in ref["logits"].items():
            assert abs(float(row[int(index)]) - value) < TOLERANCE, (name, image, index, float(row[int(index)]), value)


def test_backbone_without_top_is_fully_convolutional_and_matches_with_top():
    with_top = backbones.create("mobilenet_v2", include_top=True)
    features = backbones.create("mobilenet_v2")
    assert features.input_shape == (None, None, None, 3)
    x = golden_batch(224)[:1]
    pooled = features.predict(x, verbose=0).mean(axis=(1, 2))
    dense = with_top.get_layer("predictions")
    w, b = dense.get_weights()
    np.testing.assert_allclose(pooled @ w + b, with_top.predict(x, verbose=0), atol=1e-4)
    # A different input size runs too (no Flatten / fixed-size layer anywhere).
    assert features.predict(golden_batch(160)[:1], verbose=0).shape == (1, 5, 5, 1280)
