"""``toolkit evaluate`` of a multi-label run on a ``labels`` manifest: macro and micro mAP (the macro one with its
interval), per-label precision/recall/F1 at the run's thresholds, exact match and Jaccard; ``per_label.csv``,
``predictions.csv`` (true and predicted labels, every label's probability) and ``report.html`` (each label's results
and the images with wrong labels).

The evaluated rows are the manifest's test rows if it has any, else its validation rows, else every row.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

from toolkit.core import html_page as hp
from toolkit.core import outputs, runs
from toolkit.core.errors import UserError
from toolkit.core.uncertainty import plural

logger = logging.getLogger(__name__)

SPLIT_WORDS = {"test": "its test rows", "validation": "its validation rows", "all": "all of its rows"}


def evaluation_rows(data: str, class_names: Sequence[str]):
    """(the split to evaluate, which one, the manifest's problems), read against the run's classes."""
    from toolkit.data.multilabel import load_multilabel
    from toolkit.data.multilabel import is_multilabel

    if not is_multilabel(data):
        raise UserError(f"--data {data}: a multi-label run is evaluated on a CSV manifest with a `labels` column "
                        "(class names joined by ';'); pass one")
    manifest = load_multilabel(data, class_names=class_names)
    splits = manifest.splits
    if "test" in splits:
        return splits["test"], "test", manifest.problems
    if "val" in splits:
        return splits["val"], "validation", manifest.problems
    return splits["train"], "all", manifest.problems


def evaluate(member, data: str, out: str | Path, tta: str, overwrite: bool, batch_size: int, verbose: int,
             inputs: dict) -> dict[str, Any]:
    """Evaluate one multi-label ``member`` (:class:`toolkit.predict.members.Member`) on ``data`` into ``out``."""
    import pandas as pd

    from toolkit.predict.inference import member_views, predict_member
    from toolkit.predict.multilabel_metrics import evaluate_multilabel
    from toolkit.predict.multilabel_report import csv_text, labels_section, mistakes_section, predictions_table
    from toolkit.predict.report_sections import problems_section

    member_views(member, tta)  # a crop is refused before any image is read
    split, which, problems = evaluation_rows(data, member.class_names)
    progress = None
    if verbose:
        from keras.utils import Progbar

        progress = Progbar(len(split), unit_name="image").add
    probs = predict_member(member, split.decode_paths, split.is_jpeg, tta, batch_size, progress)
    thresholds = member.labels.thresholds
    measured = evaluate_multilabel(split.targets, probs, thresholds, member.class_names)
    skipped = [p for p in problems if p.severity == "skipped"]
    metrics = {"multi_label": True, **measured.as_dict(), "split": which, "tta": tta, "models": [str(member.path)],
               "class_names": list(member.class_names),
               "skipped_files": [dataclasses.asdict(p) for p in skipped]}
    source = f"{data} ({SPLIT_WORDS[which]})"
    per_label = pd.DataFrame([dataclasses.asdict(r) for r in measured.labels])
    page = hp.page("Evaluation report", f"{member.path} on {source}, {plural(len(split), 'image')}, "
                   f"{'no test-time augmentation' if tta == 'none' else f'test-time augmentation {tta}'}", [
                       labels_section(measured, source, f"as chosen by the run ({runs.THRESHOLDS_FILE})"),
                       mistakes_section(split.paths, split.decode_paths, probs, split.targets, thresholds,
                                        member.class_names, source),
                       problems_section(list(problems))])
    with outputs.output_dir(out, overwrite, "evaluation", inputs) as stage:
        runs.write_json(stage / runs.METRICS_FILE, metrics)
        runs.write_text(stage / "per_label.csv", csv_text(per_label))
        runs.write_text(stage / "predictions.csv", csv_text(predictions_table(split.paths, probs, thresholds,
                                                                             member.class_names, split.targets)))
        runs.write_text(stage / runs.REPORT_HTML_FILE, page)
    logger.info("evaluate: %s (%s; %s); written to %s", measured.describe(), which,
                "no TTA" if tta == "none" else f"TTA {tta}", out)
    return metrics
