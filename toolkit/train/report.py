"""What a finished run writes: ``model.keras``, the metrics, the history and its curves, ``report.md``, and
``report.html`` (one self-contained page, its figures embedded)."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import Any

import numpy as np

from toolkit.core import runs
from toolkit.core.uncertainty import describe
from toolkit.data.datasets import DatasetSplits
from toolkit.predict.calibration import apply_temperature
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


def report_markdown(splits: DatasetSplits, stats: dict, sections: dict[str, str] | None = None) -> str:
    """The run's report.md: data summary, problems found, and any further sections."""
    lines = ["# Run report", "", "## Data", "", f"Source: {splits.source}; validation: {splits.val_source}.", ""]
    lines += ["| class | train | val |", "|---|---:|---:|"]
    for name in splits.class_names:
        lines.append(f"| {markdown_cell(name)} | {stats['train_per_class'][name]} | {stats['val_per_class'][name]} |")
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
    cv = metrics.get("cv")
    if cv:
        low, high = cv["accuracy_ci95"]
        return (f"expected accuracy on new images: {cv['accuracy']:.4f} (95% CI {low:.2f}–{high:.2f}), "
                f"{cv['folds']}-fold cross-validation over {cv['n_images']} images (fold accuracies "
                f"{min(cv['fold_accuracy']):.2f}–{max(cv['fold_accuracy']):.2f})")
    return "validation accuracy: " + describe(metrics["val_accuracy"], metrics["n_val"], metrics["val_accuracy_ci95"])


def _training_lines(run: Run, plan, metrics: dict) -> list[str]:
    lines = [f"freeze plan: {plan.describe()}"]
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


def write_run_outputs(run: Run, model, stats: dict, plan, metrics: dict, measured: dict[str, Any], probs: np.ndarray,
                      labels: np.ndarray) -> None:
    """Everything a finished run leaves in its folder besides its checkpoints."""
    import keras
    import pandas as pd

    from toolkit.predict.figures import confusion_png, curves_png, reliability_png

    # The saved model is plain functional Keras (no training optimizer), loadable in safe mode.
    export = keras.Model(model.input, model.output, name="classifier")
    with runs.atomic_path(run.dir / runs.MODEL_FILE) as tmp:
        export.save(tmp)
    splits = run.splits
    runs.write_json(run.dir / runs.METRICS_FILE, metrics)
    runs.write_json(run.dir / runs.DATA_FILE, {"statistics": stats,
                                               "problems": [dataclasses.asdict(p) for p in splits.problems]})
    frame = pd.DataFrame([row for s in run.state.stages.values() for row in s.history])
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    runs.write_text(run.dir / runs.HISTORY_FILE, buffer.getvalue())
    figures = {}
    if len(frame):
        figures["curves"] = curves_png(frame)
        runs.write_bytes(run.dir / runs.CURVES_FILE, figures["curves"])
    training = _training_lines(run, plan, metrics)
    timings = "\n".join(f"- {k}: {v} s" for k, v in metrics["timings"].items())
    runs.write_text(run.dir / runs.REPORT_FILE, report_markdown(
        splits, stats, {"Training": "\n".join(f"- {line}" for line in training), "Timings": timings}))
    figures["confusion"] = confusion_png(np.asarray(measured["confusion_matrix"]), splits.class_names)
    figures["calibration"] = reliability_png(probs, labels, apply_temperature(probs, metrics["temperature"]))
    runs.write_text(run.dir / runs.REPORT_HTML_FILE, report_html(splits, stats, training, measured, figures))


_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}table{border-collapse:collapse;"
          "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}td.n{text-align:right}img{max-width:100%}"
          "code{font-size:90%}.skipped{color:#a00}.warning{color:#a60}")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if isinstance(c, (int, float)) else
                                    f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _figure(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def report_html(splits: DatasetSplits, stats: dict, training: list[str], measured: dict,
                figures: dict[str, bytes]) -> str:
    """report.html: one page that needs nothing else (every figure embedded as a data: URI)."""
    parts = [f"<h1>Run report</h1><h2>Data</h2><p>Source: {html.escape(splits.source)}; validation: "
             f"{html.escape(splits.val_source)}. Imbalance ratio (largest / smallest train class): "
             f"{stats['imbalance_ratio']}.</p>",
             _table(["class", "train", "val"], [[c, stats["train_per_class"][c], stats["val_per_class"][c]]
                                                for c in splits.class_names])]
    parts.append("<h2>Problems found</h2>")
    if splits.problems:
        parts.append("<table><tr><th>severity</th><th>file</th><th>reason</th></tr>" + "".join(
            f'<tr class="{html.escape(p.severity)}"><td>{html.escape(p.severity)}</td><td><code>{html.escape(p.path)}'
            f"</code></td><td>{html.escape(p.reason)}</td></tr>" for p in splits.problems) + "</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Training</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in training) + "</ul>")
    if "curves" in figures:
        parts.append(_figure(figures["curves"], "loss and accuracy per epoch"))
    parts.append(f"<h2>Validation metrics</h2><p>Accuracy "
                 f"{html.escape(describe(measured['accuracy'], measured['n'], measured['accuracy_ci95']))}; "
                 f"macro F1 {measured['macro_f1']:.4f}.</p>")
    parts.append(_table(["class", "precision", "recall", "F1", "images"], [
        [name, round(v["precision"], 4), round(v["recall"], 4), round(v["f1"], 4), v["support"]]
        for name, v in measured["per_class"].items()]))
    parts.append("<h2>Confusion matrix</h2>" + _figure(figures["confusion"], "confusion matrix"))
    parts.append("<h2>Calibration</h2>" + _figure(figures["calibration"], "reliability diagram"))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Run report</title><style>{_STYLE}</style>'
            f"</head><body>{''.join(parts)}</body></html>\n")
