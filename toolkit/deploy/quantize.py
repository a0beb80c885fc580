"""Quantized TFLite export (``--format tflite-int8`` / ``tflite-fp16``) that measures itself.

int8 is full-integer quantization: every weight and activation int8, calibrated on a representative
dataset of the run's training images through the evaluation preprocessing (the centre crop), the best of
three draws (:func:`calibrated_int8`); the input
stays raw RGB float32 and the output float32 probabilities (a quantize and a dequantize op at the ends), so
the file is used exactly like the float one. fp16 stores the weights as float16.

After converting, both the float and the quantized model run in the TFLite interpreter on the run's
validation images (or on ``--data``'s evaluation split) and ``export.json`` records their accuracy (with
intervals), the drop from float to quantized with its paired interval, their top-1 agreement, both file sizes
and single-thread latency per image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from toolkit.core.uncertainty import accuracy_interval, describe_change, difference_interval, plural

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 100  # training images per int8 calibration draw (the TFLite guide: "a few hundred")
CALIBRATION_DRAWS = 3  # int8 conversions from disjoint draws; the one closest to the float model is kept
CHECK_IMAGES = 200  # other training images on which the draws are compared with the float model
LATENCY_IMAGES = 20  # images timed one by one, single thread
MAX_DROP = 0.01  # warn when the quantized accuracy is more than this below the float one


def converter(saved_model: Path, kind: str, representative=None):
    """A TFLiteConverter for ``kind`` (``float``, ``fp16`` or ``int8``) of the SavedModel at ``saved_model``."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if kind == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv


def representative_images(split, size: int, crop_fraction: float):
    """A generator factory of ``split``'s evaluation-preprocessed images, one at a time (what calibration wants)."""
    from toolkit.data.pipeline import make_dataset

    def generate():
        for images, _ in make_dataset(split, size, 1, training=False, crop_fraction=crop_fraction):
            yield [images.numpy().astype(np.float32)]

    return generate


def calibration_draws(n: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(check indices, one index array per calibration draw) into ``n`` training images: disjoint where there are
    enough images, otherwise the draws share the images left after the check set, and where those are no more
    than one draw's worth, one draw of them all (identical draws would convert the same model again)."""
    order = np.random.default_rng(seed).permutation(n)
    check, rest = np.sort(order[:min(CHECK_IMAGES, n // 3)]), order[min(CHECK_IMAGES, n // 3):]
    per_draw = min(CALIBRATION_IMAGES, len(rest))
    if per_draw == len(rest):
        return check, [np.sort(rest)]
    if per_draw * CALIBRATION_DRAWS <= len(rest):
        return check, [np.sort(rest[i * per_draw:(i + 1) * per_draw]) for i in range(CALIBRATION_DRAWS)]
    rng = np.random.default_rng(seed + 1)
    return check, [np.sort(rng.permutation(rest)[:per_draw]) for _ in range(CALIBRATION_DRAWS)]


def calibrated_int8(saved_model: Path, float_bytes: bytes, train, size: int, crop_fraction: float,
                    seed: int = 0) -> tuple[bytes, dict]:
    """Full-integer int8 conversions calibrated on :data:`CALIBRATION_DRAWS` draws of training images; the one
    whose probabilities are closest to the float model's (mean KL divergence) on other training images is kept.

    TFLite calibrates each activation's range on the minimum and maximum over the draw, so one unusual image
    widens a range and coarsens it for every other image; the KL on the check images needs no labels. The measured
    result is in docs/benchmarks/deploy-formats.md. Returns the model and what was tried (for ``export.json``)."""
    check_index, draws = calibration_draws(len(train), seed)
    check, _ = evaluation_images(train.take(check_index), size, crop_fraction)
    reference = run_tflite(float_bytes, check)
    tried = []
    for draw in draws:
        flat = converter(saved_model, "int8", representative_images(train.take(draw), size, crop_fraction)).convert()
        probs = run_tflite(flat, check)
        divergence = float(np.mean(np.sum(reference * (np.log(reference + 1e-9) - np.log(probs + 1e-9)), axis=1)))
        tried.append((divergence, float((probs.argmax(1) == reference.argmax(1)).mean()), flat))
    best = int(np.argmin([t[0] for t in tried]))
    logger.info("export: int8 calibrated on %s of %d training images; kept draw %d (KL %s from the float model "
                "on %d other training images)", plural(len(draws), "draw"), len(draws[0]), best + 1,
                " / ".join(f"{t[0]:.4f}" for t in tried), len(check_index))
    report = {"calibration_images": len(draws[0]), "check_images": len(check_index), "chosen_draw": best + 1,
              "draw_kl_divergence": [t[0] for t in tried], "draw_top1_agreement": [t[1] for t in tried]}
    return tried[best][2], report


def run_tflite(model_bytes: bytes, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Probabilities of a TFLite model over ``images`` (N, size, size, 3), one image per call."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model_bytes, num_threads=threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    probs = []
    for image in images:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        probs.append(np.asarray(interpreter.get_tensor(out["index"]), np.float64)[0])
    return np.stack(probs)


def latency_ms(model_bytes: bytes, images: np.ndarray) -> float:
    """Median single-thread milliseconds per image (after one warm-up call)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model_bytes, num_threads=1)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    times = []
    for image in images[: LATENCY_IMAGES + 1]:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:] or times) * 1000)


def measure(float_bytes: bytes, quantized_bytes: bytes, kind: str, images: np.ndarray, labels: np.ndarray,
            measured_on: str, calibration: dict | None = None) -> dict:
    """export.json: both models' accuracy on ``images``, their agreement, sizes and latency."""
    float_probs, quant_probs = run_tflite(float_bytes, images), run_tflite(quantized_bytes, images)
    out = {"format": f"tflite-{kind}", "measured_on": measured_on, "images": int(len(labels))}
    if calibration:
        out["calibration"] = calibration
    correct = {}
    for name, probs in (("float", float_probs), (kind, quant_probs)):
        correct[name] = probs.argmax(1) == labels
        out[f"{name}_accuracy"] = float(correct[name].mean())
        out[f"{name}_accuracy_ci95"] = list(accuracy_interval(int(correct[name].sum()), len(labels)))
    out["top1_agreement"] = float((float_probs.argmax(1) == quant_probs.argmax(1)).mean())
    out["max_probability_difference"] = float(np.abs(float_probs - quant_probs).max())
    out["float_bytes"], out[f"{kind}_bytes"] = len(float_bytes), len(quantized_bytes)
    out["size_ratio"] = len(quantized_bytes) / len(float_bytes)
    out["float_latency_ms"] = latency_ms(float_bytes, images)
    out[f"{kind}_latency_ms"] = latency_ms(quantized_bytes, images)
    drop = out["float_accuracy"] - out[f"{kind}_accuracy"]
    out["accuracy_drop"] = drop
    out["accuracy_drop_ci95"] = list(difference_interval(correct["float"], correct[kind]))  # paired: the same images
    low, high = (100 * v for v in out["accuracy_drop_ci95"])
    if drop > MAX_DROP:
        logger.warning("export: %s accuracy %.4f is %.1f points (95%% CI %.1f to %.1f) below the float model's %.4f on "
                       "%d images (%s); check it on your own images before deploying it", kind,
                       out[f"{kind}_accuracy"], 100 * drop, low, high, out["float_accuracy"], len(labels), measured_on)
    logger.info("export: %s accuracy %.4f vs float %.4f, %s; top-1 agreement %.4f, %.2fx the size, %.1f vs %.1f ms "
                "per image (1 thread), on %d images", kind, out[f"{kind}_accuracy"], out["float_accuracy"],
                describe_change(drop, out["accuracy_drop_ci95"]), out["top1_agreement"], out["size_ratio"],
                out[f"{kind}_latency_ms"], out["float_latency_ms"], len(labels))
    return out


def evaluation_images(split, size: int, crop_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre crops (what ``predict`` sees without TTA) and labels of ``split``."""
    from toolkit.data.pipeline import make_dataset

    xs, ys = [], []
    for images, labels in make_dataset(split, size, 32, training=False, crop_fraction=crop_fraction):
        xs.append(images.numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
