"""Prediction throughput: `predict` (files → probabilities) vs the bare model's forward pass.

    python benchmarks/predict.py RUN DIR [--images 256] [--batch-size 32]

On the same images and batch size, in one run:
* forward: the model on images already decoded and cropped in memory (the ceiling);
* predict none: toolkit.inference.predict_member from files, centre crop (target >= 0.9x forward);
* predict 10crop: the same with 10-crop TTA (target: time <= 10x the centre crop).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument("data", help="folder of images (searched recursively)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from toolkit.inference import collect_images, load_member, predict_member
    from toolkit.pipeline import eval_image
    from toolkit.verify import verify_files

    member = load_member(args.run)
    records = [r for r in verify_files(collect_images([args.data])) if r.ok][: args.images]
    paths, jpeg = [r.decode_path for r in records], [r.is_jpeg for r in records]
    decoded = np.stack([eval_image(tf.io.read_file(p), j, member.image_size, member.crop_fraction).numpy()
                        for p, j in zip(paths, jpeg)])
    forward = member.forward()  # the same compiled call predict uses
    forward(decoded[: args.batch_size])
    predict_member(member, paths[: args.batch_size], jpeg[: args.batch_size])  # warm up both modes
    predict_member(member, paths[:4], jpeg[:4], "10crop", args.batch_size)

    def time_forward():
        start = time.perf_counter()
        for i in range(0, len(decoded), args.batch_size):
            np.asarray(forward(decoded[i : i + args.batch_size]))
        return time.perf_counter() - start

    def time_predict(mode):
        start = time.perf_counter()
        predict_member(member, paths, jpeg, mode, args.batch_size)  # the same views per forward pass
        return time.perf_counter() - start

    t_forward = min(time_forward() for _ in range(2))
    t_none = min(time_predict("none") for _ in range(2))
    t_ten = time_predict("10crop")
    n = len(paths)
    print(f"prediction on {n} images of {args.data} with {Path(args.run).name} at {member.image_size} px, "
          f"batch {args.batch_size}, {os.cpu_count()} CPU cores")
    print(f"{'':<28}{'img/s':>8}{'ratio':>9}")
    print(f"{'bare forward (in memory)':<28}{n / t_forward:>8.1f}{1.0:>8.2f}x")
    print(f"{'predict, centre crop':<28}{n / t_none:>8.1f}{t_forward / t_none:>8.2f}x  of forward (target >= 0.9x)")
    print(f"{'predict, 10-crop':<28}{n / t_ten:>8.1f}{t_ten / t_none:>8.2f}x  time of centre crop (target <= 10x)")


if __name__ == "__main__":
    main()
