"""``--unknown``: how unlike the training classes an image is, and when to call it ``unknown``.

The score was chosen by measurement (``benchmarks/deploy.py``, the README's table): on clothing-small with
two classes held out and on hymenoptera with clothing photos as unknowns, the max probability alone
fails on one (AUROC 0.55) and feature distances alone are weaker there than together with it. The score
is the sum of two parts, each normalised by the median and interquartile range of its values on held-out
images of the known classes:

* ``1 - max p``, with the run's calibrated probabilities;
* the Mahalanobis distance of the image's pooled backbone features (centre crop) to the nearest class mean,
  with one shared Ledoit-Wolf covariance, all fitted on the training images.

A run stores the class means, the precision matrix, the normalisation and the held-out scores themselves
(``unknown.npz``): ``--unknown auto`` rejects the 5 % of held-out known images that score highest, and
``--unknown F`` (0 < F < 1) a fraction F of them. Held-out means the validation split of a holdout run,
or for a cross-validated run the out-of-fold probabilities and distances from statistics fitted without
the image's fold.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from toolkit import runs
from toolkit.errors import UserError

AUTO_REJECTION = 0.05  # --unknown auto: the fraction of held-out known images rejected
UNKNOWN_LABEL = "unknown"


def parse_unknown(value: str) -> float | None:
    """``off`` → None; ``auto`` → :data:`AUTO_REJECTION`; a fraction in (0, 1) of known images to reject."""
    text = str(value).strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return AUTO_REJECTION
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction < 1:
        raise UserError(f"--unknown must be auto, off, or the fraction of known-class images to reject, in (0, 1) "
                        f"(auto: {AUTO_REJECTION}). Received: unknown={value!r}")
    return fraction


def mahalanobis_to_nearest(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``features`` to the nearest of ``means``."""
    features = np.asarray(features, np.float64)
    # (d @ P) * d summed by rows: a BLAS product (a three-operand einsum is a plain loop: 30x slower at 1280 features)
    return np.stack([np.sum(((features - m) @ precision) * (features - m), axis=1) for m in means], 1).min(1)


def class_statistics(features: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means, shared Ledoit-Wolf precision) of pooled features; an absent class gets the overall mean."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    overall = features.mean(0)
    means = np.stack([features[labels == c].mean(0) if (labels == c).any() else overall for c in range(classes)])
    return means, LedoitWolf().fit(features - means[labels]).precision_


def _parts(probs: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The score's two parts: 1 - max p, and the distance."""
    return 1.0 - np.asarray(probs).max(1), np.asarray(distances)


def _normalised_sum(parts, spread: np.ndarray) -> np.ndarray:
    return sum((part - median) / iqr for part, (median, iqr) in zip(parts, spread))


@dataclasses.dataclass
class UnknownScorer:
    means: np.ndarray
    precision: np.ndarray
    spread: np.ndarray  # [[median, IQR] of 1 - max p, [median, IQR] of the distance]
    reference: np.ndarray  # the held-out known images' scores

    def score(self, probs: np.ndarray, features: np.ndarray) -> np.ndarray:
        return _normalised_sum(_parts(probs, mahalanobis_to_nearest(features, self.means, self.precision)), self.spread)

    def threshold(self, fraction: float) -> float:
        """The score above which ``fraction`` of the held-out known images lie."""
        return float(np.quantile(self.reference, 1.0 - fraction))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return buffer.getvalue()


def fit_scorer(means: np.ndarray, precision: np.ndarray, held_probs, held_distances) -> UnknownScorer:
    """From the training images' :func:`class_statistics`, and the held-out known images' calibrated
    probabilities and distances (measured without them: see the module docstring)."""
    parts = _parts(held_probs, held_distances)
    spread = np.array([[np.median(p), max(float(np.subtract(*np.percentile(p, [75, 25]))), 1e-12)] for p in parts])
    return UnknownScorer(means.astype(np.float32), precision.astype(np.float32), spread, _normalised_sum(parts, spread))


def held_out_distances(features: np.ndarray, labels: np.ndarray, fold_of: np.ndarray, classes: int) -> np.ndarray:
    """Each image's distance from statistics fitted on the other folds (a cross-validated run's reference)."""
    out = np.zeros(len(labels))
    for k in np.unique(fold_of):
        inside = fold_of == k
        means, precision = class_statistics(features[~inside], labels[~inside], classes)
        out[inside] = mahalanobis_to_nearest(features[inside], means, precision)
    return out


def run_scorer(model, splits, size: int, crop_fraction: float, held_probs: np.ndarray, evaluated=None) -> UnknownScorer:
    """A finished run's scorer. ``held_probs`` are its calibrated validation (or out-of-fold) probabilities;
    ``evaluated`` a cross-validated run's :class:`toolkit.cross_validate.OutOfFold` (features already pooled)."""
    classes = len(splits.class_names)
    if evaluated is not None:
        means, precision = class_statistics(evaluated.features, evaluated.labels, classes)
        fold_of = evaluated.held[:, :evaluated.folds].argmax(1)  # the first repeat's folds
        distances = held_out_distances(evaluated.features, evaluated.labels, fold_of, classes)
    else:
        features = centre_features(model, (splits.train.decode_paths, splits.train.is_jpeg), size, crop_fraction)
        means, precision = class_statistics(features, np.asarray(splits.train.labels), classes)
        val = centre_features(model, (splits.val.decode_paths, splits.val.is_jpeg), size, crop_fraction)
        distances = mahalanobis_to_nearest(val, means, precision)
    return fit_scorer(means, precision, held_probs, distances)


def predict_scored(members, checked, decode_paths, is_jpeg, mode: str, batch_size: int, progress,
                   fraction: float | None) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
    """(probabilities, (unknown score of each image, threshold rejecting ``fraction`` of held-out known images) or
    None when ``fraction`` is None). ``checked`` is :func:`member_scorer`'s (member, scorer): the score's features
    come from the same backbone pass as the probabilities."""
    from toolkit.inference import predict_ensemble, predict_with_features

    if fraction is None:
        return predict_ensemble(members, decode_paths, is_jpeg, mode, batch_size, progress), None
    member, scorer = checked
    probs, features = predict_with_features(member, decode_paths, is_jpeg, mode, batch_size, progress)
    scores = scorer.score(probs, features) if len(probs) else np.zeros(0)
    return probs, (scores, scorer.threshold(fraction))


def member_scorer(members):
    """The one model's member and scorer; checked before any image is predicted."""
    if len(members) != 1:
        raise UserError(f"--unknown works with one model (its own statistics); received {len(members)} models. Pass "
                        "one --model, or --unknown off.")
    return members[0], load_scorer(members[0].path)


def load_scorer(run: Path) -> UnknownScorer:
    path = Path(run) / runs.UNKNOWN_FILE
    if not path.is_file():
        raise UserError(f"--unknown: {run} has no {runs.UNKNOWN_FILE} (the statistics the score needs), so it was "
                        "trained before toolkit stored them. Train it again, or pass --unknown off.")
    try:
        with np.load(path) as saved:
            return UnknownScorer(**{f.name: saved[f.name] for f in dataclasses.fields(UnknownScorer)})
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise UserError(f"--unknown: {path} cannot be read ({type(exc).__name__}); train the run again, or pass "
                        "--unknown off.") from None


def pooled_model(model):
    """``model`` with a second output: the backbone's features averaged over space (what the score uses)."""
    import keras

    from toolkit.head import BACKBONE

    names = [layer.name for layer in model.layers]
    after = model.layers[names.index(BACKBONE) + 1]  # the head's first layer: its input is the backbone's output
    pooled = keras.layers.GlobalAveragePooling2D(name="unknown_pool")(after.input)
    return keras.Model(model.input, [model.output, pooled])


def centre_features(model, split_or_paths, image_size: int, crop_fraction: float, batch_size: int = 32) -> np.ndarray:
    """Pooled backbone features of the centre crops of ``(decode_paths, is_jpeg)``."""
    import tensorflow as tf

    from toolkit.pipeline import eval_image, finish, parallel_calls

    decode_paths, is_jpeg = split_or_paths
    if not len(decode_paths):
        return np.zeros((0, 1), np.float32)
    two = pooled_model(model)
    forward = tf.function(lambda x: two(x, training=False)[1], reduce_retracing=True)
    files = tf.data.Dataset.from_tensor_slices((list(decode_paths), np.asarray(is_jpeg, bool)))
    images = files.map(lambda p, j: eval_image(tf.io.read_file(p), j, image_size, crop_fraction),
                       num_parallel_calls=parallel_calls(), deterministic=True)
    return np.concatenate([np.asarray(forward(x), np.float32) for x in finish(images.batch(batch_size))])
