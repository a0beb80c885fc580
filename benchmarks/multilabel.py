"""Multi-label heads on real photos: how a Network-in-Network head's class maps should be pooled when an image holds
several classes, against a one-vs-rest logistic head on pooled features; side by side in one run.

    python benchmarks/multilabel.py [--seeds 5] [--grids 500] [--json]

Images: 2x2 grids of clothing-small photos (224 px, each photo a 112 px tile), holding 1 to 4 of its 10 classes
(drawn uniformly; the tiles of a grid cover each of its classes at least once, one photo per class). Training grids
are built from the train/ photos, test grids from the test/ photos: no photo is in both, and no photo is in two
training grids until its class runs out (the count is printed). Every seed draws new grids.

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
* ``toolkit finetune`` itself, every setting at its default but the seed: the grids are written as PNG files with a
  ``labels`` manifest (train and test rows) and the run's model predicts the test grids as ``toolkit predict`` does;
  its time is the whole run's (reading and verifying the files, the backbone over both views, the heads, the report);
* one-vs-rest logistic regression (scikit-learn, C = 1) on the average-pooled, standardised features.

For the fold heads, a second table (and for ``toolkit finetune`` a third, with the run's own thresholds): the out-of-fold macro mAP (what a run would report) against the test macro mAP,
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
FINETUNE = "`toolkit finetune` with its defaults, on the grid files"
HEADS = ("average pooling", "max pooling", "log-sum-exp pooling (r = 5)", FOLD_HEADS, FINETUNE,
         "logistic, one-vs-rest")


def tile(path: str):
    """The photo's centre square, resized to one tile."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (TILE, TILE))


def grids(paths: list[str], labels: np.ndarray, classes: int, count: int, rng,
          frequency: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``count`` 2x2 grids (uint8), their 0/1 targets, and how many tiles had to reuse a photo. The classes of a grid
    are drawn uniformly, or in proportion to ``frequency``; each class of a grid takes the next unused photo of that
    class (a class on two tiles shows the same photo twice), so no photo is in two grids until a class runs out of
    photos (then its photos are shuffled and used again, counted): a photo in two training grids would sit in two
    cross-validation folds and flatter the out-of-fold estimate."""
    pools = [np.flatnonzero(labels == c) for c in range(classes)]
    fresh = [list(rng.permutation(pool)) for pool in pools]
    refilled = [False] * classes
    reused = 0
    images = np.zeros((count, GRID, GRID, 3), np.uint8)
    targets = np.zeros((count, classes), np.uint8)
    p = None if frequency is None else np.asarray(frequency, float) / np.sum(frequency)
    for i in range(count):
        held = rng.choice(classes, size=rng.integers(1, 5), replace=False, p=p)
        cells = np.concatenate([held, rng.choice(held, size=4 - len(held))])
        rng.shuffle(cells)
        photo: dict[int, np.ndarray] = {}  # one photo per class of the grid: a class on two tiles shows it twice
        for c in held:
            if not fresh[c]:
                fresh[c], refilled[c] = list(rng.permutation(pools[c])), True
            reused += refilled[c]
            photo[c] = np.asarray(tile(paths[fresh[c].pop()]))
        for position, c in enumerate(cells):
            y, x = divmod(position, 2)
            images[i, y * TILE:(y + 1) * TILE, x * TILE:(x + 1) * TILE] = photo[c]
        targets[i, held] = 1
    return images, targets, reused


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


def finetune_score(train_images, train_y, test_images, test_y, names, seed: int):
    """The whole product: the grids written as PNG files with a `labels` manifest (train and test rows), `toolkit
    finetune` on it with every setting at its default (the seed aside), then the run's probabilities for the test
    grids (``toolkit predict``'s); (test scores, wall seconds of the finetune, the run's out-of-fold macro mAP, its
    thresholds)."""
    import tempfile

    import pandas as pd
    from PIL import Image

    import toolkit
    from toolkit.predict.inference import predict_member
    from toolkit.predict.members import load_member

    with tempfile.TemporaryDirectory(prefix="multilabel-benchmark-") as folder:
        root = Path(folder)
        rows = []
        for split, images, targets in (("train", train_images, train_y), ("test", test_images, test_y)):
            for i, (image, target) in enumerate(zip(images, targets)):
                name = f"{split}{i:04d}.png"
                Image.fromarray(image).save(root / name)
                rows.append({"path": name, "labels": ";".join(n for n, on in zip(names, target) if on), "split": split})
        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
        start = time.perf_counter()
        run = toolkit.finetune(root / "manifest.csv", root / "run", seed=seed)
        seconds = time.perf_counter() - start
        member = load_member(run.path)
        files = [str(root / r["path"]) for r in rows if r["split"] == "test"]
        scores = predict_member(member, files, [False] * len(files))
        return scores, seconds, run.macro_ap, member.labels.thresholds


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


def estimate_table(title: str, columns: list[str], rows: list[tuple]) -> None:
    """Per seed: (estimate, test macro mAP, *more) as estimate, test, their difference, then the rest; then the
    means (± sd of the difference and of the rest)."""
    values = np.asarray(rows)
    print(f"\n{title}\n")
    print(f"| {columns[0]} | test macro mAP | estimate − test | {' | '.join(columns[1:])} |")
    print("|---" * (len(columns) + 2) + "|")
    for row in values:
        print(f"| {row[0]:.3f} | {row[1]:.3f} | {row[0] - row[1]:+.3f} | " + " | ".join(f"{v:.3f}" for v in row[2:]) + " |")
    gap = values[:, 0] - values[:, 1]
    print(f"| mean {values[:, 0].mean():.3f} | {values[:, 1].mean():.3f} | {gap.mean():+.3f} ± {gap.std():.3f} | "
          + " | ".join(f"{values[:, c].mean():.3f} ± {values[:, c].std():.3f}" for c in range(2, values.shape[1])) + " |")


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
    cardinality, estimate, finetuned, train_reused = [], [], [], []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        train_images, train_y, reused = grids(list(data.train.decode_paths), np.asarray(data.train.labels), classes,
                                              args.grids, rng)
        train_reused.append(reused)
        test_images, test_y, _ = grids(list(data.test.decode_paths), np.asarray(data.test.labels), classes, 300, rng)
        train_x = backbone.predict(train_images.astype(np.float32), batch_size=32, verbose=0)
        test_x = backbone.predict(test_images.astype(np.float32), batch_size=32, verbose=0)
        mirrored = backbone.predict(train_images[:, :, ::-1].astype(np.float32), batch_size=32, verbose=0)
        for head in HEADS:
            if head == FINETUNE:
                scores, seconds, run_estimate, thresholds = finetune_score(train_images, train_y, test_images, test_y,
                                                                           list(data.class_names), seed)
                finetuned.append((run_estimate, average_precision_score(test_y, scores, average="macro"),
                                  f1_score(test_y, predicted(scores, thresholds), average="macro", zero_division=0)))
            elif head == FOLD_HEADS:
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
          f"per test grid on average; {args.seeds} seeds. Training tiles that reuse a photo of another training grid: "
          f"{np.mean(train_reused):.0f} per seed (test grids reuse the 372 test photos).\n")
    print("| head | macro mAP (mean ± sd) | micro mAP (mean ± sd) | head training (s) |")
    print("|---|---|---|---|")
    for head in HEADS:
        r = results[head]
        print(f"| {head} | {np.mean(r['macro']):.3f} ± {np.std(r['macro']):.3f} | {np.mean(r['micro']):.3f} ± "
              f"{np.std(r['micro']):.3f} | {np.mean(r['seconds']):.1f} |")
    estimate_table(f"{FOLD_HEADS}, per seed: out-of-fold estimate against the test grids",
                   ["out-of-fold macro mAP", "test macro F1, out-of-fold thresholds", "test macro F1, threshold 0.5"],
                   estimate)
    estimate_table(f"{FINETUNE}, per seed: the run's own estimate and thresholds against the test grids",
                   ["out-of-fold macro mAP (the run's estimate)", "test macro F1 at the run's thresholds"], finetuned)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    import publish

    publish.run(main, "multilabel")
