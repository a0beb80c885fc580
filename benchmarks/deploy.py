"""Every export format on clothing-small's test images, side by side in one run.

    python benchmarks/deploy.py [--run RUN] [--json]

Trains (or takes ``--run``) `toolkit finetune --data clothing-small --freeze all` (mobilenet_v2, 224 px,
the data's validation/ split), exports it in every format with `toolkit export`, and runs each file in its
own runtime (TensorFlow for the SavedModel, the TFLite interpreter, onnxruntime) on the centre crops of
the 372 test images. Printed per format: accuracy with its 95 % interval, top-1 agreement with the Keras
model and the largest probability difference, file size, and single-thread latency per image (median
of 20, after a warm-up).
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
FORMATS = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")
TIMED = 20


def toolkit(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "toolkit"), "-q", *args], check=True, cwd=REPO)


def runner(fmt: str, target: Path):
    """A function images -> probabilities for one exported file, in its own runtime, single-threaded."""
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(target)).signatures["serve"]
        return lambda x: next(iter(serve(tf.constant(x)).values())).numpy()
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(target), num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        rows = []
        for image in x:
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            rows.append(interpreter.get_tensor(out["index"])[0])
        return np.stack(rows)

    return run


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="a trained run on clothing-small (default: train one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the shared datasets at {SHARED}")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from toolkit.inference import load_member
    from toolkit.pipeline import eval_image
    from toolkit.datasets import load_splits
    from toolkit.uncertainty import accuracy_interval

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "run"
        if not args.run:
            start = time.perf_counter()
            toolkit("finetune", "--data", str(SHARED / "clothing-small"), "--freeze", "all", "--out", str(run))
            print(f"trained in {time.perf_counter() - start:.0f} s")
        member = load_member(run)
        test = load_splits(SHARED / "clothing-small").test
        x = np.stack([eval_image(tf.io.read_file(p), j, member.image_size, member.crop_fraction).numpy()
                      for p, j in zip(test.decode_paths, test.is_jpeg)]).astype(np.float32)
        labels = np.asarray(test.labels)
        keras_probs = np.asarray(member.model(x, training=False))
        from toolkit.calibration import apply_temperature

        keras_probs = apply_temperature(keras_probs, member.temperature)
        rows = []
        for fmt in FORMATS:
            out = Path(tmp) / fmt
            toolkit("export", "--model", str(run), "--format", fmt, "--out", str(out), "--data",
                    str(SHARED / "clothing-small"))
            target = next(p for p in out.iterdir() if p.name.startswith(("model", "savedmodel")))
            run_file = runner(fmt, target)
            probs = np.concatenate([run_file(x[i:i + 32]) for i in range(0, len(x), 32)])
            times = []
            for image in x[: TIMED + 1]:
                start = time.perf_counter()
                run_file(image[None])
                times.append(time.perf_counter() - start)
            correct = probs.argmax(1) == labels
            low, high = accuracy_interval(int(correct.sum()), len(labels))
            rows.append({"format": fmt, "accuracy": float(correct.mean()), "ci95": [low, high],
                         "agreement": float((probs.argmax(1) == keras_probs.argmax(1)).mean()),
                         "max_diff": float(np.abs(probs - keras_probs).max()), "bytes": size_of(target),
                         "ms": float(np.median(times[1:]) * 1000)})
        keras_correct = keras_probs.argmax(1) == labels
        print(f"\nKeras model: accuracy {keras_correct.mean():.4f} on {len(labels)} test images\n")
        print("| format | accuracy (95% CI) | top-1 agreement with Keras | max prob. difference | size (MB) | "
              "ms per image (1 thread) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['format']} | {r['accuracy']:.4f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}) | {r['agreement']:.4f} | "
                  f"{r['max_diff']:.2g} | {r['bytes'] / 1e6:.1f} | {r['ms']:.1f} |")
        if args.json:
            print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
