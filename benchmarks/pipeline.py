"""Input-pipeline throughput at 224 px, side by side in one run, on the same files.

    python benchmarks/pipeline.py DIR [--json] [--rounds 3] [--epochs 6]

(a) decode_only              tf.io.decode_image + resize to 224 (no augmentation)
(b) toolkit                  toolkit.data.pipeline training pipeline: random-resized crop (window-only
                             JPEG decode), mirror, RGB colour shift, PCA colour
(c) keras                    keras.utils.image_dataset_from_directory (256 px) + RandomFlip,
                             RandomCrop(224), RandomBrightness, RandomContrast layers in .map
(d) albumentations_threads   TF decode + albumentations Compose in tf.numpy_function (threads)
(e) toolkit_albumentations   the same Compose in toolkit.data.workers worker processes

(d) and (e) use the same Compose: RandomResizedCrop(224, scale 0.25-1), HorizontalFlip,
RGBShift(±20), FancyPCA(0.1). Each candidate is built once per round and streams `--epochs` passes
over the files (pipeline construction included in the time); rounds are interleaved and the median
img/s is reported, with ratios to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 224
BATCH = 32


def _albumentations_compose():
    import albumentations as A

    return A.Compose(
        [
            A.RandomResizedCrop(size=(SIZE, SIZE), scale=(0.25, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.RGBShift(r_shift_limit=20, g_shift_limit=20, b_shift_limit=20, p=1.0),
            A.FancyPCA(alpha=0.1, p=1.0),
        ],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder-per-class tree, or a folder with train/")
    parser.add_argument("--json", action="store_true", help="print one JSON object of img/s instead of the table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="passes over the files per candidate and round")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from toolkit.data.augment import AugmentConfig, pca_statistics
    from toolkit.data.datasets import load_splits
    from toolkit.data.pipeline import make_dataset
    from toolkit.data.workers import ProcessAugmentedDataset

    root = args.data / "train" if (args.data / "train").is_dir() else args.data
    splits = load_splits(root, val_fraction=0.01)
    # Every candidate reads the same usable files: train + the 1% held out.
    split = splits.train + splits.val
    paths = list(split.decode_paths)
    pca = pca_statistics(paths)
    compose = _albumentations_compose()
    workers = ProcessAugmentedDataset(split, compose, SIZE, BATCH, seed=0)

    def decode_only():
        def load(path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            return tf.image.resize(image, [SIZE, SIZE])

        return tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)

    def toolkit_pipeline():
        return make_dataset(split, SIZE, BATCH, training=True, seed=0, augment_config=AugmentConfig(), pca=pca)

    keras_aug = keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomCrop(SIZE, SIZE),
        keras.layers.RandomBrightness(0.1, value_range=(0, 255)),
        keras.layers.RandomContrast(0.1, value_range=(0, 255)),
    ])

    def keras_native():
        ds = keras.utils.image_dataset_from_directory(
            root, image_size=(256, 256), batch_size=BATCH, shuffle=True, seed=0, verbose=False
        )
        return ds.map(lambda x, y: (keras_aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)

    def albumentations_threads():
        def augment(image):
            return compose(image=image)["image"]

        def load(path):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            out = tf.numpy_function(augment, [image], tf.uint8)
            out.set_shape([SIZE, SIZE, 3])
            return tf.cast(out, tf.float32)

        return tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)

    candidates = {
        "decode_only": decode_only,
        "toolkit": toolkit_pipeline,
        "keras": keras_native,
        "albumentations_threads": albumentations_threads,
        "toolkit_albumentations": workers.dataset,
    }
    results: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.rounds):
        for name, make in candidates.items():
            count = 0
            start = time.perf_counter()
            # Built once and iterated once per epoch, as training does (each pass reshuffles).
            dataset = make().prefetch(tf.data.AUTOTUNE)
            for _ in range(args.epochs):
                for batch in dataset:
                    images = batch[0] if isinstance(batch, tuple) else batch
                    count += int(images.shape[0])
            results[name].append(count / (time.perf_counter() - start))
    workers.close()

    median = {k: statistics.median(v) for k, v in results.items()}
    if args.json:
        print(json.dumps({k: round(v, 1) for k, v in median.items()}))
        return
    base = median["decode_only"]
    print(f"pipeline throughput at {SIZE} px on {len(paths)} images of {root} "
          f"(median of {args.rounds} rounds x {args.epochs} epochs, {os.cpu_count()} CPU cores)")
    print(f"{'pipeline':<26}{'img/s':>8}{'vs (a)':>9}   rounds")
    for label, key in zip("abcde", candidates):
        print(f"({label}) {key:<22}{median[key]:>8.0f}{median[key] / base:>8.2f}x   "
              + " ".join(f"{v:.0f}" for v in results[key]))
    print(f"toolkit / keras: {median['toolkit'] / median['keras']:.2f}x; "
          f"toolkit_albumentations / albumentations_threads: "
          f"{median['toolkit_albumentations'] / median['albumentations_threads']:.2f}x")



if __name__ == "__main__":
    import publish

    publish.run(main, "pipeline")
