"""Holdout vs k-fold cross-validation on small real data, side by side in one run.

    python benchmarks/cv.py [--seeds 10] [--json]

mobilenet_v2 (ImageNet, offline) at 224 px, head only, the default recipe's stage-1 settings (Adam 1e-3,
label smoothing 0.1, dropout 0.2, batch 32, at most 30 epochs, patience 5). The backbone's pooled features
of every image and view (the centre crop and 3 augmented views, as the run's cache holds them) are
computed once through the toolkit's own pipeline, then for each split seed:

* holdout (today's run, `--cv off`): a stratified 80/20 split; one head trains on the 80 % and is
  early-stopped on the 20 %; it reports its validation accuracy with a 95 % Wilson interval.
* 5-fold (`--cv 5 --cv-repeats 1`): five heads trained together on all images, each masked off and
  early-stopped on its own fold (`toolkit.train.fold_heads`); the model averages them; it reports the
  out-of-fold accuracy.
* 5-fold x 3 (`--cv 5`, the default 3 repeats): the same with three differently shuffled 5-fold splits,
  15 heads; each image's estimate averages the 3 heads that never saw it.

Both use `toolkit.train.fold_heads.fit_fold_heads` (the holdout is one head whose fold is the 20 %).

Subsets: clothing-small, 10 and 30 images per class drawn once from train/ (seed 0), tested on test/ (372);
hymenoptera, all of train/ (245 usable), tested on val/ (153). The 10 seeds vary the holdout split, the
fold assignment and the heads' initialisation: the spread over them is the run-to-run spread a user sees. Printed: test accuracy mean ± sd over
seeds, the reported estimate minus the test accuracy, how often the 95 % interval holds the test
accuracy, and the head-training wall time. Then one real `toolkit finetune` pair (`--cv off` vs
`--cv 5`) on the clothing 30-per-class subset, for the wall time of a whole run.
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
SIZE, VIEWS = 224, 4


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
    model_heads = FoldHeads(held.shape[1], int(labels.max()) + 1)
    start = time.perf_counter()
    per_head = fit_fold_heads(model_heads, views, labels, held, FoldSettings(seed=seed))
    return model_heads, per_head, time.perf_counter() - start


def test_accuracy(model_heads, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from toolkit.train.fold_heads import per_head_probabilities

    probs = per_head_probabilities(model_heads.on_features(test_x.shape[1:]), test_x, 32).mean(axis=1)
    return float((probs.argmax(1) == test_y).mean())


def compare(name: str, pool, views: np.ndarray, test_x, test_y, per_class: int | None, seeds: int) -> list[dict]:
    from toolkit.core.uncertainty import accuracy_interval
    from toolkit.data.datasets import stratified_split
    from toolkit.train.folds import assign_folds, held_out, holdout_folds, out_of_fold

    rows = []
    labels_all = np.asarray(pool.labels)
    idx = draw(labels_all, per_class, 0)  # one subset; the seeds vary the split, fold assignment and initialisation
    for seed in range(seeds):
        sub = pool.take(idx)
        labels, v = labels_all[idx], views[:, idx]
        # holdout: the toolkit's own stratified split, 20 % held out
        _, val = stratified_split(sub, 0.2, seed)
        val_index = [sub.paths.index(p) for p in val.paths]
        for method, held in (("holdout", held_out(holdout_folds(len(idx), val_index), 1)),
                             ("5-fold", held_out(assign_folds(labels, 5, seed), 5)),
                             ("5-fold x 3", held_out(assign_folds(labels, 5, seed, repeats=3), 5))):
            model_heads, per_head, seconds = train(v, labels, held, seed)
            oof = out_of_fold(per_head, held)
            held = ~np.isnan(oof[:, 0])
            correct = int((oof[held].argmax(1) == labels[held]).sum())
            estimate, n = correct / held.sum(), int(held.sum())
            low, high = accuracy_interval(correct, n)
            test = test_accuracy(model_heads, test_x, test_y)
            rows.append({"dataset": name, "method": method, "seed": seed, "images": len(idx), "test": test,
                         "estimate": estimate, "n_estimate": n, "ci95": [low, high], "covered": low <= test <= high,
                         "train_s": seconds})
            print(f"  {name} seed {seed} {method:10s} test {test:.4f} estimate {estimate:.4f} on {n} "
                  f"[{low:.3f}, {high:.3f}] {seconds:.1f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| subset | method | test accuracy (mean ± sd) | estimate − test (mean ± sd) | mean abs(estimate − test) "
           "| interval holds test | head training (s) |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for method in ("holdout", "5-fold", "5-fold x 3"):
            sel = [r for r in rows if r["dataset"] == name and r["method"] == method]
            test = np.array([r["test"] for r in sel])
            gap = np.array([r["estimate"] - r["test"] for r in sel])
            out.append(f"| {name} | {method} | {test.mean():.4f} ± {test.std(ddof=1):.4f} | {gap.mean():+.4f} ± "
                       f"{gap.std(ddof=1):.4f} | {np.abs(gap).mean():.4f} | {sum(r['covered'] for r in sel)}/{len(sel)} "
                       f"| {np.mean([r['train_s'] for r in sel]):.1f} |")
    return "\n".join(out)


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
                            "--freeze", "all", "--out", str(Path(tmp) / f"run-{cv}")], check=True, cwd=REPO)
            out[cv] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)  # 10 runs per dataset: coverage "in 8 of 10 runs"
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
    # features only for the images some seed's subset draws (the 30-per-class draws hold the 10-per-class ones)
    needed = sorted({int(i) for per_class in (10, 30) for i in draw(labels, per_class, 0)})
    start = time.perf_counter()
    pool = clothing.train.take(needed)
    pool_views = features(pool, pca)
    test_x = features(clothing.test, pca)[0]
    print(f"clothing-small features: {len(needed)} train images x {VIEWS} views + {len(clothing.test)} test, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    full = np.full((VIEWS, len(labels)) + pool_views.shape[2:], np.nan, np.float32)
    full[:, needed] = pool_views
    for per_class in (10, 30):
        rows += compare(f"clothing-small {per_class}/class", clothing.train, full, test_x,
                        np.asarray(clothing.test.labels), per_class, args.seeds)
    hymenoptera = load_splits(SHARED / "hymenoptera")
    pca_h = pca_statistics(list(hymenoptera.train.decode_paths), seed=0)
    rows += compare("hymenoptera", hymenoptera.train, features(hymenoptera.train, pca_h),
                    features(hymenoptera.val, pca_h)[0], np.asarray(hymenoptera.val.labels), None, args.seeds)
    print(table(rows))
    timing = whole_runs(clothing.train, 30)
    print(f"\nwhole run, clothing-small 30/class (300 images): --cv off {timing['off']:.1f} s, --cv 5 "
          f"{timing['5']:.1f} s, ratio {timing['5'] / timing['off']:.2f}x")
    if args.json:
        print(json.dumps({"rows": rows, "whole_run_s": timing}, indent=1))


if __name__ == "__main__":
    import publish

    publish.run(main, "cv")
