"""Helpers every figure shares: a headless pyplot, PNG bytes, thumbnails, and names short enough for a caption.

Matplotlib and Pillow are imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

THUMBNAIL = 160  # pixels, the longer side of a gallery picture


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes; the figure is closed. ``bbox_inches="tight"`` keeps every title inside."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)
    return buffer.getvalue()


def thumbnail(path: str | Path, size: int = THUMBNAIL) -> np.ndarray | None:
    """An RGB uint8 thumbnail (longer side ``size``), or None when the file cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return np.asarray(image)
    except (OSError, ValueError):
        return None


def thumbnail_jpeg(path: str | Path, size: int = THUMBNAIL) -> bytes | None:
    """The thumbnail as JPEG bytes (for a report page), or None when the file cannot be read."""
    from PIL import Image

    pixels = thumbnail(path, size)
    if pixels is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def short_name(path: str | Path, width: int = 28) -> str:
    """The file name, shortened in the middle to ``width`` characters (the start and the extension stay)."""
    name = Path(str(path)).name
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 3] + "…" + name[len(name) - keep // 3:]
