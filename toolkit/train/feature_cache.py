"""The stage-1 feature cache: while the backbone is frozen its outputs do not change, so they are computed
once per image and view (view 0 the plain centre crop, the others augmented) and the head trains on them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from toolkit.config.settings import FinetuneConfig
from toolkit.core import runs
from toolkit.data.datasets import Split
from toolkit.train.fit_data import FitData
from toolkit.train.run_state import Run

logger = logging.getLogger(__name__)

# A feature-map cache larger than this (float16) is not built; the head then trains on images.
MAX_CACHE_BYTES = 2 << 30
CV_CACHE_FILE = "cv-features.npz"


def cache_views(n_train: int, max_views: int, budget: int) -> int:
    """Views per image in the feature cache: up to ``max_views``, fewer when the data alone fills ``budget``."""
    return max(1, min(max_views, math.ceil(budget / max(n_train, 1))))


def inference(model):
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def forward_all(forward, dataset, dtype=np.float32, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of ``forward`` (see :func:`_inference`) and the labels, over batched (images, labels).

    A plain loop, not ``model.predict``: under a multi-worker strategy ``predict`` would be a
    collective over all workers, while each worker here computes what it needs itself.
    """
    xs, ys = [], []
    for images, labels in dataset:
        xs.append(np.asarray(forward(images), dtype=dtype))
        ys.append(labels.numpy())
        if bar:
            bar.add(1)
    return np.concatenate(xs), np.concatenate(ys)


def cache_decision(config: FinetuneConfig, head, backbone, n_train: int, size: int) -> tuple[bool, str]:
    if config.cache_features == "off":
        return False, "training on images (feature cache switched off in the recipe)"
    shape = backbone.compute_output_shape((1, size, size, 3))[1:]
    per_view = int(np.prod(shape)) * 2 if not head.is_linear else int(shape[-1]) * 4
    views = cache_views(n_train, config.cache_views, config.cache_view_budget)
    total = per_view * n_train * views
    if total > MAX_CACHE_BYTES:
        return False, (f"training on images: a feature cache would need {total / 2**30:.1f} GiB "
                       f"(> {MAX_CACHE_BYTES / 2**30:.0f} GiB; use fewer cache_views or no bottleneck)")
    kind = "pooled features (the head is linear)" if head.is_linear else "feature maps (float16)"
    return True, f"cached {kind} of {views} views per image ({total / 2**20:.0f} MiB)"


def feature_cache(run: Run, backbone, head, data: FitData):
    """Backbone outputs for every image and view, computed once and kept in the run folder.

    Under a multi-worker strategy each worker computes and trains on the features of its
    own shard of the images (stored as ``features-<i>of<n>.npz``).
    """
    import keras

    from toolkit.train.distribute import shard

    config, scale, splits = run.config, run.scale, data.splits
    extractor = feature_extractor(backbone, head)
    name = "features.npz" if scale.workers == 1 else f"features-{scale.worker_index}of{scale.workers}.npz"
    cache_path = run.dir / runs.CACHE_DIR / name
    views_per_image = cache_views(len(splits.train), config.cache_views, config.cache_view_budget)
    cached = read_feature_cache(cache_path)
    if cached is not None:
        train_x, train_y, val_x, val_y = cached
        logger.info("stage 1: feature cache loaded from %s", cache_path)
    else:
        train, val = splits.train, splits.val
        if scale.workers > 1:
            train = train.take(shard(len(train), scale.worker_index, scale.workers))
            val = val.take(shard(len(val), scale.worker_index, scale.workers))
        n_batches = math.ceil(len(train) / config.batch_size) * views_per_image + math.ceil(len(val) / config.batch_size)
        bar = keras.utils.Progbar(n_batches, unit_name="batch") if run.verbose and scale.is_chief else None
        dtype = np.float32 if head.is_linear else np.float16
        forward = inference(extractor)
        views = view_features(forward, data, train, views_per_image, dtype, bar)
        train_x = np.concatenate([v[0] for v in views])
        train_y = np.concatenate([v[1] for v in views])
        val_x, val_y = view_features(forward, data, val, 1, dtype, bar)[0]
        save_arrays(cache_path, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)

    head_model = head.on_features(train_x.shape[1:])
    train = data.arrays(train_x, train_y, True, len(splits.train) * views_per_image)
    return head_model, train, data.arrays(val_x, val_y, False, len(splits.val))


def feature_extractor(backbone, head):
    """What the cache holds: the backbone's feature maps, or their average for a linear head."""
    import keras

    if not head.is_linear:
        return backbone
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="cache_pool")(backbone.output)
    return keras.Model(backbone.input, pooled)


def all_views_cache(run: Run, backbone, head, data: FitData, split: Split) -> np.ndarray:
    """(views, images, ...) backbone outputs of every image of ``split`` (view 0 the centre crop, the others
    augmented), computed once and kept in the run folder: what the fold heads of ``--cv`` train on."""
    import keras

    config = run.config
    path = run.dir / runs.CACHE_DIR / CV_CACHE_FILE
    cached = read_feature_cache(path, ("views",))
    if cached is not None and cached[0].shape[1] == len(split):
        logger.info("cross-validation: feature cache loaded from %s", path)
        return cached[0]
    n_views = cache_views(len(split), config.cache_views, config.cache_view_budget)
    bar = keras.utils.Progbar(math.ceil(len(split) / config.batch_size) * n_views, unit_name="batch") if run.verbose else None
    forward = inference(feature_extractor(backbone, head))
    dtype = np.float32 if head.is_linear else np.float16
    views = view_features(forward, data, split, n_views, dtype, bar, shuffle=False)  # in the split's order
    if not all(np.array_equal(y, np.asarray(split.labels)) for _, y in views):
        raise RuntimeError("cross-validation features came out of the image order")
    stacked = np.stack([x for x, _ in views])
    save_arrays(path, views=stacked)
    return stacked


def view_features(forward, data: FitData, split: Split, n_views: int, dtype, bar, shuffle: bool = True) -> list:
    """[(outputs, labels)] of every image of ``split`` per view: view 0 the plain centre crop, view v > 0
    augmented (seed offset 100 + v; shuffled unless ``shuffle`` is off)."""
    return [forward_all(forward, data.image_data(split, v > 0, 100 + v, shuffle=shuffle), dtype, bar)
            for v in range(n_views)]


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    with runs.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_feature_cache(path: Path, keys=("train_x", "train_y", "val_x", "val_y")) -> tuple[np.ndarray, ...] | None:
    """The arrays ``keys`` of a cache file; None when absent, or unreadable (with a warning)."""
    import zipfile

    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            return tuple(cached[key] for key in keys)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("stage 1: the feature cache %s is unreadable (%s: %s); computing it again", path,
                       type(exc).__name__, exc)
        return None
