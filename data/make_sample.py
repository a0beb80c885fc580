"""Generate ``data/sample/``: a small folder-per-class photo-like dataset.

Deterministic (fixed seed, pure PIL + numpy drawing), so every machine makes
byte-identical files and no third-party image is ever committed. Four classes
of objects -- circle, square, triangle, star -- of random colour, size,
position and rotation, on noisy gradient backgrounds with distractor lines,
saved as JPEG. Hard enough that an untrained head is at chance, easy enough
that a frozen ImageNet backbone separates them in a minute on 2 CPU cores.

    python data/make_sample.py            # writes data/sample/
    python data/make_sample.py --out DIR --per-class 60 --size 160
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    grad = a * (1 - t) + b * t
    img = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, radius: float, angle: float, shape: str) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    if shape == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    points = []  # five-pointed star
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        a = angle + k * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_example(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # distractor strokes
        xy = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    radius = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        draw.polygon(_polygon(cx, cy, radius, rng.uniform(0, 2 * math.pi), shape), fill=colour)
    return img


def make_sample(out: Path, per_class: int = 60, size: int = 160, seed: int = 2026) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for shape in CLASSES:
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_example(rng, shape, size).save(folder / f"{shape}_{i:03d}.jpg", quality=90)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    n = make_sample(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {n} images in {len(CLASSES)} classes to {args.out}")


if __name__ == "__main__":
    main()
