"""How an audit is shown: ``audit.png`` (the top findings as a picture) and the audit section of a report page
(the audit's own ``report.html``, and a cross-validated run's)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from toolkit.core import html_page as hp
from toolkit.core.pictures import png_bytes, pyplot, short_name, thumbnail, thumbnail_jpeg
from toolkit.core.uncertainty import plural

GALLERY_SIZE = 24
CAPTION_WIDTH = 32  # characters per caption line in audit.png: a column is 2.5 in wide, the text 7 pt
ISSUE_WORDS = {"label": "label issue", "near_duplicate": "near-duplicate", "outlier": "outlier"}


def finding_caption(row) -> list[str]:
    """The lines under a finding's picture: the kind, the file, what is suspected, the score."""
    if row.issue == "near_duplicate":
        what = f"copy of {short_name(row.duplicate_of, 24)}"
    elif row.issue == "label":
        what = f"labelled {row.given_label}, looks like {row.suggested_label}"
    else:
        what = f"labelled {row.given_label}; {row.note}"
    return [ISSUE_WORDS.get(row.issue, row.issue), short_name(row.path), what, f"score {row.score:.2f}"]


def gallery_png(findings, most: int = GALLERY_SIZE) -> bytes:
    """The top findings as one picture (:func:`gallery_figure`), PNG bytes."""
    return png_bytes(gallery_figure(findings, most), dpi=80)


def gallery_figure(findings, most: int = GALLERY_SIZE):
    """The top findings as one matplotlib figure: thumbnail and caption each, as many columns as there are findings
    (up to 6), so a short audit leaves no blank canvas; captions wrapped to their column."""
    plt = pyplot()
    top = findings.head(most)
    cols = min(6, max(1, len(top)))
    rows = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.5, rows * 3.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not len(top):
        axes[0, 0].text(0.5, 0.5, "no findings", ha="center", va="center", fontsize=12)
    for ax, row in zip(axes.ravel(), top.itertuples()):
        pixels = thumbnail(row.path)
        if pixels is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        else:
            ax.imshow(pixels)
        ax.set_title("\n".join(textwrap.fill(line, CAPTION_WIDTH) for line in finding_caption(row)), fontsize=7)
    return fig


def audit_section(findings, summary: dict, where: str | Path, most: int = GALLERY_SIZE) -> hp.Section:
    """The counts, the top findings with their pictures, and where the whole list is (``where``/audit.csv)."""
    counts = summary["findings"]
    words = (f"{plural(summary['images'], 'image')} audited with {', '.join(summary['backbones'])}: "
             f"{plural(counts['label'], 'label issue')}, {plural(counts['near_duplicate'], 'near-duplicate pair')} "
             f"({summary['near_duplicates_across_splits']} across splits), {plural(counts['outlier'], 'outlier')}. "
             f"Every finding, most suspicious first, is in {Path(where) / 'audit.csv'}; audit-manifest.csv holds "
             "the labels with the suggestions applied.")
    top = findings.head(most)
    thumbs = [hp.Thumb(thumbnail_jpeg(row.path), finding_caption(row) + [str(row.path)]) for row in top.itertuples()]
    table = hp.table(["issue", "file", "given label", "suggested label", "score", "note"], [
        [ISSUE_WORDS.get(r.issue, r.issue), r.path, r.given_label, _text(r.suggested_label), float(r.score),
         _text(r.note) or _text(r.duplicate_of)] for r in top.itertuples()]) if len(top) else ""
    return hp.Section("audit", "Data audit", hp.paragraph(words) + hp.gallery(thumbs, "Nothing suspicious found.")
                      + table)


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def audit_page(findings, summary: dict, where: str | Path, problems=()) -> str:
    """The audit's own report.html."""
    from toolkit.core.html_page import page

    sections = [audit_section(findings, summary, where)]
    if problems:
        sections.append(hp.Section("problems", "Files not audited", hp.table(
            ["severity", "file", "reason"], [[p.severity, p.path, p.reason] for p in problems])))
    return page("Data audit", f"{plural(summary['images'], 'image')}; probes: {', '.join(summary['backbones'])}",
                sections)
