"""Prediction throughput: `predict` (files → probabilities) vs the bare model's forward pass.

    python benchmarks/predict.py RUN DIR [--images 512] [--batch-size 32] [--rounds 3]

On the same images and batch size, in one run:
* forward: the model on images already decoded and cropped in memory (the ceiling);
* predict none: toolkit.predict.inference.predict_member from files, centre crop (target >= 0.9x forward);
* predict 10crop: the same with 10-crop TTA (target: time <= 10x the centre crop);
* start-up: predict_member on one image, start to finish (pipeline set-up, first decode, one
  forward pass at batch 1): the fixed cost of a call, which --images amortizes.

The files found under DIR are taken in order, repeated when there are fewer than
--images (each pass decodes them again). Everything is timed once per round,
rounds interleaved, and the ratios are the medians of the per-round ratios, so a
slow spell of a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument("data", help="folder of images (searched recursively)")
    parser.add_argument("--images", type=int, default=512, help="images per timed pass (files repeated if fewer)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians are reported)")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from toolkit.data.pipeline import eval_image
    from toolkit.data.verify import verify_files
    from toolkit.predict.inference import collect_images, predict_member
    from toolkit.predict.members import load_member

    member = load_member(args.run)
    records = [r for r in verify_files(collect_images([args.data])) if r.ok]
    unique = np.stack([eval_image(tf.io.read_file(r.decode_path), r.is_jpeg, member.image_size,
                                  member.crop_fraction).numpy() for r in records])
    order = np.arange(args.images) % len(records)
    paths, jpeg = [records[i].decode_path for i in order], [records[i].is_jpeg for i in order]
    decoded = unique[order]
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

    def time_start_up():
        start = time.perf_counter()
        predict_member(member, paths[:1], jpeg[:1], "none", args.batch_size)
        return time.perf_counter() - start

    # Interleaved rounds: each round times everything on the same machine state; medians over rounds.
    rounds = [(time_forward(), time_predict("none"), time_predict("10crop"), time_start_up()) for _ in range(args.rounds)]
    t_forward, t_none, t_ten, t_start = (statistics.median(r[i] for r in rounds) for i in range(4))
    centre_ratio = statistics.median(f / c for f, c, _, _ in rounds)
    ten_ratio = statistics.median(t / c for _, c, t, _ in rounds)
    n = len(paths)
    print(f"prediction on {n} images ({len(records)} files) of {args.data} with {Path(args.run).name} at {member.image_size} px, "
          f"batch {args.batch_size}, {os.cpu_count()} CPU cores, median of {args.rounds} interleaved rounds")
    print(f"{'':<28}{'img/s':>8}{'ratio':>9}")
    print(f"{'bare forward (in memory)':<28}{n / t_forward:>8.1f}{1.0:>8.2f}x")
    print(f"{'predict, centre crop':<28}{n / t_none:>8.1f}{centre_ratio:>8.3f}x of forward (target >= 0.9x)")
    print(f"{'predict, 10-crop':<28}{n / t_ten:>8.1f}{ten_ratio:>8.2f}x  time of centre crop (target <= 10x)")
    print(f"{'predict, start-up (1 image)':<28}{t_start * 1000:>7.0f} ms")
    print("per round (forward / centre, 10-crop / centre):",
          ", ".join(f"{f / c:.3f} {t / c:.2f}" for f, c, t, _ in rounds))

if __name__ == "__main__":
    import publish

    publish.run(main, "predict")
