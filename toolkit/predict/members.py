"""Trained runs loaded for prediction: a *member* is one run folder (``model.keras`` + ``classes.json`` +
``recipe.toml`` + optional ``calibration.json``); an *ensemble folder* holds ``ensemble.json`` listing member
folders and their weights (:mod:`toolkit.predict.ensemble_spec`) and is accepted wherever a run is.

Every file is read as input, not authority: the model in Keras' safe mode, after its archive's JSON members
were sized; the class list checked against the model's outputs; the temperature within a stated range.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from toolkit.core import runs
from toolkit.core.errors import UserError

ENSEMBLE_FILE = runs.ENSEMBLE_FILE
# A .keras file is a zip; its JSON members (the architecture, metadata) are a few hundred KB for any real
# model. A larger one is refused before Keras reads it whole (a 3 GiB member of spaces packs into 12 MB).
MAX_KERAS_JSON_BYTES = 64 * 2**20
# Temperatures a run's calibration.json may hold: the fit searches [0.05, 20].
TEMPERATURE_RANGE = (0.01, 100.0)


class ModelMismatchError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class LabelDecisions:
    """A multi-label run's calibration and decisions: per label, its temperature and the calibrated probability at
    which it is predicted."""

    temperatures: "np.ndarray"  # (labels,)
    thresholds: "np.ndarray"  # (labels,)


@dataclasses.dataclass
class Member:
    path: Path
    model: object  # keras.Model
    class_names: tuple[str, ...]
    image_size: int
    crop_fraction: float
    temperature: float = 1.0
    weight: float = 1.0
    labels: "LabelDecisions | None" = None  # a multi-label run's per-label temperatures and thresholds
    _forwards: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def multi_label(self) -> bool:
        return self.labels is not None

    def calibrated(self, probs):
        """The model's probabilities with the run's calibration applied: its temperature, or one per label."""
        if self.labels is not None:
            from toolkit.predict.label_calibration import apply_label_temperatures

            return apply_label_temperatures(probs, self.labels.temperatures)
        from toolkit.predict.calibration import apply_temperature

        return apply_temperature(probs, self.temperature)

    @property
    def fixed_size(self) -> int | None:
        """The only input size the model takes (a ViT's position embeddings), or None: any size."""
        return fixed_input_size(self.model)

    def forward(self, whole_images: bool = False, features: bool = False):
        """The model's inference call, compiled once per member (:func:`compiled_forward`). With ``features``,
        (probabilities, pooled backbone features) from the same pass (:func:`toolkit.backbones.head.pooled_model`)."""
        key = (whole_images, features)
        if key not in self._forwards:
            from toolkit.backbones.head import pooled_model

            model = pooled_model(self.model) if features else self.model
            self._forwards[key] = compiled_forward(model, self.image_size, whole_images, str(self.path))
        return self._forwards[key]


def fixed_input_size(model) -> int | None:
    """The only input size ``model`` takes (a ViT's position embeddings), or None: any size."""
    return model.input_shape[1]


def compiled_forward(model, image_size: int, whole_images: bool, source: str):
    """``model``'s inference call as a ``tf.function`` with a fixed input signature: any batch of ``image_size``
    views (whole images: any height and width), so no re-tracing between calls or batches. A model of one fixed
    input size refuses whole images in one line (``source`` names it)."""
    import tensorflow as tf

    fixed = fixed_input_size(model)
    if whole_images and fixed:
        raise UserError(f"--tta full: {source} takes only {fixed}x{fixed} images (its backbone's position embeddings "
                        "are fixed), not whole images; use --tta none, flip, 5crop or 10crop")
    size = None if whole_images else image_size
    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec])


def _check_keras_file(path: Path) -> None:
    """Refuse a ``.keras`` zip whose JSON members are too large to be a model's, before Keras reads them; import
    keras-hub first when the model holds a keras-hub backbone (its layer classes register on import)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            oversized = [i for i in members if i.filename.endswith(".json") and i.file_size > MAX_KERAS_JSON_BYTES]
            config = b"" if oversized or "config.json" not in archive.namelist() else archive.read("config.json")
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # not a zip: Keras says what it is below
    if oversized:
        info = oversized[0]
        raise UserError(f"{path}: not loaded: its {info.filename} member is {info.file_size / 2**20:,.0f} "
                        f"MB (a model's is well under {MAX_KERAS_JSON_BYTES // 2**20} MB); the file is "
                        "damaged or not a toolkit model: train the run again or restore the file")
    if b'"keras_hub' in config:
        from toolkit.backbones.external import import_hub

        import_hub(f"{path} holds a keras-hub backbone; loading it")


def _load_keras_model(path: Path):
    """``keras.models.load_model`` in safe mode; a file it cannot or will not load is a user error."""
    import keras

    import toolkit.backbones.head  # noqa: F401  (registers the toolkit's own layers, e.g. LogSumExpPooling2D)

    _check_keras_file(path)
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, TypeError... for bad files
        text = " ".join(str(exc).split())
        if "safe_mode=False" in text and "deserializ" in text:  # Keras refusing code in safe mode
            why = ("it holds Python code (a Lambda layer) that safe mode refuses to run; only load it with "
                   "safe_mode=False in Python if you trust where it came from")
        else:
            why = f"it cannot be read ({type(exc).__name__}: {text[:200]}); the file is truncated or corrupt: " \
                  "train the run again or restore the file"
        raise UserError(f"{path}: not loaded: {why}") from exc


def load_member(run: str | Path, weight: float = 1.0):
    from toolkit import backbones
    from toolkit.config.recipes import load_config

    run = Path(run)
    if not (run / runs.MODEL_FILE).is_file():
        raise UserError(f"Not a trained run folder (no {runs.MODEL_FILE}). Received: model={str(run)!r}")
    config = load_config(run / runs.RECIPE_FILE)  # validated; its defaults are the config's own
    class_names = runs.read_json(run / runs.CLASSES_FILE, "It lists the class names in label order; restore it.")
    if (not isinstance(class_names, list) or not all(isinstance(c, str) and c for c in class_names)
            or len(set(class_names)) != len(class_names)):
        raise UserError(f"{run / runs.CLASSES_FILE} must be a JSON list of distinct class names. Received: "
                        f"{class_names!r:.100}")
    labels = read_label_decisions(run, class_names)  # checked before the model is read: it costs nothing
    # a multi-label run's calibration.json holds one temperature per label, read with its thresholds
    temperature = read_temperature(run / runs.CALIBRATION_FILE) if labels is None else 1.0
    model = _load_keras_model(run / runs.MODEL_FILE)
    outputs = model.output_shape[-1]
    if len(class_names) != outputs:
        raise UserError(f"{run / runs.CLASSES_FILE} names {len(class_names)} classes, but the model has {outputs} "
                        "outputs; restore the classes.json that was trained with this model.")
    check_head(run, model, labels)
    return Member(
        path=run,
        model=model,
        class_names=tuple(class_names),
        image_size=config.image_size or backbones.get_spec(config.backbone).input_size,
        crop_fraction=config.crop_fraction,
        temperature=temperature,
        weight=weight,
        labels=labels,
    )


def read_label_decisions(run: Path, class_names: Sequence[str]) -> LabelDecisions | None:
    """A multi-label run's ``thresholds.json`` and per-label ``calibration.json``, checked against its classes; None
    for a single-label run (no thresholds)."""
    import numpy as np

    path = run / runs.THRESHOLDS_FILE
    if not path.is_file():
        return None
    fix = "restore the file, or train the run again"
    thresholds = _per_label(runs.read_json(path, fix), "thresholds", class_names, (0.0, 1.0), path, fix)
    temperatures = np.ones(len(class_names))
    if (run / runs.CALIBRATION_FILE).is_file():
        calibration = runs.read_json(run / runs.CALIBRATION_FILE, fix)
        if isinstance(calibration, dict) and "temperature" in calibration and "temperatures" not in calibration:
            raise UserError(f"{path}: only a multi-label run has thresholds, and {run / runs.CALIBRATION_FILE} is a "
                            "single-label run's (one temperature); delete the thresholds, or restore the run's own files")
        temperatures = _per_label(calibration, "temperatures", class_names, TEMPERATURE_RANGE,
                                  run / runs.CALIBRATION_FILE, "restore the file, or delete it to predict without "
                                  "calibration")
    return LabelDecisions(temperatures, thresholds)


def check_head(run: Path, model, labels: LabelDecisions | None) -> None:
    """A sigmoid (multi-label) head must come with thresholds, and thresholds with a sigmoid head."""
    from toolkit.backbones.head import is_multi_label

    if labels is None and is_multi_label(model):
        raise UserError(f"{run}: its model is multi-label but {runs.THRESHOLDS_FILE} is missing; restore it, or train "
                        "the run again")
    if labels is not None and not is_multi_label(model):
        raise UserError(f"{run / runs.THRESHOLDS_FILE}: only a multi-label run has thresholds, and "
                        f"{run / runs.MODEL_FILE} is single-label; delete the file, or restore the run's own model")


def _per_label(values, key: str, class_names: Sequence[str], bounds: tuple[float, float], path: Path, fix: str):
    """``values[key]``: one number in ``bounds`` per class, as a {class: number} object naming exactly the classes."""
    import math

    import numpy as np

    table = values.get(key) if isinstance(values, dict) else None
    if not isinstance(table, dict) or sorted(table) != sorted(class_names):
        raise UserError(f"{path}: {key!r} must map each of the run's {len(class_names)} classes to a number. "
                        f"Received: {str(table)[:100]}; {fix}")
    low, high = bounds
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise UserError(f"{path}: {key} of {name!r} must be a number in [{low}, {high}]. Received: {value!r:.40}; "
                            f"{fix}")
    return np.asarray([float(table[name]) for name in class_names])


def read_temperature(path: Path) -> float:
    """The temperature in a run's ``calibration.json`` (1 without one), refused outside :data:`TEMPERATURE_RANGE`."""
    import math

    if not path.is_file():
        return 1.0
    values = runs.read_json(path, "Delete it to predict without calibration.")
    value = values.get("temperature", 1.0) if isinstance(values, dict) else None
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{path}: temperature must be a number in [{low}, {high}] (calibration fits one in [0.05, 20]). "
                        f"Received: temperature={value!r:.40}; restore the file, or delete it to predict without "
                        "calibration.")
    return float(value)


def expand_models(paths: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[tuple[Path, float]]:
    """Run folders (ensemble folders expanded into their members) with their weights."""
    from toolkit.predict.ensemble_spec import check_weights, read_ensemble

    out: list[tuple[Path, float]] = []
    for path, weight in zip(paths, check_weights(weights, len(paths))):
        path = Path(path)
        if (path / ENSEMBLE_FILE).is_file():
            spec = read_ensemble(path)
            out += [(path / m, weight * w) for m, w in zip(spec.members, spec.weights)]
        else:
            out.append((path, weight))
    return out


def load_models(paths: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[Member]:
    """Load every member; their class lists must be identical (same names, same order)."""
    members = [load_member(p, w) for p, w in expand_models(paths, weights)]
    if len(members) > 1 and any(m.multi_label for m in members):
        raise UserError(f"{next(m.path for m in members if m.multi_label)} is a multi-label run, with its own "
                        "per-label thresholds: ensembles of multi-label runs are not supported; pass one --model")
    reference = members[0].class_names
    for m in members[1:]:
        if m.class_names != reference:
            only_a = sorted(set(reference) - set(m.class_names))
            only_b = sorted(set(m.class_names) - set(reference))
            detail = (f"{members[0].path} has {only_a} that {m.path} lacks, {m.path} has {only_b}"
                      if only_a or only_b else "same classes in a different order")
            raise ModelMismatchError(f"Ensemble members disagree on their classes: {detail}. "
                                     "Train every member on the same class folders.")
    return members
