"""The toolkit's default recipe vs the Keras transfer-learning guide, side by side in one run.

    python benchmarks/finetune.py [--datasets hymenoptera clothing-small] [--json]

Both start from the same backbone weights (mobilenet_v2, torchvision ImageNet, offline) at 224 px.

* guide: keras.utils.image_dataset_from_directory; RandomFlip + RandomRotation(0.1); the frozen base
  called with training=False; GAP → Dropout(0.2) → Dense; Adam 1e-3 for 10 epochs; then the whole
  base trainable, Adam 1e-5 for 5 epochs (BatchNorm still in inference mode). Accuracy is measured
  after each stage.
* toolkit: `toolkit finetune --freeze auto` with the default recipe (quick).

hymenoptera: train → val. clothing-small: train → test (the toolkit uses validation/ for early
stopping; the guide does not use it). Prints a table of accuracy and wall time per method.
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
SHARED = REPO.parent / "shared" / "datasets"
SPLITS = {"hymenoptera": ("train", "val"), "clothing-small": ("train", "test")}


def guide(train_dir: Path, eval_dir: Path, seed: int = 0) -> dict:
    import keras
    import tensorflow as tf

    from toolkit import backbones

    keras.utils.set_random_seed(seed)
    load = dict(image_size=(224, 224), batch_size=32, seed=seed, verbose=False, label_mode="int")
    train = keras.utils.image_dataset_from_directory(train_dir, shuffle=True, **load)
    class_names = train.class_names
    evaluation = keras.utils.image_dataset_from_directory(eval_dir, shuffle=False, **load)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    train = train.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    evaluation = evaluation.prefetch(2)

    base = backbones.create("mobilenet_v2", input_shape=(224, 224, 3))  # raw RGB in, preprocessing inside
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(len(class_names))(x)
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    start = time.perf_counter()
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(train, epochs=10, verbose=2)
    head_acc = model.evaluate(evaluation, verbose=0)[1]
    head_s = time.perf_counter() - start

    start = time.perf_counter()
    base.trainable = True
    model.compile(keras.optimizers.Adam(1e-5), loss, metrics=["accuracy"])
    model.fit(train, epochs=5, verbose=2)
    fine_acc = model.evaluate(evaluation, verbose=0)[1]
    fine_s = time.perf_counter() - start
    return {"head_accuracy": head_acc, "finetune_accuracy": fine_acc, "best_accuracy": max(head_acc, fine_acc),
            "head_s": head_s, "finetune_s": fine_s, "wall_s": head_s + fine_s}


def toolkit_run(data: Path, eval_dir: Path, seed: int = 0) -> dict:
    import keras
    import numpy as np

    from toolkit.api import train
    from toolkit.config.recipes import build_config
    from toolkit.data.datasets import load_splits
    from toolkit.data.pipeline import make_dataset

    config = build_config(None, {"data": str(data), "freeze": "auto", "seed": seed})
    out = Path(tempfile.mkdtemp(prefix="bench-finetune-")) / "run"
    start = time.perf_counter()
    result = train(config, out=out, verbose=2)
    wall = time.perf_counter() - start
    accuracy = result.metrics["val_accuracy"]
    if eval_dir.name != "val":  # evaluate on the held-out test split
        splits = load_splits(data)
        model = keras.models.load_model(out / "model.keras", safe_mode=True)
        size = config.image_size or 224
        probs = model.predict(make_dataset(splits.test, size, 32, training=False), verbose=0)
        accuracy = float((probs.argmax(1) == np.asarray(splits.test.labels)).mean())
    return {"accuracy": accuracy, "wall_s": wall, "freeze_plan": result.plan.describe(), "run": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = {}
    for name in args.datasets:
        root = SHARED / name
        train_split, eval_split = SPLITS[name]
        g = guide(root / train_split, root / eval_split)
        t = toolkit_run(root, root / eval_split)
        rows[name] = {"guide": g, "toolkit": t}
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'dataset':<16}{'method':<34}{'accuracy':>9}{'wall s':>9}")
    for name, r in rows.items():
        g, t = r["guide"], r["toolkit"]
        print(f"{name:<16}{'guide, after head (10 ep)':<34}{g['head_accuracy']:>9.4f}{g['head_s']:>9.0f}")
        print(f"{'':<16}{'guide, after fine-tune (+5 ep)':<34}{g['finetune_accuracy']:>9.4f}{g['wall_s']:>9.0f}")
        print(f"{'':<16}{'toolkit --freeze auto (quick)':<34}{t['accuracy']:>9.4f}{t['wall_s']:>9.0f}")
        print(f"{'':<16}  accuracy - guide best: {t['accuracy'] - g['best_accuracy']:+.4f}; "
              f"time / guide: {t['wall_s'] / g['wall_s']:.2f}x; plan: {t['freeze_plan']}")


if __name__ == "__main__":
    import publish

    publish.run(main, "finetune")
