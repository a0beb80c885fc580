"""What a finished multi-label run writes besides its thresholds and calibration: ``model.keras``, ``metrics.json``,
``data.json``, ``out-of-fold.csv`` (each labelled image's out-of-fold probabilities, true and predicted labels), the
history and its curves, ``report.md`` and ``report.html`` (the estimate, each label's results,
the images with wrong labels out of fold, the data and its problems)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from toolkit.core import html_page as hp
from toolkit.core import runs
from toolkit.core.uncertainty import plural
from toolkit.data.multilabel import co_occurrence
from toolkit.predict.multilabel_metrics import MultiLabelMetrics
from toolkit.predict.multilabel_report import (
    csv_text,
    estimate_line,
    labels_section,
    mistakes_section,
    predictions_table,
)
from toolkit.predict.report_sections import problems_section
from toolkit.train.report import markdown_cell, save_model, write_history

OUT_OF_FOLD = "the out-of-fold predictions of every labelled image"


def statistics(pooled) -> dict[str, Any]:
    """data.json's statistics: images, images per label, images with no label, labels per image, co-occurrence."""
    targets = pooled.targets
    return {
        "images": len(pooled),
        "per_label": pooled.counts(),
        "unlabelled": pooled.unlabelled(),
        "labels_per_image": float(targets.sum(axis=1).mean()) if len(targets) else 0.0,
        "co_occurrence": co_occurrence(targets).tolist(),
    }


def training_lines(run, plan, metrics: dict[str, Any]) -> list[str]:
    progress = run.state.stage(metrics_stage(metrics))
    calibration = metrics["calibration"]
    return [
        f"freeze plan: {plan.describe()}",
        f"views: {metrics['views']}",
        f"fold heads: {metrics['folds']} folds x {metrics['repeats']} repeats, {progress.epochs_done} epochs, best "
        f"epochs {min(progress.fold_best_epoch)}–{max(progress.fold_best_epoch)}; each head's macro mAP on its own fold "
        f"{min(metrics['fold_macro_ap']):.2f}–{max(metrics['fold_macro_ap']):.2f}",
        estimate_line(metrics),
        f"calibration: one temperature per label ({min(calibration['temperatures'].values()):.2f}–"
        f"{max(calibration['temperatures'].values()):.2f}); expected calibration error over every (image, label) "
        f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after",
        f"thresholds: {metrics['thresholds_rule']} (thresholds.json)",
    ]


def metrics_stage(metrics: dict[str, Any]):
    from toolkit.train.run_state import Stage

    return Stage(metrics["kept_stage"])


def write_outputs(run, model, plan, metrics: dict[str, Any], measured: MultiLabelMetrics, probs: np.ndarray,
                  thresholds: np.ndarray) -> None:
    checked = run.splits
    pooled = checked.pooled
    save_model(run, model)
    stats = statistics(pooled)
    runs.write_json(run.dir / runs.METRICS_FILE, metrics)
    runs.write_json(run.dir / runs.DATA_FILE, {"statistics": stats,
                                               "problems": [dataclasses.asdict(p) for p in checked.data.problems]})
    runs.write_text(run.dir / runs.OOF_FILE, csv_text(predictions_table(pooled.paths, probs, thresholds,
                                                                         checked.class_names, pooled.targets)))
    curves = write_history(run)
    training = training_lines(run, plan, metrics)
    label_rows = "\n".join(f"| {markdown_cell(r.name)} | {r.support} | {r.average_precision:.3f} | {r.threshold:.3f} | "
                           f"{r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |" for r in measured.labels)
    timings = "\n".join(f"- {k}: {v} s" for k, v in metrics["timings"].items())
    markdown = "\n".join([
        "# Multi-label run", "", f"Data: {checked.data.source}; {plural(len(pooled), 'labelled image')}, "
        f"{len(checked.class_names)} labels, {stats['labels_per_image']:.2f} per image, {stats['unlabelled']} with none.",
        "", "## Training", "", *[f"- {line}" for line in training], "", "## Labels (out of fold)", "",
        "| label | images | average precision | threshold | precision | recall | F1 |", "|---|---|---|---|---|---|---|",
        label_rows, "", "## Timings", "", timings, ""])
    runs.write_text(run.dir / runs.REPORT_FILE, markdown)
    source = OUT_OF_FOLD
    sections = [labels_section(measured, source, "chosen for its best F1 on these out-of-fold probabilities"),
                hp.Section("training", "Training", hp.bullets(training)
                           + (hp.figure(curves, "training curves") if curves else "")),
                _data_section(checked, stats),
                mistakes_section(pooled.paths, pooled.decode_paths, probs, pooled.targets, thresholds,
                                 checked.class_names, source),
                problems_section(list(checked.data.problems))]
    page = hp.page("Multi-label run", f"{run.config.backbone}, {plural(len(pooled), 'image')}, "
                   f"{len(checked.class_names)} labels: {measured.describe()}", sections)
    runs.write_text(run.dir / runs.REPORT_HTML_FILE, page)


def _data_section(checked, stats: dict[str, Any]) -> hp.Section:
    names = checked.class_names
    counts = stats["per_label"]
    both = np.asarray(stats["co_occurrence"])
    words = (f"Source: {checked.data.source}. {plural(stats['images'], 'image')} (training and validation rows pooled; "
             f"test rows are left for toolkit evaluate), {stats['labels_per_image']:.2f} labels per image, "
             f"{stats['unlabelled']} with none. folds.csv lists each image's folds.")
    rows = [[name, counts[name]] + [int(both[i, j]) for j in range(len(names))] for i, name in enumerate(names)]
    return hp.Section("data", "Data", hp.paragraph(words) + hp.table(
        ["label", "images", *[f"with {n}" for n in names]], rows))
