"""The console entry point and the finetune job end to end on real images."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import keras
import numpy as np
import pytest

from tests.browser import rendered
from toolkit.cli.main import build_parser, main


def test_help_of_every_subcommand_is_complete():
    parser = build_parser()
    top = parser.format_help()
    for command in ("finetune", "backbones", "inspect"):
        assert command in top
    finetune_help = subprocess.run(
        [sys.executable, "-m", "toolkit.cli.main", "finetune", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--data", "--recipe", "--backbone", "--weights", "--freeze", "--head-epochs", "--finetune-epochs",
                 "--seed", "--out", "--overwrite", "--resume", "--min-accuracy", "--mixed-precision", "--val-fraction"):
        assert flag in finetune_help


def test_help_defaults_are_the_values_a_run_without_flags_records(tmp_path):
    """Each setting's "(default: X)" in `finetune --help` equals its value in the recipe.toml that a run started
    with no flags writes (the default recipe over the fields' own defaults), for every setting."""
    import argparse

    from toolkit.cli.flags import setting_keys
    from toolkit.config.recipes import build_config, config_to_dict
    from toolkit.core import runs
    from toolkit.train.run_state import prepare_config

    finetune = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["finetune"]
    shown = {}
    for action in finetune._actions:
        text = action.help or ""
        if action.dest in setting_keys() and "(default: " in text:
            shown[action.dest] = text[text.rfind("(default: ") + len("(default: "):].removesuffix(")")
    data = tmp_path / "data"
    data.mkdir()
    recorded = tomllib.loads(runs.to_toml(config_to_dict(prepare_config(build_config(None, {"data": str(data)})))))
    flat = {k: v for k, v in recorded.items() if k != "augment"} | {f"augment.{k}": v for k, v in recorded["augment"].items()}
    as_shown = {k: repr(tuple(v) if isinstance(v, list) else v) for k, v in flat.items() if k in shown}
    assert shown == as_shown
    assert {"head_lr", "finetune_epochs", "early_stopping_patience", "cache_views", "augment.crop_ratio"} <= set(shown)
    assert len(shown) >= len(setting_keys()) - 6  # only empty or unset values show no default (data, fold, ...)


def test_backbones_table_lists_every_backbone(capsys):
    from toolkit import backbones

    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in backbones.names():
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("mobilenet_v2 "))
    assert "2.3M" in row and "224" in row and "71.9" in row and "yes" in row


def test_inspect_prints_statistics_and_problems(sample_data, capsys):
    assert main(["inspect", "--data", str(sample_data)]) == 0
    out = capsys.readouterr().out
    assert "classes: 4" in out and "imbalance ratio" in out and "circle" in out and "problems: 0 files skipped" in out
    assert "freeze plan for --freeze auto with mobilenet_v2: auto:" in out and "head only; 0 of 7 stages" in out


def test_bad_arguments_exit_2_with_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--data", str(tmp_path / "missing")]) == 2
    assert "Data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder left behind
    assert main(["finetune", "--data", str(tmp_path), "--backbone", "resnet5"]) == 2
    assert "Did you mean 'resnet50'" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_trains_on_real_images_and_writes_a_loadable_run(sample_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(sample_data), "--head-epochs", "6", "--batch-size", "16",
            "--image-size", "160", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_accuracy"] >= 0.5, metrics  # 4 classes: chance is 0.25
    low, high = metrics["val_accuracy_ci95"]  # every accuracy with its uncertainty
    assert low < metrics["val_accuracy"] <= high and high - low > 0.05
    printed = capsys.readouterr().out  # --cv auto: this head-only run on data without a val split cross-validates
    assert f"(95% CI {low:.2f}–{high:.2f})" in printed and f"over {metrics['n_val']} images" in printed
    assert set(metrics["per_class_accuracy"]) == {"circle", "square", "star", "triangle"}
    config = tomllib.loads((out / "recipe.toml").read_text())
    assert config["backbone"] == "mobilenet_v2" and config["image_size"] == 160 and config["head_epochs"] == 6
    assert config["augment"]["colour_shift"] == 20.0
    assert json.loads((out / "classes.json").read_text()) == ["circle", "square", "star", "triangle"]
    assert (out / "history.csv").read_text().startswith("stage,epoch,")
    for name in ("pca.json", "data.json", "report.md", "curves.png", "classes.json"):
        assert (out / name).is_file(), name

    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 160, 160, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    heads = json.loads((out / "metrics.json").read_text())["cv"]["heads"]  # --cv auto: K x repeats fold heads
    assert model.get_layer("class_maps").output.shape[-1] == 4 * heads

    # A second run into the same folder is refused, and nothing there is touched.
    before = (out / "model.keras").stat().st_mtime_ns
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.keras").stat().st_mtime_ns == before


def test_help_and_argument_errors_do_not_import_tensorflow():
    """`toolkit --help`, each command's --help and a bad flag: no TensorFlow import, no C++ log line."""
    code = ("import sys; from toolkit.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TF_LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'TF_ABSENT')")
    for argv in (["--help"], ["finetune", "--help"], ["predict", "--help"], ["inspect", "--help"],
                 ["finetune", "--data", "x", "--head-epoks", "3"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert "TF_ABSENT" in done.stdout, (argv, done.stdout[-300:])
        assert "I0000" not in done.stderr and "oneDNN" not in done.stderr, done.stderr
    assert "did you mean --head-epochs?" in done.stderr


def test_every_setting_is_a_flag_and_set_takes_dotted_keys():
    import dataclasses

    from toolkit.cli.flags import parse_set, setting_keys
    from toolkit.config.settings import FinetuneConfig

    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    for key in setting_keys():
        flag = "--" + key.replace("_", "-")
        assert flag in help_text, flag
    assert "--augment.pca-sigma" in help_text and "--epochs" in help_text and "--lr" in help_text
    assert len(setting_keys()) == len(dataclasses.fields(FinetuneConfig)) - 1 + 7  # augment's 7 fields
    assert parse_set(["augment.pca_sigma=0.2", "augment.flip=false", "backbone=efficientnet_lite0",
                      "augment.crop_scale=[0.5, 1.0]"]) == {"augment.pca_sigma": 0.2, "augment.flip": False,
                                                            "backbone": "efficientnet_lite0",
                                                            "augment.crop_scale": [0.5, 1.0]}
    with pytest.raises(ValueError, match="unknown key 'augment.pca_sigm'. Did you mean 'augment.pca_sigma'"):
        parse_set(["augment.pca_sigm=0.2"])


@pytest.mark.slow
def test_set_epochs_and_lr_reach_the_run_recipe(sample_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "finetune", "--data", str(sample_data), "--epochs", "1", "--set", "augment.pca_sigma=0.2",
                 "--lr", "0.002", "--img-size", "64", "--no-augment.flip", "--out", str(out)]) == 0
    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert recipe["augment"]["pca_sigma"] == 0.2 and recipe["augment"]["flip"] is False
    assert recipe["head_epochs"] == 1 and recipe["finetune_epochs"] == 1 and recipe["image_size"] == 64
    assert recipe["head_lr"] == 0.002 and recipe["finetune_lr"] == pytest.approx(0.002 * 1e-4 / 5e-4)  # quick's ratio
    assert capsys.readouterr().err.count("INFO") == 0  # -q: warnings and the result only
    # report.html: one self-contained page, every image embedded
    from html.parser import HTMLParser

    class Images(HTMLParser):
        sources: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.append(dict(attrs)["src"])

    parser = Images()
    parser.feed((out / "report.html").read_text())
    figures = [s for s in parser.sources if s.startswith("data:image/png;base64,")]
    assert len(figures) == 3 and all(s.startswith("data:image/") for s in parser.sources)
    import base64

    for src in figures:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    dom = rendered(out / "report.html", {"data", "problems", "training", "metrics", "confusion", "calibration",
                                         "mistakes", "audit", "timings"}, tmp_path)  # one epoch: curves of points
    assert "fitted on the out-of-fold predictions of every image" in dom
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_without_tensorboard_one_info_line_says_so_and_how_to_get_it(monkeypatch, caplog):
    import logging

    from toolkit.train.run_state import Stage
    from toolkit.train.stages import tensorboard_callbacks

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert tensorboard_callbacks(None, Stage.HEAD) == [] and tensorboard_callbacks(None, Stage.FINETUNE) == []
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == ['no tensorboard/ in the run folder: TensorBoard logs need the tensorboard package (pip install '
                    '"toolkit-finetune[tensorboard]")']  # once per run: stage 2 does not repeat it


def test_a_mistyped_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--head-epoks", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: toolkit finetune") and "did you mean --head-epochs?" in err


def test_one_image_and_no_tta_are_worded_as_such(trained, tmp_path, capsys, caplog):
    import logging

    data, run = trained
    assert main(["predict", "--model", str(run), "--images", str(data / "a" / "0.jpg"), "--out",
                 str(tmp_path / "p.csv"), "-q"]) == 0
    assert capsys.readouterr().out.startswith("1 image predicted, 0 unreadable")
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert main(["evaluate", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    assert "(all; no TTA)" in caplog.text
