"""``toolkit explain``: class-activation maps from the NIN head, for free.

The head's 1x1 conv gives one map per class *before* global average pooling,
so the class score is exactly the mean of its map: the map is the class
activation map (Zhou et al., 2016). The whole image goes through the fully
convolutional network (shorter side resized to size / crop_fraction, aspect
kept), the chosen class's map is upsampled to the image and overlaid.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.backbones.head import CLASS_MAPS
from toolkit.core import outputs, paths, runs
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)


def class_activation_map(member, image: np.ndarray, class_name: str | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(CAM in [0, 1] at the image's resolution, class index, class probabilities) for an RGB uint8 image."""
    import keras
    import tensorflow as tf

    cam_model = keras.Model(member.model.input, [member.model.get_layer(CLASS_MAPS).output, member.model.output])
    from toolkit.predict.inference import whole_image_size

    h, w = image.shape[:2]
    # the whole image at the model's scale; a model of one fixed input size (a ViT) sees it resized to that size
    size = ((member.fixed_size,) * 2 if member.fixed_size else
            whole_image_size((h, w), member.image_size, member.crop_fraction))
    resized = tf.image.resize(tf.convert_to_tensor(image, tf.float32), size)
    maps, probs = cam_model(resized[tf.newaxis], training=False)
    probs = np.asarray(probs)[0]
    if class_name is None:
        index = int(probs.argmax())
    elif class_name in member.class_names:
        index = member.class_names.index(class_name)
    else:
        raise UserError(f"Unknown --class. Received: class={class_name!r}; the model's classes: {list(member.class_names)}")
    maps = np.asarray(maps)[0]
    # A cross-validated model has K heads, K x C maps (head k's at k*C..k*C+C-1): the class's map is their mean.
    cam = maps.reshape(*maps.shape[:2], -1, len(probs)).mean(axis=2)[:, :, index]
    cam = tf.image.resize(cam[..., None], (h, w), method="bilinear").numpy()[..., 0]
    cam = (cam - cam.min()) / max(float(cam.max() - cam.min()), 1e-12)
    return cam, index, probs


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    import matplotlib

    heat = matplotlib.colormaps[COLOUR_MAP](cam)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


COLOUR_MAP = "jet"


def labelled_overlay(image: np.ndarray, cam: np.ndarray, caption: Sequence[str]):
    """The overlay at the image's own resolution, above a band that says what is shown (``caption``: two lines,
    e.g. class and probability, then the file) and the colour scale (low to high activation of this map)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    band = max(44, w // 10)
    canvas = Image.new("RGB", (w, h + band), (255, 255, 255))
    canvas.paste(Image.fromarray(overlay(image, cam)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, band // 3))
    pad = max(3, band // 10)
    scale_w = max(w // 4, int(draw.textlength("low high", font=font)) + pad)
    ramp = (matplotlib.colormaps[COLOUR_MAP](np.linspace(0, 1, scale_w))[:, :3] * 255).astype(np.uint8)
    bar = np.repeat(ramp[None], max(4, band // 5), axis=0)
    x0 = w - scale_w - pad
    canvas.paste(Image.fromarray(bar), (x0, h + pad))
    draw.text((x0, h + pad + bar.shape[0] + 1), "low", fill=(0, 0, 0), font=font)
    draw.text((x0 + scale_w, h + pad + bar.shape[0] + 1), "high", fill=(0, 0, 0), font=font, anchor="ra")
    room = x0 - 2 * pad
    for row, line in enumerate(caption[:2]):
        while draw.textlength(line, font=font) > room and len(line) > 2:
            line = line[:-2] + "…"
        draw.text((pad, h + pad + row * (band - 2 * pad) // 2), line, fill=(0, 0, 0), font=font)
    return canvas


def explained_classes(member, probs: np.ndarray, class_name: str | None) -> list[int]:
    """The classes whose maps are drawn: ``class_name``; else the predicted class, or for a multi-label run every
    label at or above its threshold (the most probable one when none is)."""
    if class_name is not None:
        return [member.class_names.index(class_name)]
    if member.multi_label:
        above = [int(i) for i in np.flatnonzero(probs >= member.labels.thresholds)]
        return above or [int(probs.argmax())]
    return [int(probs.argmax())]


def caption(member, probs: np.ndarray, index: int) -> str:
    line = f"{member.class_names[index]} p={probs[index]:.2f}"
    if member.multi_label and probs[index] < member.labels.thresholds[index]:
        line += f" (below its threshold {member.labels.thresholds[index]:.2f})"
    return line


def safe_file_name(text: str) -> str:
    """``text`` as one harmless file-name part: no separators, no leading dots, never empty."""
    return re.sub(r"[^\w.-]+", "_", text).lstrip(".") or "_"


def explain(model: str, images: Sequence[str], out: str | Path, class_name: str | None = None,
            overwrite: bool = False) -> list[Path]:
    """One CAM overlay per readable image (a multi-label run: one per predicted label) into the folder ``out``,
    labelled below with the class, its probability, the file name and the colour scale. The class explained (the predicted one, or
    ``class_name``) and the probability logged are ``toolkit predict``'s: the calibrated probability of the
    evaluation centre crop; the map itself is of the whole image."""
    from PIL import Image

    from toolkit.data.verify import verify_files
    from toolkit.predict.inference import collect_images, predict_member
    from toolkit.predict.members import load_member

    inputs = {"--model": [model], "--images": list(images)}
    outputs.check_output_dir(out, overwrite, "explain", inputs)
    member = load_member(model)
    if class_name is not None and class_name not in member.class_names:
        raise UserError(f"Unknown --class. Received: class={class_name!r}; the model's classes: {list(member.class_names)}")
    records = verify_files(collect_images(images))
    written = []
    with outputs.output_dir(out, overwrite, "explain", inputs) as stage:
        for record in records:
            if not record.ok:
                logger.warning("explain: skipped %s: %s", record.path, record.reason)
                continue
            probs = predict_member(member, [record.decode_path], [record.is_jpeg])[0]
            with Image.open(record.decode_path) as im:
                image = np.asarray(im.convert("RGB"))
            for index in explained_classes(member, probs, class_name):
                cam, _, _ = class_activation_map(member, image, member.class_names[index])
                name = paths.fit_name(f"{safe_file_name(Path(record.path).stem)}.cam-"
                                        f"{safe_file_name(member.class_names[index])}.png", reserve=8)
                if (stage / name).exists():  # the same file name in two folders
                    name = f"{Path(name).stem}-{len(written) + 1}.png"
                with runs.atomic_path(stage / name) as tmp:
                    labelled_overlay(image, cam, (caption(member, probs, index), Path(record.path).name)).save(
                        tmp, format="PNG")
                logger.info("explain: %s → %s (p=%.3f), %s", record.path, member.class_names[index], probs[index],
                            Path(out) / name)
                written.append(Path(out) / name)
    return written
