"""Self-contained HTML report pages: every figure and thumbnail embedded as a ``data:`` URI, so one file can be
mailed or opened anywhere. Pure string building; the callers decide what the sections hold.

Each section is ``<section id="...">`` with its ``<h2>``; a list of contents links them. A small script marks
each picture ``data-state="loaded"`` or ``"broken"`` once the page has loaded, and a broken one shows its
alternative text in red (a browser test reads those marks).
"""

from __future__ import annotations

import base64
import dataclasses
import html
from typing import Any, Sequence

STYLE = """
body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}.subtitle{color:#555;margin-top:0}nav{margin:1em 0;color:#555}nav a{margin-right:1em}
section{margin:2em 0}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
code{font-size:90%}.note{color:#555}.error{color:#a00}.warning{color:#a60}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:172px;font-size:80%}
.gallery img{display:block;max-width:160px;max-height:160px;margin-bottom:.2em}
.gallery figcaption{overflow-wrap:anywhere}img[data-state=broken]{color:#a00;border:1px dashed #a00}
""".strip().replace("\n", "")

_MARK_PICTURES = ("<script>window.addEventListener('load',function(){for(const i of document.images)"
                  "{i.dataset.state=(i.complete&&i.naturalWidth>0)?'loaded':'broken';}});</script>")


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of a page: ``key`` is its id (the tests look for it), ``body`` its HTML."""

    key: str
    title: str
    body: str


@dataclasses.dataclass(frozen=True)
class Thumb:
    """One gallery picture: JPEG bytes (None: the file could not be read) and its caption lines."""

    jpeg: bytes | None
    lines: Sequence[str]


def escape(value: Any) -> str:
    return html.escape(str(value))


def paragraph(text: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<p{cls}>{escape(text)}</p>"


def bullets(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>"


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"<td>{escape(value)}</td>"
    shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
    return f'<td class="n">{shown}</td>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """A table; numbers right-aligned (floats with 4 decimals), text escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{escape(row_classes[i])}"' if row_classes else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c) for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def figure(png: bytes, alt: str) -> str:
    return f'<figure><img alt="{escape(alt)}" src="{data_uri(png, "image/png")}"></figure>'


def gallery(thumbs: Sequence[Thumb], empty: str) -> str:
    """Thumbnails with captions; ``empty`` is said when there are none."""
    if not thumbs:
        return paragraph(empty, "note")
    items = []
    for t in thumbs:
        caption = "<br>".join(escape(line) for line in t.lines)
        picture = (f'<img alt="{escape(t.lines[0] if t.lines else "image")}" src="{data_uri(t.jpeg, "image/jpeg")}">'
                   if t.jpeg is not None else '<p class="error">unreadable</p>')
        items.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return f'<div class="gallery">{"".join(items)}</div>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole page: title, a one-line summary, contents, then the sections in order."""
    contents = "".join(f'<a href="#{escape(s.key)}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{escape(s.key)}"><h2>{escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{escape(title)}</h1><p class="subtitle">{escape(subtitle)}</p><nav>{contents}</nav>{body}'
            f"{_MARK_PICTURES}</body></html>\n")
