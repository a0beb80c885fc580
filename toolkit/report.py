"""Run reports: ``report.md`` and the training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit import runs
from toolkit.datasets import DatasetSplits


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


def plot_curves(frame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(1, len(frame) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in frame:
                ax.plot(x, frame[key], style, label=key)
        if "stage" in frame and (frame["stage"] == "finetune").any():
            ax.axvline((frame["stage"] == "head").sum() + 0.5, color="grey", lw=0.8)
        ax.set_xlabel("epoch (head, then fine-tune)")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    with runs.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
