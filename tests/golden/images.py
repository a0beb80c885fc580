"""The golden photos (scikit-image's bundled chelsea, coffee, rocket) and the
one fixed way they are turned into model input, shared by the tests and by
``make_reference.py`` so both see identical pixels.

The transform is the standard ImageNet evaluation one: a centre square crop
of fraction size / (size + 32) of the shorter side (0.875 at 224 px), resized
bilinearly to size x size.

The rocket photo (a Falcon 9 on its pad) has no exact ImageNet class; the
checkpoints themselves (checked in torch) split between 812 space shuttle
(MobileNetV2, Lite1) and 657 missile (Lite0, Lite2), so both are accepted.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

GOLDEN_IMAGES = ("chelsea", "coffee", "rocket")
# ImageNet class expected for each photo (alternatives accepted for the cat).
EXPECTED_CLASSES = {"chelsea": (285, 281, 282), "coffee": (967,), "rocket": (812, 657)}


def golden_image(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def golden_batch(size: int) -> np.ndarray:
    """(3, size, size, 3) float32 raw RGB in [0, 255]."""
    frames = []
    for name in GOLDEN_IMAGES:
        image = Image.fromarray(golden_image(name))
        width, height = image.size
        side = size / (size + 32) * min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        frames.append(np.asarray(image.resize((size, size), Image.BILINEAR, box=box), dtype=np.float32))
    return np.stack(frames)
