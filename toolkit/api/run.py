"""A trained run (or ensemble) folder as a Python object: what ``toolkit predict``, ``evaluate``, ``explain`` and
``export`` do, as methods. The CLI calls these same functions."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

from toolkit.core.processes import refuse_in_a_starting_worker

Images = str | Path | Sequence[str | Path]  # files, folders (searched recursively), CSVs with a path column


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What :func:`predict` gives: one row per input path (``frame``), and the counts ``toolkit predict`` prints."""

    frame: Any  # pandas.DataFrame: path, label, probability, top-k labels and probabilities, error
    predicted: int  # readable images
    unreadable: int  # rows whose error column says why
    unknown: int | None  # images labelled 'unknown' (None without --unknown)


def _paths(images: Images) -> list[str]:
    return [str(images)] if isinstance(images, (str, Path)) else [str(p) for p in images]


def _check_batch_size(batch_size: int) -> None:
    from toolkit.config.settings import MAX_BATCH_SIZE
    from toolkit.core.errors import UserError

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UserError(f"--batch-size must be in [1, {MAX_BATCH_SIZE}] (images times views per forward pass). "
                        f"Received: batch_size={batch_size!r}")


def predict(models: Sequence[str | Path], images: Images, *, weights: Sequence[float] | None = None,
            tta: str = "none", batch_size: int = 32, top_k: int = 3, all_probs: bool = False, unknown: str = "off",
            verbose: int = 0) -> Predictions:
    """Predict every image of ``images`` with one model, or the weighted mean of several (an ensemble)."""
    refuse_in_a_starting_worker("predict")
    from toolkit.core.errors import UserError
    from toolkit.core.quiet import import_tensorflow
    from toolkit.data.verify import verify_files
    from toolkit.predict.inference import collect_images, member_views, predictions_frame
    from toolkit.predict.members import load_models
    from toolkit.predict.unknown import member_scorer, parse_unknown, predict_scored

    _check_batch_size(batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"--top-k must be >= 1 (how many top classes each row lists). Received: top_k={top_k!r}")
    fraction = parse_unknown(unknown)
    import_tensorflow()
    members = load_models([str(m) for m in models], weights)
    checked = member_scorer(members) if fraction is not None else None  # refused before any image is read
    member_views(members[0], tta)  # so is a view the run cannot take
    records = verify_files(collect_images(_paths(images)), progress=False)
    errors = {r.path: r.reason for r in records if not r.ok}
    good = [r for r in records if r.ok]
    progress = None
    if verbose:
        from keras.utils import Progbar

        progress = Progbar(len(good) * len(members), unit_name="image").add
    probs, scored = predict_scored(members, checked, [r.decode_path for r in good], [r.is_jpeg for r in good], tta,
                                   batch_size, progress, fraction)
    if members[0].multi_label:
        from toolkit.predict.multilabel_report import predictions_frame as multilabel_frame

        frame = multilabel_frame([r.path for r in records], probs, members[0].labels.thresholds,
                                 members[0].class_names, errors)
        return Predictions(frame, len(good), len(errors), None)
    frame = predictions_frame([r.path for r in records], probs, members[0].class_names, errors, top_k, all_probs,
                              scored)
    rejected = int((scored[0] > scored[1]).sum()) if scored is not None else None
    return Predictions(frame, len(good), len(errors), rejected)


def embed(images: Images, *, model: str | Path | None = None, backbone: str | None = None, preprocess: str = "auto",
          tta: str = "none", batch_size: int = 32, verbose: int = 0):
    """A pandas DataFrame, one row per image of ``images``: ``path``, ``error`` (why an unreadable file has no
    features) and ``feature_0`` ... : the pooled backbone features of a trained run (``model``) or of a backbone
    with its own pretrained weights (``backbone``: a registry name, ``keras_hub:<preset>``, a preset folder or a
    ``.keras`` file), averaged over ``tta``'s views (``predict``'s)."""
    refuse_in_a_starting_worker("embed")
    from toolkit.core.errors import UserError
    from toolkit.core.quiet import import_tensorflow
    from toolkit.data.verify import verify_files
    from toolkit.predict import embed as embedding
    from toolkit.predict.inference import TTA_MODES, collect_images

    _check_batch_size(batch_size)
    if (model is None) == (backbone is None):
        raise UserError(f"embed takes one of --model RUN or --backbone SPEC. Received: model={model!r}, "
                        f"backbone={backbone!r}")
    if tta not in TTA_MODES:
        raise UserError(f"Unknown --tta. Received: tta={tta!r}; allowed: {', '.join(TTA_MODES)}")
    import_tensorflow()
    embedder = embedding.from_run(model) if model is not None else embedding.from_backbone(backbone, preprocess)
    records = verify_files(collect_images(_paths(images)), progress=False)
    good = [r for r in records if r.ok]
    progress = None
    if verbose:
        from keras.utils import Progbar

        progress = Progbar(len(good), unit_name="image").add
    features = embedding.embed(embedder, [r.decode_path for r in good], [r.is_jpeg for r in good], tta, batch_size,
                               progress)
    return embedding.embeddings_frame([r.path for r in records], features, {r.path: r.reason for r in records if not r.ok})


def evaluate(models: Sequence[str | Path], data: str | Path, out: str | Path | None = None, *,
             weights: Sequence[float] | None = None, tta: str = "none", unknown: str = "off", batch_size: int = 32,
             overwrite: bool = False, verbose: int = 0) -> dict[str, Any]:
    """Evaluate on labelled ``data`` (its test split, else its validation split, else every image); the report
    files go into ``out`` (none kept when ``out`` is None). Returns the metrics (``metrics.json``)."""
    refuse_in_a_starting_worker("evaluate")
    from toolkit.core.quiet import import_tensorflow
    from toolkit.predict.evaluate import evaluate as evaluate_models

    _check_batch_size(batch_size)
    import_tensorflow()
    models = [str(m) for m in models]
    if out is not None:
        return evaluate_models(models, str(data), out, tta, weights, overwrite, batch_size, verbose, unknown)
    with tempfile.TemporaryDirectory(prefix="toolkit-evaluate-") as temporary:
        return evaluate_models(models, str(data), Path(temporary) / "evaluation", tta, weights, False, batch_size,
                               verbose, unknown)


def explain(model: str | Path, images: Images, out: str | Path, *, class_name: str | None = None,
            overwrite: bool = False) -> list[Path]:
    """One class-activation map per image, overlaid on it, into the folder ``out``; returns the files."""
    refuse_in_a_starting_worker("explain")
    from toolkit.core.quiet import import_tensorflow
    from toolkit.predict.explain import explain as explain_images

    import_tensorflow()
    return explain_images(str(model), _paths(images), out, class_name, overwrite)


def export(model: str | Path, format: str, out: str | Path, *, image_size: int | None = None,
           data: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as ``savedmodel``, ``tflite``, ``tflite-fp16``, ``tflite-int8`` or ``onnx`` into the folder
    ``out``; returns the model file. Every format takes raw RGB and gives ``predict``'s probabilities."""
    refuse_in_a_starting_worker("export")
    from toolkit.core.quiet import import_tensorflow
    from toolkit.deploy.export import export as export_model

    import_tensorflow()
    return export_model(str(model), format, out, overwrite, image_size, data)


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run or ensemble folder (what :func:`toolkit.finetune` returns and :func:`toolkit.load` opens).

    ``metrics`` is the run's ``metrics.json``; ``plan`` the freeze plan that trained it (known right after
    training); ``members`` each ensemble member's validation accuracy.
    """

    path: Path
    metrics: dict[str, Any]
    plan: Any = None
    members: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_result(cls, result) -> "Run":
        return cls(Path(result.run_dir), result.metrics, result.plan, dict(result.members))

    @property
    def is_ensemble(self) -> bool:
        from toolkit.core import runs

        return (self.path / runs.ENSEMBLE_FILE).is_file()

    @property
    def is_multi_label(self) -> bool:
        """Trained on a ``labels`` manifest: several labels per image, each with its own threshold."""
        return bool(self.metrics.get("multi_label"))

    @property
    def macro_ap(self) -> float:
        """A multi-label run's expected macro average precision on new images (out of fold)."""
        return float(self._estimate("macro_ap"))

    @property
    def macro_ap_ci95(self) -> tuple[float, float]:
        low, high = self._estimate("macro_ap_interval")
        return float(low), float(high)

    def _estimate(self, key: str):
        if not self.is_multi_label:
            from toolkit.core.errors import UserError

            raise UserError(f"{self.path} is a single-label run: its estimate is Run.accuracy, not {key}")
        return self.metrics["estimate"][key]

    @property
    def accuracy(self) -> float:
        """The accuracy the run expects on new images: out-of-fold for a cross-validated run, else validation."""
        self._single_label("accuracy")
        cv = self.metrics.get("cv")
        return float(cv["accuracy"] if cv else self.metrics["val_accuracy"])

    @property
    def accuracy_ci95(self) -> tuple[float, float]:
        self._single_label("accuracy_ci95")
        cv = self.metrics.get("cv")
        low, high = cv["accuracy_ci95"] if cv else self.metrics["val_accuracy_ci95"]
        return float(low), float(high)

    def _single_label(self, key: str) -> None:
        if self.is_multi_label:
            from toolkit.core.errors import UserError

            raise UserError(f"{self.path} is a multi-label run: it has no {key}; its estimate is Run.macro_ap (with "
                            "Run.macro_ap_ci95) and metrics['estimate']")

    def summary(self) -> str:
        """The accuracy line ``toolkit finetune`` prints: the estimate, its interval and how many images."""
        from toolkit.train.report import accuracy_line

        return accuracy_line(self.metrics)

    def predict(self, images: Images, *, tta: str = "none", unknown: str = "off", top_k: int = 3,
                all_probs: bool = False, batch_size: int = 32):
        """A pandas DataFrame, one row per image: ``path, label, probability``, the top-k classes, and an
        ``error`` column for unreadable files. ``tta``: none, flip, 5crop, 10crop or full; ``unknown``: off, auto
        or a rejection fraction (adds ``unknown_score``). The probabilities are ``toolkit predict``'s. A multi-label
        run's rows are ``path, labels`` (joined by ``;``), ``prob_<class>`` for every class and ``error``."""
        return predict([self.path], images, tta=tta, unknown=unknown, top_k=top_k, all_probs=all_probs,
                       batch_size=batch_size).frame

    def embed(self, images: Images, *, tta: str = "none", batch_size: int = 32):
        """A pandas DataFrame, one row per image: ``path``, ``error`` and ``feature_0`` ...: the run's pooled
        backbone features (what its head classifies), averaged over ``tta``'s views; ``toolkit embed``'s rows."""
        if self.is_ensemble:
            from toolkit.core.errors import UserError

            raise UserError(f"{self.path} is an ensemble: its members' features are different spaces; embed with one "
                            "member run")
        return embed(images, model=self.path, tta=tta, batch_size=batch_size)

    def evaluate(self, data: str | Path, out: str | Path | None = None, *, tta: str = "none",
                 unknown: str = "off", batch_size: int = 32, overwrite: bool = False) -> dict[str, Any]:
        """Metrics on labelled ``data`` (accuracy with its 95 % interval, per-class results, confusion matrix,
        calibration); with ``out``, the evaluation folder ``toolkit evaluate`` writes."""
        return evaluate([self.path], data, out, tta=tta, unknown=unknown, batch_size=batch_size, overwrite=overwrite)

    def explain(self, images: Images, out: str | Path, *, class_name: str | None = None,
                overwrite: bool = False) -> list[Path]:
        """One class-activation map per image, overlaid on it, into the folder ``out``; returns the files."""
        return explain(self.path, images, out, class_name=class_name, overwrite=overwrite)

    def export(self, format: str, out: str | Path, *, image_size: int | None = None, data: str | Path | None = None,
               overwrite: bool = False) -> Path:
        """Write the model as ``savedmodel``, ``tflite``, ``tflite-fp16``, ``tflite-int8`` or ``onnx`` into the
        folder ``out``; returns the model file. Every format takes raw RGB and gives ``predict``'s probabilities."""
        return export(self.path, format, out, image_size=image_size, data=data, overwrite=overwrite)


def load(run: str | Path) -> Run:
    """Open a run or ensemble folder written by :func:`toolkit.finetune` (or ``toolkit finetune``)."""
    refuse_in_a_starting_worker("toolkit.load")
    from toolkit.core import runs
    from toolkit.core.errors import UserError

    folder = Path(run)
    if not (folder / runs.RECIPE_FILE).is_file() and not (folder / runs.ENSEMBLE_FILE).is_file():
        raise UserError(f"Not a run folder (no {runs.RECIPE_FILE} or {runs.ENSEMBLE_FILE}). Received: run={str(run)!r}; "
                        "pass a folder written by toolkit finetune")
    metrics = runs.read_json(folder / runs.METRICS_FILE, "The run did not finish: continue it with "
                             f"toolkit finetune --resume {folder}.")
    if not isinstance(metrics, dict):
        raise UserError(f"{folder / runs.METRICS_FILE} must hold a JSON object; train the run again")
    return Run(folder, metrics)
