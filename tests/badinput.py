"""Build a dataset full of the problems real photo folders have (the tests'
bad-input corpus). Every file is made here; nothing is downloaded or copied.

Returns what each problem file is expected to become: skipped (with a reason
fragment) or usable (with a note fragment, or "" for plain usable files).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(seed: int, size=(96, 72), colour=None) -> Image.Image:
    """A smooth random 'photo' (gradients + blobs), so JPEG encoding behaves like real data."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * rng.uniform(1, 6) + c) * 0.5 + 0.5 for c in range(3)], -1)
    if colour is not None:
        base = base * 0.3 + np.asarray(colour, dtype=float) / 255 * 0.7
    return Image.fromarray((base * 255).astype(np.uint8))


def photo_tree(root: Path, per_class: int, size=(96, 72), classes=("a", "b")) -> Path:
    """root/<class>/<i>.jpg: a small clean folder-per-class set of distinct photos."""
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(i + 50 * c, size=size).save(root / cls / f"{i}.jpg", quality=90)
    return root


def build_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """Create root/train/{red,blue}, root/test/{red,blue}; return {relative path: (status, fragment)}."""
    expected: dict[str, tuple[str, str]] = {}
    for split in ("train", "test"):
        for cls, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(8 if split == "train" else 3):
                photo(i + (100 if cls == "blue" else 0) + (50 if split == "test" else 0), colour=colour).save(d / f"{i}.jpg", quality=90)
    red = root / "train" / "red"

    def add(name: str, status: str, fragment: str, data: bytes | None = None, image: Image.Image | None = None, **save):
        path = red / name
        if data is not None:
            path.write_bytes(data)
        else:
            image.save(path, **save)
        expected[str(path.relative_to(root))] = (status, fragment)

    good = io.BytesIO()
    photo(7, colour=(220, 30, 30)).save(good, format="JPEG", quality=90)
    add("zero.jpg", "skipped", "empty file", b"")
    add("truncated.jpg", "skipped", "truncated", good.getvalue()[: len(good.getvalue()) // 2])
    add("random.jpg", "skipped", "not an image", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("page.jpg", "skipped", "HTML", b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
    add("notes.jpg", "skipped", "text file", b"just some notes about the photos\n" * 20)
    add("cmyk.jpg", "ok", "CMYK", image=photo(11, colour=(200, 40, 40)).convert("CMYK"), quality=90)
    sixteen = (np.asarray(photo(12).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    add("deep16.png", "ok", "", image=Image.fromarray(sixteen))
    add("alpha.png", "ok", "transparency", image=photo(13).convert("RGBA"))
    add("palette.png", "ok", "", image=photo(14).convert("P"))
    add("grey.jpg", "ok", "", image=photo(15).convert("L"), quality=90)
    frames = [photo(16), photo(17)]
    add("anim.gif", "ok", "first frame", image=frames[0], save_all=True, append_images=frames[1:])
    rotated = photo(18, size=(90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    add("rotated.jpg", "ok", "EXIF orientation 6", image=rotated, exif=exif.tobytes(), quality=90)
    add("tiny.jpg", "ok", "", image=photo(19, size=(12, 9)), quality=90)
    add("été photo 1.jpg", "ok", "", image=photo(20), quality=90)
    add("scan.tiff", "ok", "TIFF", image=photo(21))
    (red / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "green").mkdir()  # empty class folder
    # the same bytes in train and test: leakage
    leak = (root / "train" / "blue" / "0.jpg").read_bytes()
    (root / "test" / "blue" / "copy_of_train.jpg").write_bytes(leak)
    return expected


def huge_jpeg(path: Path, side: int = 8000) -> None:
    """A side x side JPEG (smooth, so it encodes quickly and small)."""
    row = np.linspace(0, 255, side, dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(row[None, :, None], (side, side, 3)).copy())
    image.save(path, quality=75)
