"""``--unknown``: how unlike the training classes an image is, and when to call it ``unknown``.

The score was chosen by measurement (``benchmarks/deploy.py``, docs/benchmarks/deploy-unknown.md): on clothing-small with
two of its classes held out (10 different pairs) and on hymenoptera with clothing photos as unknowns. The
max probability alone fails where unknown things get confident labels (shoes called pants: AUROC 0.55) and
feature distances alone where unknown things look like known ones; each catches what the other misses.
The score has two parts:

* ``1 - max p``, with the run's calibrated probabilities;
* the cosine distance of the image's pooled backbone features (centre crop) to its :data:`NEIGHBOURS`-th
  nearest training image *of the class it is predicted to be* (the run stores its training images' features,
  unit length, as float16, and their classes; a seeded random :data:`MAX_BANK` of them when it has more).
  Shorts called pants lie about as close to the nearest skirts as known images lie to their own class; what
  gives them away is that they are further from the pants than pants are. Over the 10 pairs this raised the
  distance's AUROC by 0.020 on average and the score's by 0.009 (7 pairs up, none down by more than 0.004)
  against the distance to the nearest image of any class.

Each part is put on one scale by its values on held-out images of the known classes: minus their median,
divided by the distance from the median to their 95th percentile, so that 1 means "as unusual as the 5 %
most unusual known images". The score is the larger of the two: an image is unknown when either part is
unusual. (A sum lets a part with a long tail on known images, like ``1 - max p``, set the threshold so high
that the other part cannot reach it: photos of bees shown to a model of drawn shapes, far from every shape
in feature space but confidently called one, were then accepted.)

A run stores the feature bank, the normalisation and the held-out scores themselves (``unknown.npz``):
``--unknown auto`` rejects the 5 % of held-out known images that score highest, and ``--unknown F``
(0 < F < 1) a fraction F of them. Held-out means the validation split of a holdout run (distances to the
training images of the predicted class), or for a cross-validated run the out-of-fold probabilities and each
image's distance to the other labelled images of its out-of-fold predicted class.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from toolkit.core import runs
from toolkit.core.errors import UserError

AUTO_REJECTION = 0.05  # --unknown auto: the fraction of held-out known images rejected
UNKNOWN_LABEL = "unknown"
NEIGHBOURS = 5  # the distance part: to the 5th nearest training image (docs/benchmarks/deploy-unknown.md, knn1 vs knn5)
TAIL_PERCENTILE = 95  # each part's scale: its median to this percentile on held-out known images
MAX_BANK = 20_000  # training images kept for the distance part (2.5 KB each with mobilenet_v2: at most 51 MB)


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


def unit_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def neighbour_distance(features: np.ndarray, bank: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    """Cosine distance of each row of ``features`` to its :data:`NEIGHBOURS`-th nearest row of ``bank`` (unit
    vectors); ``leave_one_out``: ``features`` are the bank itself, and an image is not its own neighbour."""
    from sklearn.neighbors import NearestNeighbors

    bank = np.asarray(bank, np.float32)
    k = min(NEIGHBOURS + int(leave_one_out), len(bank))
    index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank)
    return index.kneighbors(unit_features(features))[0][:, -1]


def class_neighbour_distance(features: np.ndarray, predicted: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray,
                             own_labels: np.ndarray | None = None) -> np.ndarray:
    """Cosine distance of each row of ``features`` to its :data:`NEIGHBOURS`-th nearest ``bank`` row of the class it is
    ``predicted`` to be (all of ``bank`` for a class of fewer than 2 rows: one would be its own only neighbour).
    ``own_labels``: ``features`` are ``bank`` itself, with these labels, and an image is not its own neighbour."""
    predicted, bank_labels = np.asarray(predicted), np.asarray(bank_labels)
    out = np.empty(len(predicted))
    for c in np.unique(predicted):
        rows, members = np.flatnonzero(predicted == c), bank_labels == c
        whole = members.sum() < 2
        if whole:
            members = np.ones(len(bank), bool)
        # the rows that are themselves among the class's bank rows skip one neighbour: themselves
        inside = np.zeros(len(rows), bool) if own_labels is None else whole | (np.asarray(own_labels)[rows] == c)
        for skip in (False, True):
            if (inside == skip).any():
                chosen = rows[inside == skip]
                out[chosen] = neighbour_distance(features[chosen], bank[members], leave_one_out=skip)
    return out


def _parts(probs: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The score's two parts: 1 - max p, and the distance."""
    return 1.0 - np.asarray(probs).max(1), np.asarray(distances)


def tail_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, median-to-95th-percentile distance) of a part's held-out values: its normalisation."""
    median, tail = np.percentile(values, [50, TAIL_PERCENTILE])
    return float(median), max(float(tail - median), 1e-12)


def combined(parts, spread: np.ndarray) -> np.ndarray:
    """The score: the larger of the parts, each normalised by its ``spread`` row (:func:`tail_scale`)."""
    return np.max([(part - median) / scale for part, (median, scale) in zip(parts, spread)], axis=0)


@dataclasses.dataclass
class UnknownScorer:
    bank: np.ndarray  # (training images, channels) unit-length pooled features, float16
    bank_labels: np.ndarray  # (training images,) the class of each bank row
    spread: np.ndarray  # [[median, scale] of 1 - max p, [median, scale] of the distance] (tail_scale)
    reference: np.ndarray  # the held-out known images' scores

    def score(self, probs: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Images' scores from their calibrated probabilities and pooled features."""
        distances = class_neighbour_distance(features, np.asarray(probs).argmax(1), self.bank, self.bank_labels)
        return combined(_parts(probs, distances), self.spread)

    def threshold(self, fraction: float) -> float:
        """The score above which ``fraction`` of the held-out known images lie."""
        return float(np.quantile(self.reference, 1.0 - fraction))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return buffer.getvalue()


def fit_scorer(bank_features: np.ndarray, bank_labels: np.ndarray, held_probs, held_distances) -> UnknownScorer:
    """From the training images' pooled features and classes, and the held-out known images' calibrated
    probabilities and distances (measured without them: see the module docstring)."""
    parts = _parts(held_probs, held_distances)
    spread = np.array([tail_scale(p) for p in parts])
    return UnknownScorer(unit_features(bank_features).astype(np.float16), np.asarray(bank_labels, np.int32), spread,
                         combined(parts, spread))


def run_scorer(model, splits, size: int, crop_fraction: float, held_probs: np.ndarray, evaluated=None) -> UnknownScorer:
    """A finished run's scorer. ``held_probs`` are its calibrated validation (or out-of-fold) probabilities;
    ``evaluated`` a cross-validated run's :class:`toolkit.train.cross_validate.OutOfFold` (features already pooled)."""
    predicted = np.asarray(held_probs).argmax(1)
    if evaluated is not None:
        features, labels = np.asarray(evaluated.features), np.asarray(evaluated.labels)
        inside = np.zeros(len(features), bool)
        inside[bank_rows(len(features))] = True
        bank = unit_features(features[inside]).astype(np.float16)  # as stored: the reference sees what predict sees
        distances = np.empty(len(features))
        distances[inside] = class_neighbour_distance(features[inside], predicted[inside], bank, labels[inside],
                                                     own_labels=labels[inside])
        if not inside.all():
            distances[~inside] = class_neighbour_distance(features[~inside], predicted[~inside], bank, labels[inside])
        return fit_scorer(bank, labels[inside], held_probs, distances)
    train = splits.train.take(bank_rows(len(splits.train)))
    bank = unit_features(centre_features(model, (train.decode_paths, train.is_jpeg), size, crop_fraction))
    bank = bank.astype(np.float16)
    val = centre_features(model, (splits.val.decode_paths, splits.val.is_jpeg), size, crop_fraction)
    distances = class_neighbour_distance(val, predicted, bank, np.asarray(train.labels))
    return fit_scorer(bank, train.labels, held_probs, distances)


def bank_rows(n: int, seed: int = 0) -> np.ndarray:
    """Which of ``n`` training images the bank keeps: all, or a seeded random :data:`MAX_BANK` of them."""
    if n <= MAX_BANK:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_BANK, replace=False))


def predict_scored(members, checked, decode_paths, is_jpeg, mode: str, batch_size: int, progress,
                   fraction: float | None) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
    """(probabilities, (unknown score of each image, threshold rejecting ``fraction`` of held-out known images) or
    None when ``fraction`` is None). ``checked`` is :func:`member_scorer`'s (member, scorer): the score's features
    come from the same backbone pass as the probabilities."""
    from toolkit.predict.inference import predict_ensemble, predict_with_features

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
    if members[0].multi_label:
        raise UserError(f"--unknown: {members[0].path} is a multi-label run; an image holding none of its labels "
                        "already gets an empty `labels` cell. Use --unknown off.")
    from toolkit.backbones.head import feature_width

    return members[0], load_scorer(members[0].path, len(members[0].class_names), feature_width(members[0].model))


def load_scorer(run: Path, classes: int, width: int) -> UnknownScorer:
    """A run's scorer, every array checked against the model it is to score for (``classes`` outputs, ``width``
    feature channels): a crafted or damaged file is refused, never trusted."""
    path = Path(run) / runs.UNKNOWN_FILE
    if not path.is_file():
        raise UserError(f"--unknown: {run} has no {runs.UNKNOWN_FILE} (the statistics the score needs), so it was "
                        "trained before toolkit stored them. Train it again, or pass --unknown off.")
    try:
        with np.load(path) as saved:
            stored = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"--unknown: {path} cannot be read ({type(exc).__name__}); train the run again, or pass "
                        "--unknown off.") from None
    fields = [f.name for f in dataclasses.fields(UnknownScorer)]
    if not all(name in stored for name in fields):
        raise UserError(f"--unknown: {path} holds the statistics of another version of the score ({', '.join(stored)}; "
                        f"this one needs {', '.join(fields)}). Train the run again, or pass --unknown off.")
    problem = _scorer_problem(stored, classes, width)
    if problem:
        raise UserError(f"--unknown: {path} does not fit this model: {problem}. Train the run again, or pass "
                        "--unknown off.")
    return UnknownScorer(**{name: stored[name] for name in fields})


def _scorer_problem(stored: dict[str, np.ndarray], classes: int, width: int) -> str:
    """What is wrong with a stored scorer's arrays ("" if nothing)."""
    bank, labels, spread, reference = (stored[k] for k in ("bank", "bank_labels", "spread", "reference"))
    if any(a.dtype.kind not in "fiu" for a in (bank, labels, spread, reference)):
        return "its arrays must be numbers"
    if bank.ndim != 2 or len(bank) < 1 or bank.shape[1] != width:
        return f"bank has shape {bank.shape}, not (images >= 1, {width})"
    if labels.shape != (len(bank),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes:
        return f"bank_labels must be {len(bank)} class indices in [0, {classes})"
    if spread.shape != (2, 2) or not np.isfinite(spread).all() or not (spread[:, 1] > 0).all():
        return "spread must be 2 finite (median, scale > 0) pairs"
    if reference.ndim != 1 or len(reference) < 1 or not np.isfinite(reference).all():
        return "reference must hold the held-out images' finite scores"
    if not np.isfinite(bank.astype(np.float32)).all():
        return "bank holds values that are not finite"
    return ""


def centre_features(model, split_or_paths, image_size: int, crop_fraction: float, batch_size: int = 32) -> np.ndarray:
    """Pooled backbone features of the centre crops of ``(decode_paths, is_jpeg)``."""
    import tensorflow as tf

    from toolkit.backbones.head import pooled_model
    from toolkit.data.pipeline import eval_image, finish, parallel_calls

    decode_paths, is_jpeg = split_or_paths
    if not len(decode_paths):
        return np.zeros((0, 1), np.float32)
    two = pooled_model(model)
    forward = tf.function(lambda x: two(x, training=False)[1], reduce_retracing=True)
    files = tf.data.Dataset.from_tensor_slices((list(decode_paths), np.asarray(is_jpeg, bool)))
    images = files.map(lambda p, j: eval_image(tf.io.read_file(p), j, image_size, crop_fraction),
                       num_parallel_calls=parallel_calls(), deterministic=True)
    return np.concatenate([np.asarray(forward(x), np.float32) for x in finish(images.batch(batch_size))])
