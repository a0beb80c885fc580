"""Backbones the user brings (a keras-hub preset folder, a .keras file): built locally with random weights, no
network. Each trains (cross-validated), predicts, evaluates, exports to ONNX and embeds like a registry backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub", reason="the [hub] extra (keras-hub) is not installed")
import keras  # noqa: E402

from toolkit.cli.main import main  # noqa: E402

RESNET_STAGES = 3  # the tiny ResNet below: 64 px in, halved by the stem's pooling and by stack 2's stride


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    """Three small backbones with random weights: a keras-hub ResNet preset and ViT preset (each with its image
    converter), and a functional .keras convnet that rescales its own pixels."""
    root = tmp_path_factory.mktemp("byo")
    keras.utils.set_random_seed(0)
    resnet = keras_hub.models.ResNetBackbone(  # 64 first filters: the least keras-hub's ResNet accepts
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    resnet.save_to_preset(root / "resnet")
    keras_hub.layers.ResNetImageConverter(image_size=(64, 64), scale=[1 / (255 * s) for s in (0.229, 0.224, 0.225)],
                                          offset=[-m / s for m, s in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))]
                                          ).save_to_preset(root / "resnet")
    vit = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=4, num_heads=2, hidden_dim=16,
                                       mlp_dim=32)
    vit.save_to_preset(root / "vit")
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1).save_to_preset(root / "vit")
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (8, 16, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    keras.Model(inputs, x, name="own_net").save(root / "own.keras")
    return {"resnet": root / "resnet", "vit": root / "vit", "file": root / "own.keras"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from tests.badinput import photo_tree

    return photo_tree(tmp_path_factory.mktemp("byo-data") / "data", 6)


def _images(data: Path) -> list[str]:
    return sorted(str(p) for p in data.rglob("*.jpg"))


@pytest.mark.parametrize("form", ["resnet", "vit", "file"])
def test_a_brought_backbone_trains_predicts_evaluates_exports_and_embeds(presets, photos, tmp_path, form, capsys):
    import onnxruntime
    import pandas as pd
    import tensorflow as tf

    from toolkit.data.pipeline import eval_image
    from toolkit.predict.inference import predict_member
    from toolkit.predict.members import load_member

    run = tmp_path / "run"
    assert main(["finetune", "--data", str(photos), "--out", str(run), "--backbone", str(presets[form]), "--cv", "3",
                 "--cv-repeats", "1", "--head-epochs", "2", "--batch-size", "8", "--freeze", "all"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cv"]["heads"] == 3 and metrics["cv"]["n_images"] == 12
    member = load_member(run)
    size = member.image_size
    assert size == {"resnet": 64, "vit": 32, "file": 224}[form]  # the converter's, the ViT's fixed, the default

    assert main(["predict", "--model", str(run), "--images", str(photos), "--out", str(tmp_path / "p.csv"),
                 "--tta", "flip"]) == 0
    assert pd.read_csv(tmp_path / "p.csv")["label"].isin(["a", "b"]).all()
    assert main(["evaluate", "--model", str(run), "--data", str(photos), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 12
    if form == "vit":  # one input size only: whole-image views are refused in one line, nothing written
        capsys.readouterr()
        for command in (["predict", "--model", str(run)], ["embed", "--model", str(run)]):
            out = tmp_path / "whole.csv"
            assert main([*command, "--images", str(photos), "--out", str(out), "--tta", "full"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "takes only 32x32 images" in err and "--tta none" in err, err
            assert not out.exists()

    # ONNX: the whole predictor, preprocessing inside, gives predict's probabilities
    paths = _images(photos)[:4]
    want = predict_member(member, paths, [True] * 4, "none")
    assert main(["export", "--model", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    x = np.stack([eval_image(tf.io.read_file(p), True, size, member.crop_fraction).numpy() for p in paths])
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], want, atol=1e-4)

    # embed: one row per image, the run's cached centre-crop features
    capsys.readouterr()
    assert main(["embed", "--model", str(run), "--images", str(photos), "--out", str(tmp_path / "e.parquet")]) == 0
    assert "12 images embedded" in capsys.readouterr().out
    frame = pd.read_parquet(tmp_path / "e.parquet").set_index("path")
    folds = pd.read_csv(run / "folds.csv")
    with np.load(run / "cache" / "cv-features.npz") as cached:
        centre = cached["views"][0]
    cached = centre.reshape(len(centre), -1, centre.shape[-1]).mean(axis=1)
    got = frame.loc[[str(Path(p)) for p in folds["path"]]].filter(like="feature_").to_numpy()
    np.testing.assert_allclose(got, cached, atol=1e-5)
    if form == "resnet":  # the API gives the command's rows
        import toolkit

        api = toolkit.load(run).embed(photos).set_index("path")
        np.testing.assert_allclose(api.loc[frame.index].filter(like="feature_").to_numpy(),
                                   frame.filter(like="feature_").to_numpy(), atol=1e-6)


def test_features_and_preprocessing_are_keras_hubs_own(presets):
    """The toolkit's backbone is the preset's backbone behind the preset's image converter, exactly."""
    from toolkit import backbones

    rng = np.random.default_rng(0)
    for form, size in (("resnet", 64), ("vit", 32)):
        hub = keras_hub.models.Backbone.from_preset(str(presets[form]))
        converter = keras_hub.layers.ImageConverter.from_preset(str(presets[form]))
        ours = backbones.create(str(presets[form]), input_shape=(size, size, 3))
        x = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
        pixels = np.asarray(converter(x))
        np.testing.assert_allclose(np.asarray(ours.layers[1](x)), pixels, atol=1e-5)  # the layer after the input
        expected = np.asarray(hub(pixels))
        if form == "vit":  # the class token dropped, the patch tokens as their grid
            expected = expected[:, 1:].reshape(2, 4, 4, -1)
        np.testing.assert_allclose(np.asarray(ours(x)), expected, atol=1e-5)


def test_stages_are_inferred_and_freeze_auto_counts_them(presets, capsys):
    from toolkit import backbones
    from toolkit.train.freeze import plan_freeze

    assert main(["backbones", "--check", str(presets["resnet"])]) == 0
    shown = capsys.readouterr().out
    assert f"{RESNET_STAGES} stages" in shown and "64 px" in shown and "image converter" in shown
    assert len(backbones.get_spec(str(presets["resnet"])).stages) == RESNET_STAGES
    assert len(backbones.get_spec(str(presets["vit"])).stages) == 4  # 4 transformer blocks in 4 groups
    names = [s.name for s in backbones.get_spec(str(presets["resnet"])).stages]
    plan = plan_freeze("auto", 5000, 2, names)  # plenty of images: every stage trains
    assert plan.unfrozen == plan.total == RESNET_STAGES


def test_bad_backbones_are_one_line_and_leave_no_folder(presets, photos, tmp_path, capsys):
    inputs = keras.Input((16, 16, 3))
    keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs)).save(tmp_path / "lambda.keras")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    keras.Model(inputs, pooled).save(tmp_path / "flat.keras")
    (tmp_path / "not_a_preset").mkdir()
    (tmp_path / "not_a_preset" / "notes.txt").write_text("hello")
    keras_hub.models.BertBackbone(vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=8,
                                  max_sequence_length=8).save_to_preset(tmp_path / "bert")
    cases = {
        "not_a_preset": ([str(tmp_path / "not_a_preset")], "config.json"),
        "text": ([str(tmp_path / "bert")], "image"),
        "lambda": ([str(tmp_path / "lambda.keras")], "Lambda"),
        "flat": ([str(tmp_path / "flat.keras")], "spatial"),
        "preprocess": ([str(presets["file"]), "--backbone-preprocess", "sepia"], "sepia"),
    }
    for name, (args, fragment) in cases.items():
        out = tmp_path / f"run-{name}"
        code = main(["finetune", "--data", str(photos), "--out", str(out), "--backbone", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and fragment in err, (name, err)
        assert not out.exists(), name
