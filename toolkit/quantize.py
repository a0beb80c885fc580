"""Quantized TFLite export (``--format tflite-int8`` / ``tflite-fp16``) that measures itself.

int8 is full-integer quantization: every weight and activation int8, calibrated on a representative
dataset of the run's training images through the evaluation preprocessing (the centre crop); the input
stays raw RGB float32 and the output float32 probabilities (a quantize and a dequantize op at the ends), so
the file is used exactly like the float one. fp16 stores the weights as float16.

After converting, both the float and the quantized model run in the TFLite interpreter on the run's
validation images (or on ``--data``'s evaluation split) and ``export.json`` records their accuracy (with
intervals), their top-1 agreement, both file sizes and single-thread latency per image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from toolkit.uncertainty import accuracy_interval

logger = logging.getLogger(__name__)

REPRESENTATIVE_IMAGES = 200  # calibration images for int8 (the TFLite guide: "a few hundred")
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


def representative_images(split, size: int, crop_fraction: float, seed: int = 0):
    """A generator factory of up to :data:`REPRESENTATIVE_IMAGES` evaluation-preprocessed images of ``split``."""
    from toolkit.pipeline import make_dataset

    rng = np.random.default_rng(seed)
    picked = split.take(np.sort(rng.permutation(len(split))[:REPRESENTATIVE_IMAGES]))

    def generate():
        for images, _ in make_dataset(picked, size, 1, training=False, crop_fraction=crop_fraction):
            yield [images.numpy().astype(np.float32)]

    return generate


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
            measured_on: str) -> dict:
    """export.json: both models' accuracy on ``images``, their agreement, sizes and latency."""
    float_probs, quant_probs = run_tflite(float_bytes, images), run_tflite(quantized_bytes, images)
    out = {"format": f"tflite-{kind}", "measured_on": measured_on, "images": int(len(labels))}
    for name, probs in (("float", float_probs), (kind, quant_probs)):
        correct = probs.argmax(1) == labels
        out[f"{name}_accuracy"] = float(correct.mean())
        out[f"{name}_accuracy_ci95"] = list(accuracy_interval(int(correct.sum()), len(labels)))
    out["top1_agreement"] = float((float_probs.argmax(1) == quant_probs.argmax(1)).mean())
    out["max_probability_difference"] = float(np.abs(float_probs - quant_probs).max())
    out["float_bytes"], out[f"{kind}_bytes"] = len(float_bytes), len(quantized_bytes)
    out["size_ratio"] = len(quantized_bytes) / len(float_bytes)
    out["float_latency_ms"] = latency_ms(float_bytes, images)
    out[f"{kind}_latency_ms"] = latency_ms(quantized_bytes, images)
    drop = out["float_accuracy"] - out[f"{kind}_accuracy"]
    out["accuracy_drop"] = drop
    if drop > MAX_DROP:
        logger.warning("export: %s accuracy %.4f is %.1f points below the float model's %.4f on %d images (%s); check "
                       "it on your own images before deploying it", kind, out[f"{kind}_accuracy"], 100 * drop,
                       out["float_accuracy"], len(labels), measured_on)
    logger.info("export: %s %.4f vs float %.4f accuracy, top-1 agreement %.4f, %.2fx the size, %.1f vs %.1f ms per "
                "image (1 thread), on %d images", kind, out[f"{kind}_accuracy"], out["float_accuracy"],
                out["top1_agreement"], out["size_ratio"], out[f"{kind}_latency_ms"], out["float_latency_ms"], len(labels))
    return out


def evaluation_images(split, size: int, crop_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre crops (what ``predict`` sees without TTA) and labels of ``split``."""
    from toolkit.pipeline import make_dataset

    xs, ys = [], []
    for images, labels in make_dataset(split, size, 32, training=False, crop_fraction=crop_fraction):
        xs.append(images.numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)
