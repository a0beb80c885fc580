"""A multi-label dataset from real photos for the tests: 2x2 grids of the sample's shape photos, each grid holding
1 to 4 of the 4 shapes, written as image files with a ``labels`` manifest (train and test rows from different
photos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_grid_manifest(sample: Path, out: Path, train: int, test: int, seed: int = 0, size: int = 128) -> Path:
    """``out/manifest.csv`` (path,labels,split) over ``train`` + ``test`` grid JPEGs in ``out``; returns the CSV."""
    from PIL import Image

    names = sorted(p.name for p in sample.iterdir() if p.is_dir())
    files = {n: sorted((sample / n).iterdir()) for n in names}
    rng = np.random.default_rng(seed)
    tile = size // 2
    out.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels,split"]
    for i in range(train + test):
        split = "train" if i < train else "test"
        held = rng.choice(len(names), size=rng.integers(1, 5), replace=False)
        cells = np.concatenate([held, rng.choice(held, size=4 - len(held))])
        rng.shuffle(cells)
        grid = np.zeros((size, size, 3), np.uint8)
        for position, c in enumerate(cells):
            y, x = divmod(position, 2)
            pool = files[names[c]]
            half = len(pool) // 2  # train grids from the first half of each class's photos, test from the second
            photo = pool[rng.integers(0, half)] if split == "train" else pool[rng.integers(half, len(pool))]
            with Image.open(photo) as image:
                grid[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = np.asarray(image.convert("RGB").resize((tile, tile)))
        name = f"grid{i:03d}.jpg"
        Image.fromarray(grid).save(out / name, quality=92)
        rows.append(f"{name},{';'.join(names[c] for c in sorted(held))},{split}")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out / "manifest.csv"
