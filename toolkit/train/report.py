"""What a finished run writes: ``model.keras``, the metrics, the history and its curves, ``report.md``, and
``report.html`` (one self-contained page, its figures embedded: :mod:`toolkit.train.report_page`)."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from toolkit.core import runs
from toolkit.core.uncertainty import describe
from toolkit.data.datasets import DatasetSplits
from toolkit.train.run_state import Run, Stage


def markdown_cell(text: str, code: bool = False) -> str:
    """``text`` safe inside one Markdown table cell: ``|`` escaped, line breaks shown as ``\\n``.

    File names can hold both, and either would otherwise break the table's row.
    """
    text = str(text)
    if not code:  # in a code span a backslash shows as it is; elsewhere it would escape what follows
        text = text.replace("\\", "\\\\")
    text = text.replace("|", "\\|").replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")
    if not code:
        return text
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def report_markdown(splits: DatasetSplits, stats: dict, sections: dict[str, str] | None = None,
                    cv: dict | None = None) -> str:
    """The run's report.md: data summary, problems found, and any further sections; ``cv`` is a cross-validated
    run's ``metrics.json`` block (every image was cross-validated: no train/validation table)."""
    if cv:
        counts = (splits.train + splits.val).counts()
        lines = ["# Run report", "", "## Data", "", f"Source: {splits.source}. All {cv['n_images']} images were "
                 f"cross-validated, {cv['folds']} folds x {cv['repeats']} repeats (folds.csv).", ""]
        lines += ["| class | images |", "|---|---:|"] + [f"| {markdown_cell(n)} | {counts[n]} |" for n in splits.class_names]
    else:
        lines = ["# Run report", "", "## Data", "", f"Source: {splits.source}; validation: {splits.val_source}.", ""]
        lines += ["| class | train | val |", "|---|---:|---:|"]
        lines += [f"| {markdown_cell(n)} | {stats['train_per_class'][n]} | {stats['val_per_class'][n]} |"
                  for n in splits.class_names]
    lines += ["", f"Imbalance ratio (largest / smallest train class): {stats['imbalance_ratio']}."]
    if "image_size" in stats:
        size = stats["image_size"]
        lines.append(f"Image sizes (w x h): min {size['min'][0]}x{size['min'][1]}, median {size['median'][0]}x"
                     f"{size['median'][1]}, max {size['max'][0]}x{size['max'][1]}.")
    lines += ["", "## Problems found", ""]
    if splits.problems:
        lines += ["| severity | file | reason |", "|---|---|---|"]
        lines += [f"| {p.severity} | {markdown_cell(p.path, code=True)} | {markdown_cell(p.reason)} |"
                  for p in splits.problems]
    else:
        lines.append("None.")
    for title, body in (sections or {}).items():
        lines += ["", f"## {title}", "", body]
    return "\n".join(lines) + "\n"


def run_metrics(measured: dict[str, Any], run: Run) -> dict[str, Any]:
    """metrics.json from the validation split's :func:`toolkit.predict.evaluate.classification_metrics`: accuracy
    with its interval, loss (cross-entropy without smoothing), per-class accuracy, each stage's best epoch."""
    out = {
        "val_accuracy": measured["accuracy"],
        "val_accuracy_ci95": measured["accuracy_ci95"],
        "val_loss": measured["nll"],
        "n_val": measured["n"],
        "per_class_accuracy": {name: (v["recall"] if v["support"] else None) for name, v in measured["per_class"].items()},
        "class_names": measured["class_names"],
    }
    for stage, s in run.state.stages.items():
        if s.history:
            row = next((h for h in s.history if h["epoch"] == s.best_epoch), s.history[-1])
            out[f"{stage.value}_best_epoch"] = s.best_epoch
            out[f"{stage.value}_val_accuracy"] = row.get("val_accuracy")
    return out


def accuracy_line(metrics: dict[str, Any]) -> str:
    """The run's accuracy for people, with its uncertainty: out-of-fold for a cross-validated run."""
    if metrics.get("multi_label"):
        from toolkit.predict.multilabel_report import estimate_line

        return estimate_line(metrics)
    cv = metrics.get("cv")
    if cv:
        low, high = cv["accuracy_ci95"]
        scored = cv.get("estimate_heads", cv["repeats"])
        what = (f"each scored by {scored} heads that never saw it, as the model averages {cv['heads']}"
                if scored == cv["heads"] else "each scored by the member that never saw it")
        return (f"expected accuracy on new images: {cv['accuracy']:.4f} (95% CI {low:.2f}–{high:.2f}), "
                f"{cv['folds']}-fold cross-validation over {cv['n_images']} images ({what}; fold accuracies "
                f"{min(cv['fold_accuracy']):.2f}–{max(cv['fold_accuracy']):.2f})")
    return "validation accuracy: " + describe(metrics["val_accuracy"], metrics["n_val"], metrics["val_accuracy_ci95"])


def freeze_line(plan, metrics: dict) -> str:
    """The freeze plan as the run's summary prints it; in a cross-validated run, how its count relates to the
    estimate's (the plan counted the training split; the folds then pooled every labelled image)."""
    line = f"freeze plan: {plan.describe()}"
    cv = metrics.get("cv")
    if cv and plan.mode == "auto":
        each = round(cv["n_images"] * (cv["folds"] - 1) / cv["folds"])
        line += (f" (counted on the training split; cross-validation then pooled all {cv['n_images']} labelled "
                 f"images, each head training on about {each})")
    return line


def _training_lines(run: Run, plan, metrics: dict) -> list[str]:
    lines = [freeze_line(plan, metrics)]
    for stage, s in run.state.stages.items():
        lines.append(f"{stage.value}: {s.epochs_done} epochs, best epoch {s.best_epoch} (val loss {s.best_loss:.4f}, "
                     f"val accuracy {metrics.get(stage.value + '_val_accuracy') or 0:.4f})")
    if Stage.FINETUNE in run.state.stages:
        lines.append("kept: the fine-tuned classifier (stage 2 lowered the validation loss)"
                     if metrics["kept_stage"] == Stage.FINETUNE.value
                     else "kept: the stage-1 classifier (stage 2 did not lower the validation loss)")
    lines.append(accuracy_line(metrics))
    on = "the out-of-fold probabilities of all images" if metrics.get("cv") else "the validation split"
    lines.append(f"calibration: temperature {metrics['temperature']:.3f} fitted on {on}; "
                 f"ECE {metrics['ece_before']:.4f} before, {metrics['ece_after']:.4f} after")
    return lines


def save_model(run: Run, model) -> None:
    """``model.keras``: plain functional Keras (no training optimizer), loadable in safe mode."""
    import keras

    export = keras.Model(model.input, model.output, name="classifier")
    with runs.atomic_path(run.dir / runs.MODEL_FILE) as tmp:
        export.save(tmp)


def write_history(run: Run) -> bytes | None:
    """``history.csv`` of every stage's epochs and, when there is one, ``curves.png`` (returned)."""
    import pandas as pd

    from toolkit.predict.figures import curves_png

    frame = pd.DataFrame([row for s in run.state.stages.values() for row in s.history])
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    runs.write_text(run.dir / runs.HISTORY_FILE, buffer.getvalue())
    if not len(frame):
        return None
    curves = curves_png(frame)
    runs.write_bytes(run.dir / runs.CURVES_FILE, curves)
    return curves


def write_run_outputs(run: Run, model, stats: dict, plan, metrics: dict, measured: dict[str, Any], probs: np.ndarray,
                      labels: np.ndarray) -> None:
    """Everything a finished run leaves in its folder besides its checkpoints."""
    from toolkit.train.report_page import run_page

    save_model(run, model)
    splits = run.splits
    runs.write_json(run.dir / runs.METRICS_FILE, metrics)
    runs.write_json(run.dir / runs.DATA_FILE, {"statistics": stats,
                                               "problems": [dataclasses.asdict(p) for p in splits.problems]})
    curves = write_history(run)
    training = _training_lines(run, plan, metrics)
    timings = "\n".join(f"- {k}: {v} s" for k, v in metrics["timings"].items())
    runs.write_text(run.dir / runs.REPORT_FILE, report_markdown(
        splits, stats, {"Training": "\n".join(f"- {line}" for line in training), "Timings": timings}, metrics.get("cv")))
    runs.write_text(run.dir / runs.REPORT_HTML_FILE, run_page(run, stats, training, metrics, measured, probs, labels,
                                                               curves))
