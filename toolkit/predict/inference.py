"""Predictions from trained runs: test-time augmentation and ensembles.

A *member* is one run folder, loaded and checked by :mod:`toolkit.predict.members`; an
*ensemble folder* (``ensemble.json``) is accepted wherever a run is.

TTA modes (:data:`TTA_MODES`), all at the model's crop fraction:

* ``none``: the evaluation centre crop (exactly the training run's evaluation view);
* ``flip``: centre crop and its mirror;
* ``5crop``: four corner crops and the centre crop;
* ``10crop``: those five and their mirrors;
* ``full``: the whole image, shorter side resized to size / crop_fraction, aspect kept, through
  the fully convolutional network (the NIN head accepts any size).

Each image is decoded once and every view is cut from that decode; the views
of a batch of images go through the network as one batch, so 10-crop costs
about 10x the centre crop and no more. Probabilities are averaged over views,
temperature-scaled per member, then averaged (optionally weighted) over
members.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from toolkit.core.errors import UserError
from toolkit.predict.members import Member

logger = logging.getLogger(__name__)

TTA_MODES = ("none", "flip", "5crop", "10crop", "full")
# A multi-label run's views keep every part of the image, since any corner may hold a labelled object: the whole
# image resized to size x size (aspect not kept), and its mirror. ``none`` and ``flip`` become these for such a run
# (:func:`member_views`); ``full`` is the whole image at its aspect; the corner crops are refused.
WHOLE_VIEWS = {"none": "whole", "flip": "whole-flip", "full": "full"}
# The whole-image view (``--tta full``, ``explain``) has its shorter side at size / crop_fraction; an image
# of extreme aspect ratio (20000x100) would become a 51200x256 input and tens of GB of activations, so the
# view is scaled down further to hold at most this many pixels (4 of the 256x256 standard views: a 4:1
# panorama still fits whole).
WHOLE_IMAGE_MAX_PIXELS = 4 * 256 * 256


# ----------------------------------------------------------------------------- TTA views (TF)


def _windows(shape_hw, mode: str, crop_fraction: float):
    """[(top, left, side, side)], and which views are mirrored, for the crop modes."""
    import tensorflow as tf

    from toolkit.data.augment import centre_window

    centre = centre_window(shape_hw, crop_fraction)
    if mode in ("none", "flip"):
        windows = [centre]
    else:
        h, w = tf.cast(shape_hw[0], tf.int32), tf.cast(shape_hw[1], tf.int32)
        side = centre[2]
        corners = [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
        windows = [tf.stack([t, l, side, side]) for t, l in corners] + [centre]
    mirrored = [False] * len(windows)
    if mode in ("flip", "10crop"):
        windows, mirrored = windows + windows, mirrored + [True] * len(windows)
    return windows, mirrored


def tta_views(data, is_jpeg, size: int, mode: str, crop_fraction: float):
    """All views of one encoded image: (V, size, size, 3) float32; (1, H, W, 3) for ``full``."""
    import tensorflow as tf

    from toolkit.data.pipeline import eval_image, resize

    if mode == "none":
        return eval_image(data, is_jpeg, size, crop_fraction)[tf.newaxis]
    image = tf.io.decode_image(data, channels=3, expand_animations=False)  # decoded once, all views cut from it
    image.set_shape([None, None, 3])
    if mode in ("whole", "whole-flip"):
        squashed = resize(tf.cast(image, tf.float32), size)
        return tf.stack([squashed, tf.reverse(squashed, axis=[1])] if mode == "whole-flip" else [squashed])
    if mode == "full":
        return tf.image.resize(image, whole_image_size(tf.shape(image)[:2], size, crop_fraction), method="bilinear")[tf.newaxis]
    windows, mirrored = _windows(tf.shape(image), mode, crop_fraction)
    views = []
    for win, mirror in zip(windows, mirrored):
        crop = resize(tf.slice(image, tf.stack([win[0], win[1], 0]), tf.stack([win[2], win[3], 3])), size)
        views.append(tf.reverse(crop, axis=[1]) if mirror else crop)
    return tf.stack(views)


def whole_image_size(hw, size: int, crop_fraction: float):
    """(height, width) of the whole-image view: shorter side size / crop_fraction, aspect kept, and at most
    :data:`WHOLE_IMAGE_MAX_PIXELS` pixels (a tensor; pass ``tf.shape(image)[:2]`` or a (h, w) pair)."""
    import tensorflow as tf

    hw = tf.cast(hw, tf.float32)
    scale = tf.minimum((size / crop_fraction) / tf.reduce_min(hw), tf.sqrt(WHOLE_IMAGE_MAX_PIXELS / (hw[0] * hw[1])))
    return tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)


@functools.lru_cache(maxsize=None)
def _views_function(size: int, mode: str, crop_fraction: float):
    """``tta_views`` of a file (path, is_jpeg), traced once per geometry.

    Why: ``Dataset.map`` re-traces a plain Python function on every call (45 ms
    measured), which showed in the throughput of ``predict`` on a few hundred images.
    """
    import tensorflow as tf

    return tf.function(lambda path, is_jpeg: tta_views(tf.io.read_file(path), is_jpeg, size, mode, crop_fraction),
                       input_signature=[tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.bool)])


def view_count(mode: str) -> int:
    return {"none": 1, "flip": 2, "5crop": 5, "10crop": 10, "full": 1, "whole": 1, "whole-flip": 2}[mode]


def member_views(member: Member, mode: str) -> str:
    """The views ``--tta mode`` means for ``member``: its own for a single-label run; for a multi-label run views
    that keep the whole image (:data:`WHOLE_VIEWS`), the corner crops refused in one line."""
    if mode not in TTA_MODES:
        raise UserError(f"Unknown --tta. Received: tta={mode!r}; allowed: {', '.join(TTA_MODES)}")
    if not member.multi_label:
        return mode
    if mode not in WHOLE_VIEWS:
        raise UserError(f"--tta {mode}: {member.path} is a multi-label run, and a crop can cut a labelled object off; "
                        f"use --tta none (the whole image), flip (and its mirror) or full (the whole image at its "
                        f"aspect ratio)")
    return WHOLE_VIEWS[mode]


def centre_view(mode: str) -> int:
    """Which of a crop mode's views (:func:`_windows`' order: corners, then the centre; mirrors after) is the
    plain centre crop, the view ``--unknown`` scores."""
    return {"none": 0, "flip": 0, "5crop": 4, "10crop": 4, "whole": 0, "whole-flip": 0}[mode]


def predict_member(member: Member, decode_paths: Sequence[str], is_jpeg: Sequence[bool], mode: str = "none",
                   batch_size: int = 32, progress=None) -> np.ndarray:
    """(N, C) view-averaged, temperature-scaled probabilities of one member."""
    return _predict(member, decode_paths, is_jpeg, mode, batch_size, progress, features=False)[0]


def predict_with_features(member: Member, decode_paths: Sequence[str], is_jpeg: Sequence[bool], mode: str = "none",
                          batch_size: int = 32, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`predict_member`'s probabilities, (N, channels) pooled backbone features of each image's centre crop):
    one backbone pass, the centre crop being one of the views (the crop modes cut it from the whole decoded image:
    within about 1 % of the crop-only decode the score was fitted on); ``--tta full`` has none: a second pass."""
    probs, features = _predict(member, decode_paths, is_jpeg, mode, batch_size, progress, features=mode != "full")
    if features is None:
        features = _predict(member, decode_paths, is_jpeg, "none", batch_size, None, features=True)[1]
    return probs, features


def _predict(member: Member, decode_paths, is_jpeg, mode: str, batch_size: int, progress, features: bool):
    """(probabilities, centre-crop features or None) of one member."""
    if not decode_paths:
        return np.zeros((0, len(member.class_names)), np.float32), (np.zeros((0, 1), np.float32) if features else None)
    mode = member_views(member, mode)
    forward = member.forward(whole_images=mode == "full", features=features)
    out, pooled = [], []
    for result in view_batches(forward, decode_paths, is_jpeg, member.image_size, mode, member.crop_fraction,
                               batch_size, progress):
        out.append(result[0].mean(axis=1))
        if features:
            pooled.append(result[1][:, centre_view(mode)])
    probs = np.concatenate(out)
    scaled = member.calibrated(probs)
    return scaled, (np.concatenate(pooled).astype(np.float32) if features else None)


def view_batches(forward, decode_paths, is_jpeg, size: int, mode: str, crop_fraction: float, batch_size: int,
                 progress=None):
    """``forward``'s outputs over every view of every image, a batch of images at a time: a list of arrays of
    (images, views, ...) per batch (one per output of ``forward``).

    One pipeline for all images: while a batch goes through the network, the next ones are decoded (each image
    once, all its views cut from that decode), so decoding hides behind it. ``full``: one image at a time (the
    sizes differ)."""
    import tensorflow as tf

    from toolkit.data.pipeline import finish, parallel_calls

    if mode not in TTA_MODES and mode not in WHOLE_VIEWS.values():
        raise ValueError(f"Unknown TTA mode. Received: tta={mode!r}; allowed: {', '.join(TTA_MODES)}")
    files = tf.data.Dataset.from_tensor_slices((list(decode_paths), np.asarray(is_jpeg, bool)))
    decoded = files.map(_views_function(size, mode, crop_fraction), num_parallel_calls=parallel_calls(),
                        deterministic=True)
    per_image = 1 if mode == "full" else view_count(mode)
    images_per_pass = 1 if mode == "full" else max(1, batch_size // per_image)
    for views in finish(decoded.batch(images_per_pass) if mode != "full" else decoded.map(lambda v: v[tf.newaxis])):
        count = int(views.shape[0])
        result = forward(tf.reshape(views, (-1, *views.shape[2:])))
        result = result if isinstance(result, (tuple, list)) else (result,)
        yield [np.asarray(r).reshape(count, per_image, *np.asarray(r).shape[1:]) for r in result]
        if progress:
            progress(count)


def predict_ensemble(members: Sequence[Member], decode_paths, is_jpeg, mode: str = "none", batch_size: int = 32,
                     progress=None) -> np.ndarray:
    """Weighted mean of the members' probabilities."""
    total = sum(m.weight for m in members)
    probs = None
    for m in members:
        p = predict_member(m, decode_paths, is_jpeg, mode, batch_size, progress) * (m.weight / total)
        probs = p if probs is None else probs + p
    return probs


# ----------------------------------------------------------------------------- inputs and CSV


def collect_images(inputs: Iterable[str]) -> list[str]:
    """Files named directly, image files under folders (recursively), and `path` columns of CSVs.

    Nothing is opened here: what each path really is (a pipe, a broken link, not an image) is
    found by verification, which gives it an error row.
    """
    from toolkit.data.discovery import IMAGE_EXTENSIONS, walk_files

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            problems: list = []
            files += [str(p) for p in walk_files(path, problems) if p.suffix.lower() in IMAGE_EXTENSIONS]
            for problem in problems:
                logger.warning("%s: %s", problem.path, problem.reason)
        elif path.suffix.lower() == ".csv" and path.is_file():
            import pandas as pd

            try:
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}: cannot be read as CSV ({exc}); a CSV of images needs a 'path' column") from None
            if "path" not in frame.columns:
                raise UserError(f"{path}: a CSV of images needs a 'path' column. Received columns: {list(frame.columns)}")
            files += [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in frame["path"]]
        else:
            files.append(str(path))  # missing files get a row that says so
    if not files:
        raise UserError(f"No image files found in --images {' '.join(map(str, inputs))} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Pass image files, folders holding them, or a CSV "
                        "with a 'path' column.")
    return files


def predictions_frame(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str], errors: dict[str, str],
                      top_k: int = 3, all_probs: bool = False, unknown: tuple[np.ndarray, float] | None = None):
    """One row per input path: prediction, top-k, optional all probabilities, or the error. With ``unknown``
    (scores of the readable images, threshold) an ``unknown_score`` column, and ``label`` is ``unknown`` above
    the threshold (the top-k columns still name the closest known classes)."""
    import pandas as pd

    k = max(1, min(top_k, len(class_names)))
    rows, row_of = [], {}
    ok_paths = [p for p in paths if p not in errors]
    for i, p in enumerate(ok_paths):
        row_of[p] = i
    from toolkit.data.discovery import printable

    for path in paths:
        row: dict[str, object] = {"path": printable(path)}
        if path in errors:
            row.update({"label": "", "probability": np.nan, "error": errors[path]})
        else:
            p = probs[row_of[path]]
            order = np.argsort(-p)[:k]
            row.update({"label": class_names[order[0]], "probability": float(p[order[0]]), "error": ""})
            if unknown is not None:
                score = float(unknown[0][row_of[path]])
                row["unknown_score"] = score
                if score > unknown[1]:
                    row["label"] = "unknown"
            for rank, c in enumerate(order, start=1):
                row[f"top{rank}_label"] = class_names[c]
                row[f"top{rank}_prob"] = float(p[c])
            if all_probs:
                row.update({f"prob_{name}": float(v) for name, v in zip(class_names, p)})
        rows.append(row)
    frame = pd.DataFrame(rows)
    columns = ["path", "label", "probability"] + (["unknown_score"] if unknown is not None else [])
    columns += [c for c in frame.columns if c.startswith("top")]
    columns += [c for c in frame.columns if c.startswith("prob_")] + ["error"]
    return frame.reindex(columns=columns)
