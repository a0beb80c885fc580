"""``toolkit export``: a trained model as TensorFlow SavedModel, TFLite or ONNX.

Every format takes what the Keras model takes: raw RGB float32 in [0, 255],
(batch, size, size, 3), preprocessing inside; the output is the class
probabilities with the run's temperature applied, so an exported model gives
what ``toolkit predict`` gives for the centre crop. A multi-label run's gives each
label's probability with its own temperature for the whole image resized to the
input size (``predict --tta none``), and ``thresholds.json`` beside it holds the
thresholds. The fully convolutional classifier is exported at the run's input
size or at ``--image-size``. The exported file and a ``classes.json`` go into ``--out``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from toolkit.core import outputs, runs
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)
FORMATS = ("savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx")
FILE_NAMES = {"savedmodel": "savedmodel", "tflite": "model.tflite", "tflite-fp16": "model-fp16.tflite",
              "tflite-int8": "model-int8.tflite", "onnx": "model.onnx"}


EXPORT_REPORT = "export.json"


class ExportUnavailableError(UserError):
    pass


def deployable_model(member, size: int):
    """The whole predictor as one model: a fully specified input (what the converters want), the
    classifier, and the run's temperature (softmax(log p / T), as :func:`toolkit.predict.calibration.apply_temperature`)."""
    import keras

    from toolkit.predict.calibration import EPS

    inputs = keras.Input((size, size, 3), batch_size=None, name="image")
    probs = member.model(inputs)
    if member.multi_label:  # one temperature per label: sigmoid(logit(p) / T), as label_calibration applies it
        from toolkit.predict.label_calibration import EPS as LABEL_EPS

        p = keras.ops.clip(probs, LABEL_EPS, 1.0 - LABEL_EPS)
        temperatures = keras.ops.convert_to_tensor(member.labels.temperatures.astype("float32"))
        probs = keras.ops.sigmoid((keras.ops.log(p) - keras.ops.log(1.0 - p)) / temperatures)  # no Log1p in ONNX
    elif member.temperature != 1.0:
        logits = keras.ops.log(keras.ops.clip(probs, EPS, 1.0)) / member.temperature
        probs = keras.ops.softmax(logits, axis=-1)
    return keras.Model(inputs, probs, name="classifier")


def export(model: str, fmt: str, out: str | Path, overwrite: bool = False, image_size: int | None = None,
           data: str | Path | None = None) -> Path:
    """Write ``model`` in format ``fmt`` into the folder ``out``; quantized formats also measure themselves on the
    run's validation images or on ``data`` (``export.json``, :mod:`toolkit.deploy.quantize`)."""
    from toolkit.predict.members import load_member

    if fmt not in FORMATS:
        raise UserError(f"Unknown export format. Received: format={fmt!r}; allowed: {', '.join(FORMATS)}")
    inputs = {"--model": [model]} | ({"--data": [data]} if data else {})
    outputs.check_output_dir(out, overwrite, "export", inputs)
    if fmt == "onnx":
        try:
            import tf2onnx  # noqa: F401
        except ImportError as exc:
            raise ExportUnavailableError(
                'ONNX export needs tf2onnx and onnx: pip install "toolkit-finetune[onnx]" (also installs onnxruntime to run '
                f"the file). They are not installed here ({exc}).") from None
    if image_size is not None:
        from toolkit.config.settings import check_image_size

        check_image_size(image_size, "--image-size")
    member = load_member(model)
    if image_size and member.fixed_size and image_size != member.fixed_size:
        raise UserError(f"--image-size {image_size}: {model} takes only {member.fixed_size} px images (its backbone's "
                        f"position embeddings are fixed); leave --image-size out")
    if member.multi_label and fmt.startswith("tflite-"):
        raise UserError(f"--format {fmt}: a quantized export measures its accuracy against the float model on "
                        f"single-label data; {model} is a multi-label run. Use savedmodel, tflite or onnx")
    size = image_size or member.image_size
    measure_on = _measurement_data(model, data) if fmt.startswith("tflite-") else None
    keras_model = deployable_model(member, size)
    with outputs.output_dir(out, overwrite, "export", inputs) as stage:
        runs.write_json(stage / runs.CLASSES_FILE, list(member.class_names))
        if member.multi_label:  # what each label's probability is compared with
            runs.write_json(stage / runs.THRESHOLDS_FILE, {"thresholds": dict(zip(member.class_names, map(
                float, member.labels.thresholds)))})
        target = stage / FILE_NAMES[fmt]
        if fmt == "savedmodel":
            _export_savedmodel(keras_model, target)
        elif fmt.startswith("tflite"):
            _export_tflite(keras_model, fmt, target, member, size, measure_on)
        else:
            with runs.atomic_path(target) as tmp_file:
                _export_onnx(keras_model, size, tmp_file)
    target = Path(out) / FILE_NAMES[fmt]
    logger.info("export: %s written to %s", fmt, target)
    return target


def _measurement_data(model: str | Path, data: str | Path | None):
    """(training split for int8 calibration, split to measure on, what it is) of the run, checked before any
    folder is made."""
    from toolkit.config.recipes import load_config
    from toolkit.train.run_state import load_checked_splits

    config = load_config(Path(model) / runs.RECIPE_FILE)
    try:
        splits = load_checked_splits(config, progress=False)
    except UserError as exc:
        raise UserError(f"a quantized export calibrates on the run's training images and measures itself on its "
                        f"validation images, but its --data cannot be read ({exc})") from None
    if data is None:
        cv = (Path(model) / runs.METRICS_FILE).is_file() and "cv" in runs.read_json(Path(model) / runs.METRICS_FILE, "")
        what = "the run's validation split" + (" (the cross-validated model also trained on these images: pass "
                                                "--data with held-out images for an unbiased accuracy)" if cv else "")
        return splits.train, splits.val, what
    from toolkit.predict.evaluate import evaluation_split

    split, _, which = evaluation_split(data)
    return splits.train, split, f"{data} ({which})"


def _export_tflite(keras_model, fmt: str, target: Path, member, size: int, measure_on) -> None:
    """A TFLite file; a quantized one with its measurement beside it (export.json)."""
    from toolkit.deploy import quantize

    kind = fmt.split("-", 1)[1] if "-" in fmt else "float"
    with tempfile.TemporaryDirectory() as tmp:
        _export_savedmodel(keras_model, Path(tmp) / "sm")
        float_bytes = quantize.converter(Path(tmp) / "sm", "float").convert()
        flat, calibration = float_bytes, None
        if kind == "fp16":
            flat = quantize.converter(Path(tmp) / "sm", kind).convert()
        elif kind == "int8":
            flat, calibration = quantize.calibrated_int8(Path(tmp) / "sm", float_bytes, measure_on[0], size,
                                                         member.crop_fraction)
    with runs.atomic_path(target) as tmp_file:
        tmp_file.write_bytes(flat)
    if kind != "float":
        import numpy as np

        _, evaluated, what = measure_on
        images, labels = quantize.evaluation_images(evaluated, size, member.crop_fraction)
        report = quantize.measure(float_bytes, flat, kind, images, np.asarray(labels), what, calibration)
        runs.write_json(target.parent / EXPORT_REPORT, report)


def _export_onnx(keras_model, size: int, target: Path) -> None:
    """The classifier as ONNX with one input, ``image``.

    Keras' own ``export(format="onnx")`` left the preprocessing layer's mean and variance as extra
    graph inputs, which onnxruntime then demands. Freezing the traced function first turns every
    variable into a constant (what tf2onnx does for a SavedModel), so the image is the only input.
    """
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((None, size, size, 3), tf.float32, name="image")
    concrete = tf.function(lambda image: keras_model(image, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
                                              output_names=[t.name for t in frozen.outputs], opset=17,
                                              custom_op_handlers={"Erfc": (_erfc_as_erf, [])})
    unconverted = sorted({node.op_type for node in proto.graph.node if not node.domain and node.op_type not in
                          _onnx_op_types()})
    if unconverted:
        raise ExportUnavailableError(f"ONNX export: the model holds TensorFlow ops ONNX cannot express "
                                     f"({', '.join(unconverted)}); export it as savedmodel or tflite instead")
    # TensorFlow's tensor names ("image:0") become plain ones, as the other formats have them.
    renamed = {frozen.inputs[0].name: "image", frozen.outputs[0].name: "probabilities"}
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.name = renamed.get(value.name, value.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    target.write_bytes(proto.SerializeToString())


def _erfc_as_erf(ctx, node, name, args) -> None:
    """tf2onnx's handler for TensorFlow's Erfc (the exact GELU of transformer blocks), which ONNX lacks:
    erfc(x) = 1 - erf(x), with ONNX's Erf."""
    import numpy as np
    from tf2onnx import utils

    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=np.float32))
    ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{name}_one_minus"),
                                  inputs=[one.output[0], node.output[0]])


def _onnx_op_types() -> set[str]:
    import onnx.defs

    return {schema.name for schema in onnx.defs.get_all_schemas()}


def _export_savedmodel(keras_model, target: Path) -> None:
    # A SavedModel is a folder: write it beside the target and rename it into place.
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    keras_model.export(str(tmp), format="tf_saved_model", verbose=False)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
