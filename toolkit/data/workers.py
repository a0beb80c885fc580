"""Python-level augmentation (albumentations) in worker *processes* feeding tf.data.

Why processes: albumentations is Python + OpenCV. In ``tf.numpy_function``
the transforms run on tf.data's threads but hold the GIL for their Python
parts, so they serialise. Here each worker process decodes and augments a
whole batch and sends it back as one uint8 array; the main process only
stacks bytes into tensors.

Deterministic given a seed: batch *k* of epoch *e* is always augmented with
the seed derived from (seed, e, k), whichever worker handles it, and batches
arrive in order.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import weakref
from typing import Any

import numpy as np

from toolkit.core.processes import GUARD_HINT
from toolkit.data.datasets import Split

logger = logging.getLogger(__name__)

_TRANSFORM: Any = None  # set in each worker by _init_worker
_SIZE: int = 0


def _init_worker(transform_bytes: bytes, size: int) -> None:
    global _TRANSFORM, _SIZE
    import cv2

    cv2.setNumThreads(1)  # one process per core; no thread oversubscription
    _TRANSFORM = pickle.loads(transform_bytes)
    _SIZE = size


def _load_rgb(path: str) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:  # formats OpenCV cannot read: fall back to PIL
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _augment_batch(task: tuple[list[str], int]) -> np.ndarray:
    import cv2

    paths, seed = task
    if hasattr(_TRANSFORM, "set_random_seed"):
        _TRANSFORM.set_random_seed(seed)
    out = np.empty((len(paths), _SIZE, _SIZE, 3), np.uint8)
    for i, path in enumerate(paths):
        image = _TRANSFORM(image=_load_rgb(path))["image"]
        if image.shape[:2] != (_SIZE, _SIZE):
            image = cv2.resize(image, (_SIZE, _SIZE), interpolation=cv2.INTER_LINEAR)
        out[i] = image
    return out


def _batch_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ProcessAugmentedDataset:
    """An epoch-by-epoch ``tf.data.Dataset`` of batches augmented by an albumentations ``Compose``.

    Args:
        split: images and labels (decode paths are used, so verified/converted files work).
        transform: a picklable albumentations transform taking ``image=`` (RGB uint8).
        image_size: output size; images not already that size are resized.
        batch_size, seed: as for :func:`toolkit.data.pipeline.make_dataset`.
        workers: processes (default: CPU count).
    """

    def __init__(self, split: Split, transform: Any, image_size: int, batch_size: int, seed: int = 0,
                 workers: int | None = None, shuffle: bool = True):
        self.split = split
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.workers = workers or os.cpu_count() or 1
        self._transform_bytes = pickle.dumps(transform)
        self._epoch = 0
        # spawn, not fork: the parent holds TensorFlow's threads.
        ctx = multiprocessing.get_context("spawn")
        # An executor, not multiprocessing.Pool: a worker that dies (e.g. one re-running an unguarded main script)
        # breaks it with an error instead of being replaced for ever.
        self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                                            initargs=(self._transform_bytes, image_size))
        self._finalizer = weakref.finalize(self, self._pool.shutdown, False, cancel_futures=True)

    def close(self) -> None:
        self._finalizer()

    def _tasks(self, epoch: int) -> list[tuple[list[str], int]]:
        paths = np.asarray(self.split.decode_paths)
        order = np.arange(len(paths))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        self._order = order
        return [
            (paths[order[i : i + self.batch_size]].tolist(), _batch_seed(self.seed, epoch, k))
            for k, i in enumerate(range(0, len(order), self.batch_size))
        ]

    def _generate(self):
        epoch = self._epoch
        self._epoch += 1
        tasks = self._tasks(epoch)
        labels = np.asarray(self.split.labels, np.int32)[self._order]
        start = 0
        try:
            for batch in self._pool.map(_augment_batch, tasks):  # in order
                yield batch, labels[start : start + len(batch)]
                start += len(batch)
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise RuntimeError(f"the augmentation worker processes stopped; in a script that calls the toolkit, "
                               f"{GUARD_HINT}") from exc

    def dataset(self):
        """A ``tf.data.Dataset`` of (float32 images, int32 labels); each iteration is a new epoch."""
        import tensorflow as tf

        from toolkit.data.pipeline import finish

        spec = (
            tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.uint8),
            tf.TensorSpec((None,), tf.int32),
        )
        ds = tf.data.Dataset.from_generator(self._generate, output_signature=spec)
        return finish(ds.map(lambda x, y: (tf.cast(x, tf.float32), y)))
