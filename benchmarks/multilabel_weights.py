"""Label weights on imbalanced multi-label data: the toolkit's multi-label fold heads with and without each label's
positive images weighted by its inverse frequency (``class_weights``), side by side on the same grids.

    python benchmarks/multilabel_weights.py [--seeds 5] [--grids 500]

Images: 2x2 grids of clothing-small photos as in ``benchmarks/multilabel.py``, but the classes of a grid drawn in
proportion to 0.7^c (class c = 0..9), so the most held label is on several times as many training grids as the
least held one. Train grids from the train/ photos, test grids (300, drawn the same way) from the test/ photos.

Heads: mobilenet_v2's frozen 7x7 maps of each grid and its mirror, 5 log-sum-exp fold heads on iteratively
stratified folds trained together (``fit_fold_heads``, at most 40 epochs, patience 10), test scores the average of
the 5; thresholds chosen for the best out-of-fold F1 per label. The one difference: per-label weights of the
positive term of the binary cross-entropy (mean label count / the label's count), or none.

Printed, mean ± sd over the seeds: test macro mAP, test macro F1 at the out-of-fold thresholds, and the average
precision of the three rarest labels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from multilabel import GRID, SHARED, grids  # noqa: E402

SETTINGS = ("no label weights", "label weights (inverse frequency)")


def fold_heads(views, train_y, test_x, seed: int, weighted: bool):
    import keras

    from toolkit.backbones.head import FoldHeads
    from toolkit.data.multilabel import stratified_folds
    from toolkit.train.fit_data import class_weights
    from toolkit.train.fold_heads import FoldSettings, fit_fold_heads, per_head_probabilities
    from toolkit.train.folds import held_out, out_of_fold

    keras.utils.set_random_seed(seed)
    held = held_out(stratified_folds(train_y, 5, seed), 5)
    heads = FoldHeads(5, train_y.shape[1], dropout=0.2, multi_label=True)
    weights = None
    if weighted:
        table = class_weights(list(train_y.sum(axis=0)), "on")
        weights = np.asarray([table[c] for c in range(train_y.shape[1])], np.float32)
    settings = FoldSettings(lr=1e-3, label_smoothing=0.0, batch_size=32, epochs=40, patience=10, seed=seed)
    oof = out_of_fold(fit_fold_heads(heads, views, train_y, held, settings, weights), held)
    test = per_head_probabilities(heads.on_features(test_x.shape[1:]), test_x, 32).mean(axis=1)
    return oof, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--grids", type=int, default=500, help="training grids per seed (test grids: 300)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    from sklearn.metrics import average_precision_score, f1_score

    from toolkit import backbones
    from toolkit.data.datasets import load_splits
    from toolkit.predict.multilabel_metrics import choose_thresholds, predicted

    data = load_splits(SHARED / "clothing-small")
    classes = len(data.class_names)
    frequency = 0.7 ** np.arange(classes)
    backbone = backbones.create("mobilenet_v2", input_shape=(GRID, GRID, 3))
    results = {name: [] for name in SETTINGS}
    spread = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        train_images, train_y, reused = grids(list(data.train.decode_paths), np.asarray(data.train.labels), classes,
                                              args.grids, rng, frequency)
        test_images, test_y, _ = grids(list(data.test.decode_paths), np.asarray(data.test.labels), classes, 300, rng,
                                       frequency)
        counts = train_y.sum(axis=0)
        spread.append((int(counts.max()), int(counts.min()), reused))
        train_x = backbone.predict(train_images.astype(np.float32), batch_size=32, verbose=0)
        mirrored = backbone.predict(train_images[:, :, ::-1].astype(np.float32), batch_size=32, verbose=0)
        test_x = backbone.predict(test_images.astype(np.float32), batch_size=32, verbose=0)
        rarest = np.argsort(counts)[:3]
        for name in SETTINGS:
            oof, scores = fold_heads(np.stack([train_x, mirrored]), train_y, test_x, seed, name != SETTINGS[0])
            per_label = [average_precision_score(test_y[:, c], scores[:, c]) for c in range(classes)]
            results[name].append((np.mean(per_label), f1_score(test_y, predicted(scores, choose_thresholds(train_y, oof)),
                                                               average="macro", zero_division=0),
                                   np.mean([per_label[c] for c in rarest])))
            print(f"seed {seed} {name}: macro mAP {results[name][-1][0]:.3f}", file=sys.stderr, flush=True)
    most, least, reused = np.mean(spread, axis=0)
    print(f"{args.grids} training grids per seed (the most held label on {most:.0f} on average, the least on "
          f"{least:.0f}; {reused:.0f} training tiles reuse a photo of another training grid), 300 test grids, "
          f"{classes} classes; {args.seeds} seeds.\n")
    print("| heads | test macro mAP | test macro F1, out-of-fold thresholds | AP of the 3 rarest labels |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        r = np.asarray(results[name])
        print(f"| {name} | " + " | ".join(f"{r[:, i].mean():.3f} ± {r[:, i].std():.3f}" for i in range(3)) + " |")
    gain = np.asarray(results[SETTINGS[1]]) - np.asarray(results[SETTINGS[0]])
    print(f"\nWeighted − unweighted, per seed (macro mAP): " + ", ".join(f"{g:+.3f}" for g in gain[:, 0])
          + f"; mean {gain[:, 0].mean():+.3f} ± {gain[:, 0].std():.3f}")


if __name__ == "__main__":
    import publish

    publish.run(main, "multilabel-weights")
