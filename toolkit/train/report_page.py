"""report.html of a run (holdout or cross-validated) and of an ensemble folder: one self-contained page whose
numbers match the kind of run (a cross-validated run's come from the out-of-fold predictions of every image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.core import html_page as hp
from toolkit.core import runs
from toolkit.core.uncertainty import plural
from toolkit.predict.calibration import apply_temperature
from toolkit.predict.report_sections import (
    calibration_section,
    confusion_section,
    metrics_section,
    mistakes_section,
    problems_section,
)

OUT_OF_FOLD = "the out-of-fold predictions of every image"
VALIDATION = "the validation split"


def evaluated_images(splits, cross_validated: bool):
    """The images the run's metrics are measured on: every image (cross-validated), or the validation split."""
    return splits.train + splits.val if cross_validated else splits.val


def _data_section(splits, stats: dict, cv: dict | None) -> hp.Section:
    if cv:
        counts = (splits.train + splits.val).counts()
        words = (f"Source: {splits.source}. All {plural(cv['n_images'], 'image')} were cross-validated, "
                 f"{cv['folds']} folds x {cv['repeats']} repeats (folds.csv lists each image's folds); the saved "
                 f"model averages the {cv['heads']} fold heads.")
        body = hp.paragraph(words) + hp.table(["class", "images"], [[c, counts[c]] for c in splits.class_names])
    else:
        words = f"Source: {splits.source}; validation: {splits.val_source}."
        body = hp.paragraph(words) + hp.table(["class", "train", "validation"], [
            [c, stats["train_per_class"][c], stats["val_per_class"][c]] for c in splits.class_names])
    extra = f"Imbalance ratio (largest / smallest training class): {stats['imbalance_ratio']}."
    if "image_size" in stats:
        size = stats["image_size"]
        extra += (f" Image sizes (w x h): min {size['min'][0]}x{size['min'][1]}, median {size['median'][0]}x"
                  f"{size['median'][1]}, max {size['max'][0]}x{size['max'][1]}.")
    return hp.Section("data", "Data", body + hp.paragraph(extra, "note"))


def _calibration_words(metrics: dict, source: str) -> str:
    return (f"Temperature {metrics['temperature']:.3f}, fitted on {source}: expected calibration error "
            f"{metrics['ece_before']:.4f} before, {metrics['ece_after']:.4f} after. Predictions use the "
            "temperature-scaled probabilities.")


def run_page(run, stats: dict, training: Sequence[str], metrics: dict, measured: dict, probs: np.ndarray,
             labels: np.ndarray, curves: bytes | None) -> str:
    """The run's report.html: data, problems, training, accuracy, confusion, calibration, mistakes, audit."""
    splits, config = run.splits, run.config
    cv = metrics.get("cv")
    source = OUT_OF_FOLD if cv else VALIDATION
    images = evaluated_images(splits, bool(cv))
    body = hp.bullets(training) + (hp.figure(curves, "loss and accuracy per epoch") if curves else "")
    sections = [_data_section(splits, stats, cv), problems_section(splits.problems),
                hp.Section("training", "Training", body),
                metrics_section(measured, source, "Expected accuracy" if cv else "Validation accuracy"),
                confusion_section(measured, source),
                calibration_section(probs, labels, apply_temperature(probs, metrics["temperature"]), source,
                                    _calibration_words(metrics, source)),
                mistakes_section(images.paths, images.decode_paths, probs, labels, splits.class_names, source)]
    audit = _audit_section(run.dir, run.final_dir)
    if audit is not None:
        sections.append(audit)
    sections.append(hp.Section("timings", "Timings", hp.table(
        ["step", "seconds"], [[k.removesuffix("_s").replace("_", " "), float(v)] for k, v in metrics["timings"].items()])))
    subtitle = (f"{config.backbone} at {config.image_size} px, {plural(len(splits.class_names), 'class')}; "
                f"{'expected accuracy on new images' if cv else 'validation accuracy'} {measured['accuracy']:.4f} "
                f"(95% CI {measured['accuracy_ci95'][0]:.2f}–{measured['accuracy_ci95'][1]:.2f}, "
                f"{measured['n']} images)")
    return hp.page(f"Run report: {Path(run.final_dir).name}", subtitle, sections)


def _audit_section(folder: Path, final: Path) -> hp.Section | None:
    """A cross-validated run audits its data: its findings, when the run folder has them."""
    if not (folder / runs.AUDIT_FILE).is_file() or not (folder / runs.AUDIT_SUMMARY).is_file():
        return None
    import pandas as pd

    from toolkit.data.audit_report import audit_section

    findings = pd.read_csv(folder / runs.AUDIT_FILE, keep_default_na=False, dtype=str)
    findings["score"] = pd.to_numeric(findings["score"], errors="coerce").fillna(0.0)
    return audit_section(findings, runs.read_json(folder / runs.AUDIT_SUMMARY, ""), final)


def ensemble_page(folder: Path, metrics: dict[str, Any], measured: dict, probs: np.ndarray, labels: np.ndarray,
                  images, class_names: Sequence[str]) -> str:
    """An ensemble folder's report.html: its members, and the ensemble's accuracy on what it was measured on."""
    cv = metrics.get("cv")
    source = "the out-of-fold predictions of every image (each from the member that did not train on it)" if cv \
        else VALIDATION
    members = hp.table(["member", "its own validation accuracy"], [[k, float(v)] for k, v in metrics["members"].items()])
    temperature = metrics["calibration"]["temperature"]
    sections = [hp.Section("members", "Members", members),
                metrics_section(measured, source, "Expected accuracy" if cv else "Validation accuracy"),
                confusion_section(measured, source),
                calibration_section(probs, labels, apply_temperature(probs, temperature), source,
                                    f"Temperature {temperature:.3f}, fitted on {source}."),
                mistakes_section(images.paths, images.decode_paths, probs, labels, class_names, source)]
    subtitle = (f"{plural(len(metrics['members']), 'member')}; accuracy {measured['accuracy']:.4f} (95% CI "
                f"{measured['accuracy_ci95'][0]:.2f}–{measured['accuracy_ci95'][1]:.2f}, {measured['n']} images)")
    return hp.page(f"Ensemble report: {Path(folder).name}", subtitle, sections)
