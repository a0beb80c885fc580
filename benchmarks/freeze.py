"""Is `--freeze auto` as good as the best fixed choice? Class-balanced subsets of clothing-small.

    python benchmarks/freeze.py [--sizes 10 30 100 all] [--json]

For each subset (N train images per class, drawn with a fixed seed; "all" = the whole, unbalanced
train split) the default recipe is trained with three freeze plans -- head only (`all`), the top
third of the stages (`0.34`), every stage (`none`) -- and evaluated on clothing-small/test (372
images). validation/ is used for early stopping. `auto` picks one of those three plans from the
data; runs are deterministic for a seed, so its accuracy is that plan's run (not retrained) and the
table says which plan it picked. Prints accuracy per plan and auto's gap to the best.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets" / "clothing-small"
PLANS = {"head only": "all", "top third": "0.34", "all stages": "none"}


def subset_manifest(per_class: str, out: Path, seed: int = 0) -> Path:
    """CSV manifest: per_class train images of each class (or all), plus validation/ as val."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for class_dir in sorted((DATA / "train").iterdir()):
        files = sorted(class_dir.iterdir())
        if per_class != "all":
            files = [files[i] for i in sorted(rng.choice(len(files), size=int(per_class), replace=False))]
        rows += [f"{f},{class_dir.name},train" for f in files]
    for class_dir in sorted((DATA / "validation").iterdir()):
        rows += [f"{f},{class_dir.name},val" for f in sorted(class_dir.iterdir())]
    path = out / f"subset-{per_class}.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_accuracy(run: Path, image_size: int) -> float:
    import keras
    import numpy as np

    from toolkit.data.datasets import load_splits
    from toolkit.data.pipeline import make_dataset

    test = load_splits(DATA).test
    model = keras.models.load_model(run / "model.keras", safe_mode=True)
    probs = model.predict(make_dataset(test, image_size, 32, training=False), verbose=0)
    return float((probs.argmax(1) == np.asarray(test.labels)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10", "30", "100", "all"])
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override the recipe's stage-2 epochs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from toolkit import backbones
    from toolkit.api import train as finetune
    from toolkit.config.recipes import build_config
    from toolkit.data.datasets import load_splits
    from toolkit.train.freeze import plan_freeze

    work = Path(tempfile.mkdtemp(prefix="bench-freeze-"))
    stages = [s.name for s in backbones.get_spec("mobilenet_v2").stages]
    results = {}
    for size in args.sizes:
        manifest = subset_manifest(size, work)
        train = load_splits(manifest).train
        auto = plan_freeze("auto", len(train), len(train.class_names), stages)
        row = {"train_images": len(train), "auto_plan": auto.describe()}
        for label, freeze in PLANS.items():
            config = build_config(None, {"data": str(manifest), "freeze": freeze, "finetune_epochs": args.finetune_epochs})
            start = time.perf_counter()
            out = work / f"{size}-{freeze}"
            result = finetune(config, out=out, verbose=0)
            row[label] = {"accuracy": test_accuracy(out, 224), "wall_s": round(time.perf_counter() - start, 1),
                          "unfrozen": result.plan.unfrozen}
            print(f"{size:>5} per class, {label:<10}: test accuracy {row[label]['accuracy']:.4f} "
                  f"({row[label]['wall_s']:.0f} s)", flush=True)
        auto_label = next(l for l in PLANS if row[l]["unfrozen"] == auto.unfrozen)
        row["auto"] = {"same_as": auto_label, "accuracy": row[auto_label]["accuracy"]}
        row["best"] = max(row[l]["accuracy"] for l in PLANS)
        results[size] = row
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"\n{'per class':>9} {'train':>6} {'head only':>10} {'top third':>10} {'all stages':>11} {'auto':>8}  auto chose   auto - best")
    for size, r in results.items():
        print(f"{size:>9} {r['train_images']:>6} {r['head only']['accuracy']:>10.4f} {r['top third']['accuracy']:>10.4f} "
              f"{r['all stages']['accuracy']:>11.4f} {r['auto']['accuracy']:>8.4f}  {r['auto']['same_as']:<11} "
              f"{100 * (r['auto']['accuracy'] - r['best']):+.1f} pt")


if __name__ == "__main__":
    import publish

    publish.run(main, "freeze")
