"""``toolkit evaluate``: accuracy, per-class precision/recall/F1, confusion matrix, calibration
error and a gallery of the most confident mistakes, for one model or an ensemble.

The evaluated split is DATA's ``test/`` folder if it has one, else its
validation folder, else every image of a folder-per-class tree or CSV.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.core import outputs, runs
from toolkit.core.uncertainty import accuracy_interval
from toolkit.predict.calibration import expected_calibration_error, nll

logger = logging.getLogger(__name__)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Pure: accuracy with its 95 % interval, top-5 (5+ classes), per-class precision/recall/F1, confusion
    matrix, ECE, NLL."""
    n_classes = len(class_names)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        tp = confusion[i, i]
        support = int(confusion[i].sum())
        predicted_i = int(confusion[:, i].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": support}
    out = {
        "accuracy": float((predicted == labels).mean()),
        "accuracy_ci95": list(accuracy_interval(int((predicted == labels).sum()), len(labels))),
        "n": int(len(labels)),
        "class_names": list(class_names),
        "per_class": per_class,
        "macro_f1": float(np.mean([v["f1"] for v in per_class.values()])),
        "confusion_matrix": confusion.tolist(),
        "ece": expected_calibration_error(probs, labels),
        "nll": nll(probs, labels),
    }
    if n_classes >= 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    return out


def evaluation_split(data: str | Path):
    """The split to evaluate (see module docstring), verified, with its problems."""
    from toolkit.data.datasets import DatasetError, load_splits

    splits = load_splits(data, val_fraction=0.5, min_classes=1)  # the fraction only matters for a tree without splits
    if splits.test is not None and len(splits.test):
        return splits.test, splits, "test"
    if splits.val_is_given:
        return splits.val, splits, "validation"
    merged = splits.train + splits.val
    if not len(merged):
        raise DatasetError(f"{data}: nothing to evaluate")
    return merged, splits, "all"


def evaluate(models: Sequence[str], data: str, out: str | Path, tta: str = "none", weights=None,
             overwrite: bool = False, batch_size: int = 32, verbose: int = 1, unknown: str = "off") -> dict[str, Any]:
    from toolkit.core.errors import UserError
    from toolkit.predict.figures import mistakes_png
    from toolkit.predict.members import load_models
    from toolkit.predict.unknown import member_scorer, parse_unknown, predict_scored

    fraction = parse_unknown(unknown)
    inputs = {"--model": list(models), "--data": [data]}
    outputs.check_output_dir(out, overwrite, "evaluation", inputs)  # before the work: a refusal costs nothing
    members = load_models(models, weights)
    checked = member_scorer(members) if fraction is not None else None  # refused before any image is read
    if members[0].multi_label:
        from toolkit.predict import evaluate_multilabel

        return evaluate_multilabel.evaluate(members[0], data, out, tta, overwrite, batch_size, verbose, inputs)
    class_names = members[0].class_names
    split, splits, which = evaluation_split(data)
    index = {n: i for i, n in enumerate(class_names)}
    unknown = sorted(set(split.class_names) - set(index))
    if unknown:
        raise UserError(f"--data {data}: classes {unknown} are not among the model's classes {list(class_names)}")
    labels = np.asarray([index[split.class_names[y]] for y in split.labels])
    progress = None
    if verbose:
        from keras.utils import Progbar

        bar = Progbar(len(split) * len(members), unit_name="image")
        progress = bar.add
    probs, scored = predict_scored(members, checked, split.decode_paths, split.is_jpeg, tta, batch_size, progress,
                                   fraction)
    metrics = classification_metrics(probs, labels, class_names)
    if scored is not None:
        scores, threshold = scored
        accepted = scores <= threshold
        correct = int((probs.argmax(1)[accepted] == labels[accepted]).sum())
        metrics["unknown"] = {
            "target_rejection": fraction, "threshold": threshold, "rejected": float(1 - accepted.mean()),
            "n_rejected": int((~accepted).sum()), "n_accepted": int(accepted.sum()),
            "accepted_accuracy": correct / max(int(accepted.sum()), 1),
            "accepted_accuracy_ci95": list(accuracy_interval(correct, int(accepted.sum()))),
        }
    metrics.update({"split": which, "tta": tta, "models": [str(m.path) for m in members],
                    "skipped_files": [dataclasses.asdict(p) for p in splits.skipped()]})
    with outputs.output_dir(out, overwrite, "evaluation", inputs) as stage:
        runs.write_json(stage / runs.METRICS_FILE, metrics)
        _write_confusion(stage, np.asarray(metrics["confusion_matrix"]), class_names)
        _write_predictions(stage, split.paths, probs, labels, class_names)
        runs.write_bytes(stage / "mistakes.png", mistakes_png(split.decode_paths, probs, labels, class_names,
                                                             shown_paths=split.paths))
        runs.write_text(stage / runs.REPORT_HTML_FILE, evaluation_page(metrics, split, probs, labels, data,
                                                                       splits.skipped()))
    logger.info("evaluate: accuracy %.4f on %d images (%s; %s); written to %s", metrics["accuracy"], metrics["n"],
                which, "no TTA" if tta == "none" else f"TTA {tta}", out)
    return metrics


def _write_confusion(out: Path, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    import pandas as pd

    from toolkit.predict.figures import confusion_png

    frame = pd.DataFrame(confusion, index=[f"true_{c}" for c in class_names], columns=[f"pred_{c}" for c in class_names])
    buffer = io.StringIO()
    frame.to_csv(buffer)
    runs.write_text(out / "confusion_matrix.csv", buffer.getvalue())
    runs.write_bytes(out / "confusion_matrix.png", confusion_png(confusion, class_names))


def _write_predictions(out: Path, paths, probs: np.ndarray, labels: np.ndarray, class_names) -> None:
    import pandas as pd

    frame = pd.DataFrame({
        "path": list(paths),
        "true": [class_names[i] for i in labels],
        "predicted": [class_names[i] for i in probs.argmax(1)],
        "probability": probs.max(1),
    })
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    runs.write_text(out / "predictions.csv", buffer.getvalue())


SPLIT_WORDS = {"test": "its test/ split", "validation": "its validation split", "all": "all of its images"}


def evaluation_page(metrics: dict[str, Any], split, probs: np.ndarray, labels: np.ndarray, data: str,
                    skipped: Sequence) -> str:
    """The evaluation's report.html: accuracy per class, unknown answers, confusion, calibration, mistakes."""
    from toolkit.core import html_page as hp
    from toolkit.core.uncertainty import plural
    from toolkit.predict import report_sections as rs

    source = f"{data} ({SPLIT_WORDS[metrics['split']]})"
    tta = "no test-time augmentation" if metrics["tta"] == "none" else f"test-time augmentation {metrics['tta']}"
    models = ", ".join(metrics["models"])
    sections = [rs.metrics_section(metrics, source)]
    if "unknown" in metrics:
        u = metrics["unknown"]
        sections.append(hp.Section("unknown", "Unknown answers", hp.paragraph(
            f"{plural(u['n_rejected'], 'image')} of {metrics['n']} ({u['rejected']:.1%}) answered unknown (the "
            f"threshold rejects {u['target_rejection']:.0%} of held-out known-class images); accuracy on the "
            f"{u['n_accepted']} accepted: {u['accepted_accuracy']:.4f} (95% CI {u['accepted_accuracy_ci95'][0]:.2f}–"
            f"{u['accepted_accuracy_ci95'][1]:.2f}).")))
    sections += [rs.confusion_section(metrics, source),
                 rs.calibration_section(probs, labels, None, source, f"Expected calibration error {metrics['ece']:.4f}"
                                        " of the probabilities predict gives (the run's temperature applied)."),
                 rs.mistakes_section(split.paths, split.decode_paths, probs, labels, metrics["class_names"], source),
                 rs.problems_section(skipped)]
    return hp.page("Evaluation report", f"{models} on {source}, {plural(metrics['n'], 'image')}, {tta}", sections)
