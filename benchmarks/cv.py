"""Holdout vs cross-validation on small real data: how close each run's reported accuracy is to the accuracy of the
model it ships, on a test set it never saw; side by side in one run.

    python benchmarks/cv.py [--seeds 10] [--json]

mobilenet_v2 (ImageNet, offline) at 224 px, head only, the default recipe's stage-1 settings (Adam 5e-4, label
smoothing 0.1, dropout 0.2, batch 32, at most 30 epochs, patience 10). The backbone's pooled features of every image
and view (the centre crop and 7 augmented views, as the run's cache holds them) are computed once through the
toolkit's own pipeline, then for each seed:

* holdout (`--cv off`): a stratified 80/20 split; one head trains on the 80 % and is early-stopped on the 20 %;
  it reports its validation accuracy with a 95 % Wilson interval. It ships that head.
* 5-fold x 3, 3-head estimate (for comparison): 15 fold heads, head (r, k) masked off fold k of repeat r
  and early-stopped on it; the model averages the 15; each image's estimate averages the 3 heads that never saw it.
* 5-fold x 3, 15-head estimate (`--cv 5`, default): the same 15 heads are the model; the K-fold split is repeated
  15 times in all (75 heads trained together), so that each image is scored by the average of 15 heads that
  never saw it, as many as the model averages (`toolkit.train.cross_validate.ESTIMATE_RULE`).

All train through `toolkit.train.fold_heads.fit_fold_heads` (the holdout is one head whose fold is the 20 %).

Data: clothing-small, 10 and 30 images per class drawn once from train/ (seed 0), tested on test/ (372 images);
hymenoptera, all 398 images pooled and split at random (stratified) into 245 to train and 153 to test on,
another split for each seed (images from one distribution: what the estimate is for); and hymenoptera's own
train/ → val/ split (val/ photographed apart from train/, a shift no estimate from train/ can see). The seeds vary
the split, the fold assignment and the heads' initialisation: the spread over them is the run-to-run spread a user
sees. Printed: test accuracy of the shipped model mean ± sd over seeds, the reported estimate minus the test
accuracy, how often the 95 % interval holds the test accuracy, and the head-training wall time. Then a real
`toolkit finetune` pair (`--cv off`, `--cv 5`) on the clothing 30-per-class subset, for the wall time of a whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
SIZE, VIEWS = 224, 8
METHODS = ("holdout", "5-fold x 3, 3-head estimate", "5-fold x 3, 15-head estimate")
LABELS = {"holdout": "holdout (`--cv off`)", "5-fold x 3, 15-head estimate": "5-fold x 3, 15-head estimate (`--cv 5`, default)"}


def features(split, pca, seed: int = 0) -> np.ndarray:
    """(VIEWS, images, 1280) pooled mobilenet_v2 features: view 0 the centre crop, the others augmented."""
    import keras

    from toolkit import backbones
    from toolkit.backbones.head import NINHead
    from toolkit.data.pipeline import make_dataset
    from toolkit.train.feature_cache import feature_extractor, forward_all, inference

    backbone = backbones.create("mobilenet_v2", input_shape=(None, None, 3))
    forward = inference(feature_extractor(backbone, NINHead(2)))
    out = []
    for v in range(VIEWS):
        ds = make_dataset(split, SIZE, 32, training=v > 0, seed=seed + 100 + v, pca=pca, shuffle=False)
        x, y = forward_all(forward, ds)
        assert np.array_equal(y, np.asarray(split.labels))
        out.append(x.reshape(len(split), -1))
    keras.backend.clear_session()
    return np.stack(out)[:, :, None, None, :]


def draw(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset (``per_class`` images of each class), seeded; None: all."""
    if not per_class:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(labels.max() + 1)]))


def train(views: np.ndarray, labels: np.ndarray, held: np.ndarray, seed: int):
    import keras

    from toolkit.backbones.head import FoldHeads
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads

    keras.utils.set_random_seed(seed)
    model_heads = FoldHeads(held.shape[1], int(labels.max()) + 1, dropout=0.2)
    start = time.perf_counter()
    settings = FoldSettings(lr=5e-4, label_smoothing=0.1, batch_size=32, epochs=30, patience=10, seed=seed)
    per_head = fit_fold_heads(model_heads, views, labels, held, settings)
    return model_heads, per_head, time.perf_counter() - start


def test_accuracy(model_heads, shipped: int, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of the model that is shipped: the average of the first ``shipped`` heads."""
    from toolkit.train.fold_heads import per_head_probabilities

    probs = per_head_probabilities(model_heads.on_features(test_x.shape[1:]), test_x, 32)[:, :shipped].mean(axis=1)
    return float((probs.argmax(1) == test_y).mean())


def methods(labels: np.ndarray, val_index: list[int], seed: int):
    """(method, held (images, heads), shipped heads) of each method, for one seed."""
    from toolkit.train.folds import assign_folds, held_out, holdout_folds

    yield "holdout", held_out(holdout_folds(len(labels), val_index), 1), 1
    yield "5-fold x 3, 3-head estimate", held_out(assign_folds(labels, 5, seed, repeats=3), 5), 15
    yield "5-fold x 3, 15-head estimate", held_out(assign_folds(labels, 5, seed, repeats=15), 5), 15


def compare(name: str, views: np.ndarray, labels: np.ndarray, split, seeds: int) -> list[dict]:
    """``split(seed) -> (train indices, test features, test labels)`` into ``views`` (V, images, ...)."""
    from sklearn.model_selection import train_test_split

    from toolkit.core.uncertainty import accuracy_interval
    from toolkit.train.folds import out_of_fold

    rows = []
    for seed in range(seeds):
        idx, test_x, test_y = split(seed)
        y, v = labels[idx], views[:, idx]
        _, val_index = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)  # holdout
        for method, held, shipped in methods(y, sorted(val_index), seed):
            model_heads, per_head, seconds = train(v, y, held, seed)
            oof = out_of_fold(per_head, held)
            scored = ~np.isnan(oof[:, 0])
            correct = int((oof[scored].argmax(1) == y[scored]).sum())
            estimate, n = correct / scored.sum(), int(scored.sum())
            low, high = accuracy_interval(correct, n)
            test = test_accuracy(model_heads, shipped, test_x, test_y)
            rows.append({"dataset": name, "method": method, "seed": seed, "images": len(idx), "test": test,
                         "n_test": len(test_y), "estimate": estimate, "n_estimate": n, "ci95": [low, high],
                         "covered": low <= test <= high, "train_s": seconds})
            print(f"  {name} seed {seed} {method:28s} test {test:.4f} estimate {estimate:.4f} on {n} "
                  f"[{low:.3f}, {high:.3f}] {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| data | method | test accuracy of the shipped model (mean ± sd) | estimate − test (mean ± sd) "
           "| mean abs(estimate − test) | interval holds test | head training (s) |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for method in METHODS:
            sel = [r for r in rows if r["dataset"] == name and r["method"] == method]
            test = np.array([r["test"] for r in sel])
            gap = np.array([r["estimate"] - r["test"] for r in sel])
            out.append(f"| {name} | {LABELS.get(method, method)} | {test.mean():.4f} ± {test.std(ddof=1):.4f} | "
                       f"{gap.mean():+.4f} ± {gap.std(ddof=1):.4f} | {np.abs(gap).mean():.4f} | "
                       f"{sum(r['covered'] for r in sel)}/{len(sel)} | {np.mean([r['train_s'] for r in sel]):.1f} |")
    return "\n".join(out)


def overall(rows: list[dict], names: list[str]) -> str:
    """The acceptance line: over the i.i.d. data (train and test from one distribution), per method."""
    out = []
    for method in METHODS:
        sel = [r for r in rows if r["dataset"] in names and r["method"] == method]
        gap = np.array([r["estimate"] - r["test"] for r in sel])
        out.append(f"{LABELS.get(method, method)}: mean abs(estimate − test) {np.abs(gap).mean() * 100:.1f} points, "
                   f"interval holds the test accuracy in {sum(r['covered'] for r in sel)} of {len(sel)} runs")
    return "Over the runs whose test images come from the training images' distribution (" + ", ".join(names) + \
        "):\n\n" + "\n\n".join(out)


def whole_runs(pool, per_class: int) -> dict[str, float]:
    """Wall time of `toolkit finetune --cv off` and `--cv 5` on one class-balanced subset (linked, not copied)."""
    labels = np.asarray(pool.labels)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for c, name in enumerate(pool.class_names):
            (data / name).mkdir(parents=True)
            for i in draw(labels, per_class, 0)[labels[draw(labels, per_class, 0)] == c]:
                (data / name / Path(pool.paths[i]).name).symlink_to(pool.paths[i])
        for cv in ("off", "5"):  # --cv 5 with the default 3 repeats
            start = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "toolkit"), "-q", "finetune", "--data", str(data), "--cv", cv,
                            "--freeze", "all", "--out", str(Path(tmp) / f"run-{cv}")], check=True, cwd=REPO,
                           capture_output=True)
            out[cv] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    from toolkit.data.augment import pca_statistics
    from toolkit.data.datasets import load_splits

    rows = []
    clothing = load_splits(SHARED / "clothing-small")
    pca = pca_statistics(list(clothing.train.decode_paths), seed=0)
    labels = np.asarray(clothing.train.labels)
    # features only for the images a subset draws (the 30-per-class draw holds the 10-per-class one)
    needed = sorted({int(i) for per_class in (10, 30) for i in draw(labels, per_class, 0)})
    start = time.perf_counter()
    pool_views = features(clothing.train.take(needed), pca)
    test_x, test_y = features(clothing.test, pca)[0], np.asarray(clothing.test.labels)
    print(f"clothing-small features: {len(needed)} train images x {VIEWS} views + {len(clothing.test)} test, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    full = np.full((VIEWS, len(labels)) + pool_views.shape[2:], np.nan, np.float32)
    full[:, needed] = pool_views
    for per_class in (10, 30):
        rows += compare(f"clothing-small {per_class}/class", full, labels,
                        lambda seed, k=per_class: (draw(labels, k, 0), test_x, test_y), args.seeds)
    hymenoptera = load_splits(SHARED / "hymenoptera")
    pooled = hymenoptera.train + hymenoptera.val
    pca_h = pca_statistics(list(hymenoptera.train.decode_paths), seed=0)
    views = features(pooled, pca_h)
    y = np.asarray(pooled.labels)
    n_train = len(hymenoptera.train)

    def random_split(seed: int):
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y,
                                               random_state=seed)
        return np.sort(train_idx), views[0][np.sort(test_idx)], y[np.sort(test_idx)]

    rows += compare("hymenoptera, random splits", views, y, random_split, args.seeds)
    rows += compare("hymenoptera, train/ → val/ (shifted)", views, y,
                    lambda seed: (np.arange(n_train), views[0][n_train:], y[n_train:]), args.seeds)
    print(table(rows))
    print()
    print(overall(rows, ["clothing-small 10/class", "clothing-small 30/class", "hymenoptera, random splits"]))
    timing = whole_runs(clothing.train, 30)
    print(f"\nWhole runs, `toolkit finetune --freeze all` on clothing-small 30/class (300 images), audit included: "
          f"`--cv off` {timing['off']:.1f} s, `--cv 5` {timing['5']:.1f} s ({timing['5'] / timing['off']:.2f}x).")
    if args.json:
        print(json.dumps({"rows": rows, "whole_run_s": timing}, indent=1))


if __name__ == "__main__":
    import publish

    publish.run(main, "cv")
