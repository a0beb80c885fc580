"""Does `toolkit audit` find planted label errors and near-duplicates in real photos? One run, two datasets.

    python benchmarks/audit.py [--seeds 5] [--backbones A,B] [--only clothing|hymenoptera] [--json]

For each dataset a temporary folder is built of links to the real images (nothing copied into the
repository):

* clothing-small: 30 images per class from train/ (seeded), and all of test/ as the test split;
* hymenoptera: all of train/, and val/ as the test split.

Then, for each seed (the subset stays the one drawn with seed 0):

* 10 % of the training images get a wrong label (moved to another class's folder at random);
* 20 near-duplicates are planted: a training image resized to 50–80 %, re-encoded at JPEG quality 60–80,
  5–10 % cropped off its borders, every other one mirrored; 10 copies go into train/ (same class), 10 into
  test/ (leakage).

`toolkit audit` (its default probes, `toolkit.api.audit.AUDIT_BACKBONES`, 5-fold x 3 heads on each, cleanlab) runs on
the folder; `--backbones mobilenet_v2` measures one probe alone. Reported: precision and
recall of the `label` rows, precision@k with k = the number of flips, recall of the planted pairs, and the
other (unplanted) near-duplicate pairs per 1000 images (real near-duplicates of the data count here too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"


def plant(root: Path, train, test, rng: np.random.Generator, flip_fraction: float = 0.1, copies: int = 20):
    """Build the audited folder; returns (flipped paths, {copy path: source path})."""
    from PIL import Image, ImageOps

    names = train.class_names
    n_flip = int(round(flip_fraction * len(train)))
    flip = set(rng.choice(len(train), n_flip, replace=False).tolist())
    flipped = []
    for i, (path, label) in enumerate(zip(train.paths, train.labels)):
        if i in flip:
            label = int(rng.choice([c for c in range(len(names)) if c != label]))
        target = root / "train" / names[label] / f"{i:05d}-{Path(path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
        if i in flip:
            flipped.append(str(target))
    for i, (path, label) in enumerate(zip(test.paths, test.labels)):
        target = root / "test" / names[label] / f"t{i:05d}-{Path(path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    planted = {}
    sources = rng.choice([i for i in range(len(train)) if i not in flip], copies, replace=False)
    for n, i in enumerate(sources):
        with Image.open(train.paths[i]) as image:
            image = image.convert("RGB")
            w, h = image.size
            cut = rng.uniform(0.05, 0.10)
            dx, dy = int(w * cut / 2), int(h * cut / 2)
            image = image.crop((dx, dy, w - dx, h - dy))
            scale = rng.uniform(0.5, 0.8)
            image = image.resize((max(32, int(image.width * scale)), max(32, int(image.height * scale))))
            if n % 2:
                image = ImageOps.mirror(image)
            split = "train" if n < copies // 2 else "test"
            target = root / split / names[train.labels[i]] / f"copy{n:02d}.jpg"
            image.save(target, quality=int(rng.integers(60, 81)))
        planted[str(target)] = str(root / "train" / names[train.labels[i]] / f"{i:05d}-{Path(train.paths[i]).name}")
    return flipped, planted


def score(findings, flipped: list[str], planted: dict[str, str], n_images: int) -> dict:
    labels = findings[findings["issue"] == "label"]
    flagged = [str(p) for p in labels["path"]]
    hits = sum(p in set(flipped) for p in flagged)
    k = len(flipped)
    top_k = sum(p in set(flipped) for p in flagged[:k])
    pairs = {frozenset((r.path, r.duplicate_of)) for r in findings[findings["issue"] == "near_duplicate"].itertuples()}
    wanted = {frozenset(pair) for pair in planted.items()}
    return {"flips": k, "label_rows": len(flagged), "label_precision": hits / max(len(flagged), 1),
            "label_recall": hits / max(k, 1), "precision_at_k": top_k / max(k, 1),
            "planted_found": len(wanted & pairs) / len(wanted),
            "other_pairs_per_1000": 1000 * len(pairs - wanted) / n_images, "other_pairs": len(pairs - wanted)}


def run(name: str, train, test, seed: int, backbones) -> dict:
    from toolkit.api.audit import audit_input
    from toolkit.config.settings import FinetuneConfig
    from toolkit.data.audit import find_issues

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / name
        flipped, planted = plant(root, train, test, np.random.default_rng(seed))
        start = time.perf_counter()
        audit = audit_input(root, FinetuneConfig(seed=seed), verbose=0, backbones=backbones)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        findings = find_issues(audit)
        seconds += time.perf_counter() - start
        result = {"dataset": name, "images": len(audit.paths), "audit_s": seconds,
                  **score(findings, flipped, planted, len(audit.paths))}
        print(f"{name}, seed {seed}: precision@k {result['precision_at_k']:.2f}, planted pairs found "
              f"{result['planted_found']:.2f}, {seconds:.0f} s", flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="flip and plant sets (seeds 0..N-1)")
    parser.add_argument("--backbones", default=None, metavar="NAME[,NAME...]",
                        help="the audit's probes (default: toolkit audit's own)")
    parser.add_argument("--only", choices=("clothing", "hymenoptera"), default=None, help="one dataset")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    from toolkit.api.audit import AUDIT_BACKBONES
    from toolkit.data.datasets import load_splits

    backbones = tuple(args.backbones.split(",")) if args.backbones else AUDIT_BACKBONES
    clothing = load_splits(SHARED / "clothing-small")
    labels = np.asarray(clothing.train.labels)
    rng = np.random.default_rng(0)
    subset = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), 30, replace=False)
                                     for c in range(labels.max() + 1)]))
    hymenoptera = load_splits(SHARED / "hymenoptera")
    results = []
    for seed in range(args.seeds):
        if args.only != "hymenoptera":
            results.append({**run("clothing-small 30/class", clothing.train.take(subset), clothing.test, seed, backbones),
                            "seed": seed})
        if args.only != "clothing":
            results.append({**run("hymenoptera", hymenoptera.train, hymenoptera.val, seed, backbones), "seed": seed})
    print("| dataset | seed | images | flips | label rows | label precision | label recall | precision@k | "
          "planted pairs found | other pairs / 1000 images | audit (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in results:
        print(f"| {s['dataset']} | {s['seed']} | {s['images']} | {s['flips']} | {s['label_rows']} | "
              f"{s['label_precision']:.2f} | {s['label_recall']:.2f} | {s['precision_at_k']:.2f} | "
              f"{s['planted_found']:.2f} | {s['other_pairs_per_1000']:.1f} ({s['other_pairs']}) | {s['audit_s']:.0f} |")
    for name in dict.fromkeys(s["dataset"] for s in results):
        sel = [s for s in results if s["dataset"] == name]
        line = ", ".join(f"{key} {np.mean([s[key] for s in sel]):.2f} ± {np.std([s[key] for s in sel], ddof=1):.2f}"
                         for key in ("label_precision", "label_recall", "precision_at_k", "planted_found",
                                     "other_pairs_per_1000"))
        print(f"{name}, mean ± sd over {len(sel)} seeds: {line}")
    if args.json:
        print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    import publish

    publish.run(main, "audit")
