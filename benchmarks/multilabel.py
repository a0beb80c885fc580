"""Multi-label heads on real photos: how a Network-in-Network head's class maps should be pooled when an image holds
several classes, against a one-vs-rest logistic head on pooled features; side by side in one run.

    python benchmarks/multilabel.py [--seeds 5] [--grids 500] [--json]

Images: 2x2 grids of clothing-small photos (224 px, each photo a 112 px tile), holding 1 to 4 of its 10 classes
(drawn uniformly; the tiles of a grid cover each of its classes at least once). Training grids are built from the
train/ photos, test grids from the test/ photos: no photo is in both. Every seed draws new grids.

Features: mobilenet_v2 (ImageNet, offline, frozen, its preprocessing inside) gives each grid a 7x7x1280 map. Heads,
all trained with binary cross-entropy on the same maps (Adam 1e-3, batch 32, 40 epochs, dropout 0.2 before the
head), differ only in how the per-class maps of a 1x1 convolution become one score per class:

* average pooling (what a single-label NIN head does);
* max pooling (the strongest cell);
* log-sum-exp pooling, r = 5: (1/r) log mean exp(r x), between the two (r -> 0: average, r -> inf: max), the
  toolkit's ``LogSumExpPooling2D`` (what its multi-label NIN head pools with);
* the toolkit's multi-label fold heads: 5 log-sum-exp NIN heads on 5 iteratively stratified folds, trained
  together on the maps of each grid and its mirror image (``toolkit.train.fold_heads.fit_fold_heads``, at most
  40 epochs, each head early-stopped on its own fold, patience 10), the test score the average of the 5;
* one-vs-rest logistic regression (scikit-learn, C = 1) on the average-pooled, standardised features.

For the fold heads, a second table: the out-of-fold macro mAP (what a run would report) against the test macro mAP,
and the test macro F1 with each label's threshold chosen for the best out-of-fold F1, against a flat 0.5.

Printed: macro and micro average precision (scikit-learn's ``average_precision_score``) on the test grids, mean ± sd
over the seeds, and each head's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
GRID, TILE = 224, 112
from toolkit.backbones.head import LSE_SHARPNESS as LSE_R  # noqa: E402

FOLD_HEADS = "5 fold heads, log-sum-exp (the toolkit's FoldHeads)"
HEADS = ("average pooling", "max pooling", "log-sum-exp pooling (r = 5)", FOLD_HEADS, "logistic, one-vs-rest")


def tile(path: str):
    """The photo's centre square, resized to one tile."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (TILE, TILE))


def grids(paths: list[str], labels: np.ndarray, classes: int, count: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 2x2 grids (uint8) and their 0/1 targets."""
    by_class = [np.flatnonzero(labels == c) for c in range(classes)]
    images = np.zeros((count, GRID, GRID, 3), np.uint8)
    targets = np.zeros((count, classes), np.uint8)
    for i in range(count):
        held = rng.choice(classes, size=rng.integers(1, 5), replace=False)
        cells = np.concatenate([held, rng.choice(held, size=4 - len(held))])
        rng.shuffle(cells)
        for position, c in enumerate(cells):
            y, x = divmod(position, 2)
            images[i, y * TILE:(y + 1) * TILE, x * TILE:(x + 1) * TILE] = np.asarray(
                tile(paths[rng.choice(by_class[c])]))
        targets[i, held] = 1
    return images, targets


def head_model(shape: tuple[int, int, int], classes: int, pooling: str, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    maps = keras.Input(shape)
    x = keras.layers.Dropout(0.2)(maps)
    x = keras.layers.Conv2D(classes, 1)(x)
    if pooling == "average pooling":
        x = keras.layers.GlobalAveragePooling2D()(x)
    elif pooling == "max pooling":
        x = keras.layers.GlobalMaxPooling2D()(x)
    else:
        from toolkit.backbones.head import LogSumExpPooling2D

        x = LogSumExpPooling2D(LSE_R)(x)
    model = keras.Model(maps, x)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def fold_heads(train_views, train_y, test_x, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The toolkit's multi-label fold heads: (out-of-fold probabilities of the training grids, test probabilities)."""
    import keras

    from toolkit.backbones.head import FoldHeads
    from toolkit.data.multilabel import stratified_folds
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads, per_head_probabilities
    from toolkit.train.folds import held_out, out_of_fold

    keras.utils.set_random_seed(seed)
    held = held_out(stratified_folds(train_y, 5, seed), 5)
    heads = FoldHeads(5, train_y.shape[1], dropout=0.2, multi_label=True)
    settings = FoldSettings(lr=1e-3, label_smoothing=0.0, batch_size=32, epochs=40, patience=10, seed=seed)
    oof = out_of_fold(fit_fold_heads(heads, train_views, train_y, held, settings), held)
    test = per_head_probabilities(heads.on_features(test_x.shape[1:]), test_x, 32).mean(axis=1)
    return oof, test


def fit_score(head: str, train_x, train_y, test_x, seed: int) -> tuple[np.ndarray, float]:
    """Test scores of one head trained on the training maps, and its training time."""
    start = time.perf_counter()
    if head.startswith("logistic"):
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=3000)))
        model.fit(train_x.mean(axis=(1, 2)), train_y)
        seconds = time.perf_counter() - start
        return model.predict_proba(test_x.mean(axis=(1, 2))), seconds
    model = head_model(train_x.shape[1:], train_y.shape[1], head, seed)
    model.fit(train_x, train_y.astype(np.float32), batch_size=32, epochs=40, verbose=0, shuffle=True)
    seconds = time.perf_counter() - start
    return model.predict(test_x, batch_size=128, verbose=0), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--grids", type=int, default=500, help="training grids per seed (test grids: 300)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    from sklearn.metrics import average_precision_score, f1_score

    from toolkit import backbones
    from toolkit.predict.multilabel_metrics import choose_thresholds, predicted
    from toolkit.data.datasets import load_splits

    data = load_splits(SHARED / "clothing-small")
    classes = len(data.class_names)
    backbone = backbones.create("mobilenet_v2", input_shape=(GRID, GRID, 3))
    results = {head: {"macro": [], "micro": [], "seconds": []} for head in HEADS}
    cardinality, estimate = [], []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        train_images, train_y = grids(list(data.train.decode_paths), np.asarray(data.train.labels), classes,
                                      args.grids, rng)
        test_images, test_y = grids(list(data.test.decode_paths), np.asarray(data.test.labels), classes, 300, rng)
        train_x = backbone.predict(train_images.astype(np.float32), batch_size=32, verbose=0)
        test_x = backbone.predict(test_images.astype(np.float32), batch_size=32, verbose=0)
        mirrored = backbone.predict(train_images[:, :, ::-1].astype(np.float32), batch_size=32, verbose=0)
        for head in HEADS:
            if head == FOLD_HEADS:
                start = time.perf_counter()
                oof, scores = fold_heads(np.stack([train_x, mirrored]), train_y, test_x, seed)
                seconds = time.perf_counter() - start
                thresholds = choose_thresholds(train_y, oof)
                estimate.append((average_precision_score(train_y, oof, average="macro"),
                                 average_precision_score(test_y, scores, average="macro"),
                                 f1_score(test_y, predicted(scores, thresholds), average="macro", zero_division=0),
                                 f1_score(test_y, predicted(scores, np.full(classes, 0.5)), average="macro",
                                          zero_division=0)))
            else:
                scores, seconds = fit_score(head, train_x, train_y, test_x, seed)
            results[head]["macro"].append(average_precision_score(test_y, scores, average="macro"))
            results[head]["micro"].append(average_precision_score(test_y, scores, average="micro"))
            results[head]["seconds"].append(seconds)
            cardinality.append(float(test_y.sum(axis=1).mean()))
            print(f"seed {seed} {head}: macro mAP {results[head]['macro'][-1]:.3f}", file=sys.stderr, flush=True)
    print(f"{args.grids} training and 300 test grids per seed, {classes} classes, {np.mean(cardinality):.2f} labels "
          f"per test grid on average; {args.seeds} seeds.\n")
    print("| head | macro mAP (mean ± sd) | micro mAP (mean ± sd) | head training (s) |")
    print("|---|---|---|---|")
    for head in HEADS:
        r = results[head]
        print(f"| {head} | {np.mean(r['macro']):.3f} ± {np.std(r['macro']):.3f} | {np.mean(r['micro']):.3f} ± "
              f"{np.std(r['micro']):.3f} | {np.mean(r['seconds']):.1f} |")
    est = np.asarray(estimate)
    print(f"\n{FOLD_HEADS}, per seed: out-of-fold estimate against the test grids\n")
    print("| out-of-fold macro mAP | test macro mAP | estimate − test | test macro F1, out-of-fold thresholds | "
          "test macro F1, threshold 0.5 |")
    print("|---|---|---|---|---|")
    for row in est:
        print(f"| {row[0]:.3f} | {row[1]:.3f} | {row[0] - row[1]:+.3f} | {row[2]:.3f} | {row[3]:.3f} |")
    print(f"| mean {est[:, 0].mean():.3f} | {est[:, 1].mean():.3f} | {(est[:, 0] - est[:, 1]).mean():+.3f} ± "
          f"{(est[:, 0] - est[:, 1]).std():.3f} | {est[:, 2].mean():.3f} ± {est[:, 2].std():.3f} | "
          f"{est[:, 3].mean():.3f} ± {est[:, 3].std():.3f} |")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    import publish

    publish.run(main, "multilabel")
