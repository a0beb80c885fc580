"""Embeddings: each image's backbone features, pooled over space, for similarity search, clustering and
de-duplication.

From a trained run (its fine-tuned backbone: the features its head classifies, what the run's feature cache and
``--unknown`` use) or from a backbone alone (a registry name, a keras-hub preset or a ``.keras`` file, with its own
weights). The views are ``predict``'s (:data:`toolkit.predict.inference.TTA_MODES`); with several, the features
are averaged over them. With ``none`` an image's features are exactly the run's cached centre-crop features.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.core.errors import UserError

FORMATS = (".parquet", ".npz", ".csv")
PARQUET_EXTRA = 'pip install "toolkit-finetune[parquet]"'
HEADER = "path,error,feature_0"


@dataclasses.dataclass
class Embedder:
    """A network giving pooled features of raw RGB images, and the views it is given."""

    model: object  # keras.Model: raw RGB in, (batch, channels) out
    image_size: int
    crop_fraction: float
    source: str  # the run folder or the backbone, for messages
    _forwards: dict = dataclasses.field(default_factory=dict, repr=False)

    def forward(self, whole_images: bool = False):
        """The model's inference call, compiled once per view kind (:func:`toolkit.predict.members.compiled_forward`)."""
        from toolkit.predict.members import compiled_forward

        if whole_images not in self._forwards:
            self._forwards[whole_images] = compiled_forward(self.model, self.image_size, whole_images, self.source)
        return self._forwards[whole_images]


def from_run(run: str | Path) -> Embedder:
    """The embedder of a trained run: its backbone's pooled output (:func:`toolkit.backbones.head.pooled_model`)."""
    import keras

    from toolkit.backbones.head import pooled_model
    from toolkit.core import runs
    from toolkit.predict.members import load_member

    if (Path(run) / runs.ENSEMBLE_FILE).is_file():
        raise UserError(f"--model {str(run)!r} is an ensemble folder: its members' features are different spaces. "
                        "Pass one of its member runs")
    member = load_member(run)
    pooled = pooled_model(member.model)
    return Embedder(keras.Model(pooled.input, pooled.outputs[1]), member.image_size, member.crop_fraction, str(run))


def from_backbone(name: str, preprocess: str = "auto", image_size: int = 0) -> Embedder:
    """The embedder of a backbone alone, with its own pretrained weights, at its input size (or ``image_size``)."""
    import keras

    from toolkit import backbones
    from toolkit.config.settings import FinetuneConfig

    config = FinetuneConfig(backbone=name, backbone_preprocess=preprocess, image_size=image_size)  # validated
    from toolkit.backbones import external

    if external.is_external(name):
        name = external.canonical(name)
        size = external.check(name, preprocess, image_size)
    else:
        size = image_size or backbones.get_spec(name).input_size
        available, where = backbones.weights_available(name)
        if not available:
            raise UserError(f"--backbone {name!r}: no pretrained weights here ({where}); embeddings of random "
                            "weights mean nothing. Pick one whose weights are installed (toolkit backbones)")
    network = backbones.create(name, input_shape=(None, None, 3), preprocess=preprocess)
    features = keras.layers.GlobalAveragePooling2D(name="embedding")(network.output)
    return Embedder(keras.Model(network.input, features), size, config.crop_fraction, name)


def embed(embedder: Embedder, decode_paths: Sequence[str], is_jpeg: Sequence[bool], mode: str = "none",
          batch_size: int = 32, progress=None) -> np.ndarray:
    """(N, channels) features of each image, averaged over ``mode``'s views."""
    from toolkit.predict.inference import view_batches

    if not decode_paths:
        return np.zeros((0, int(embedder.model.output_shape[-1])), np.float32)
    forward = embedder.forward(whole_images=mode == "full")
    return np.concatenate([result[0].mean(axis=1) for result in view_batches(
        forward, decode_paths, is_jpeg, embedder.image_size, mode, embedder.crop_fraction, batch_size, progress)
    ]).astype(np.float32)


def embeddings_frame(paths: Sequence[str], features: np.ndarray, errors: dict[str, str]):
    """One row per input path: ``path``, ``error`` (why an unreadable file has no features) and ``feature_0`` ...
    (NaN for the unreadable)."""
    import pandas as pd

    from toolkit.data.discovery import printable

    table = np.full((len(paths), features.shape[1] if features.ndim == 2 else 0), np.nan, np.float32)
    readable = [i for i, p in enumerate(paths) if p not in errors]
    table[readable] = features
    frame = pd.DataFrame(table, columns=[f"feature_{i}" for i in range(table.shape[1])])
    frame.insert(0, "error", [errors.get(p, "") for p in paths])
    frame.insert(0, "path", [printable(p) for p in paths])
    return frame


def check_format(out: str | Path) -> str:
    """The output's format from its suffix, refused before any image is read."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--out {str(out)!r}: embeddings are written as {', '.join(FORMATS)} (by the file's suffix)")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError(f"--out {str(out)!r}: Parquet needs pyarrow: {PARQUET_EXTRA}, or write .npz or .csv") from None
    return suffix


def written_by_toolkit(path: Path) -> bool:
    """Whether ``path`` is an embeddings file this module wrote (its columns), so ``--overwrite`` may replace it."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8") as handle:
                return handle.readline(len(HEADER) + 1).startswith(HEADER)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return set(archive.files) == {"path", "error", "features"}
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).names[:3] == HEADER.split(",")
    except Exception:  # noqa: BLE001  (unreadable, or not that format: not ours)
        return False
    return False


def write(frame, out: str | Path) -> None:
    """``frame`` into ``out`` atomically: Parquet, CSV, or .npz (``path``, ``error``: strings; ``features``:
    (rows, channels) float32)."""
    from toolkit.core import runs

    suffix = check_format(out)
    features = frame.filter(like="feature_").to_numpy(np.float32)
    with runs.atomic_path(Path(out)) as tmp:
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            with open(tmp, "wb") as handle:
                np.savez(handle, path=frame["path"].to_numpy(str), error=frame["error"].to_numpy(str),
                         features=features)
