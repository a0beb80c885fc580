"""The bad-input corpus, run through the real CLI: nothing the user has is destroyed, no input leaves a
folder behind, and every refusal is one line that names the file or flag, with exit status 2.

Each case checks: the exit status, a message naming the file or flag, no Python traceback, no output
folder left behind, and the inputs (and any earlier run) byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.badinput import photo_tree
from tests.conftest import TINY
from toolkit.cli.main import main
from toolkit.core import outputs, runs


def digest(path: Path) -> str:
    """One hash over every file below ``path`` (names and bytes), or of the file itself."""
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for p in items:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    return code, err


def unfinished(run: Path) -> Path:
    """Make a finished run look interrupted after the head's first epoch."""
    state = json.loads((run / "state.json").read_text())
    state.pop("finished")
    state["head"].update(done=False, epochs_done=1, wait=0)
    (run / "state.json").write_text(json.dumps(state))
    return run


# ----------------------------------------------------------------------------- data loss


def test_overwrite_refuses_an_out_that_is_the_data(tmp_path, capsys):
    victim = photo_tree(tmp_path / "victim", 4)
    before = digest(victim)
    code, err = run_cli(capsys, "finetune", "--data", victim, "--out", victim, "--overwrite", *TINY)
    assert code == 2 and "--out" in err and "same path as --data" in err
    assert digest(victim) == before
    # inside the data, or holding it
    code, err = run_cli(capsys, "finetune", "--data", victim, "--out", victim / "a" / "run", *TINY)
    assert code == 2 and "lies inside --data" in err and not (victim / "a" / "run").exists()
    code, err = run_cli(capsys, "finetune", "--data", victim, "--out", tmp_path, "--overwrite", *TINY)
    assert code == 2 and "contains --data" in err
    assert digest(victim) == before


def test_export_and_evaluate_refuse_to_write_into_the_run(trained, run_copy, capsys, tmp_path):
    data, _ = trained
    before = digest(run_copy)
    code, err = run_cli(capsys, "export", "--model", run_copy, "--format", "savedmodel", "--out", run_copy, "--overwrite")
    assert code == 2 and "same path as --model" in err
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", run_copy, "--overwrite")
    assert code == 2 and "same path as --model" in err
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", data / "eval")
    assert code == 2 and "lies inside --data" in err and not (data / "eval").exists()
    assert digest(run_copy) == before


def test_overwrite_replaces_only_what_toolkit_wrote(trained, run_copy, capsys, tmp_path):
    data, _ = trained
    own = tmp_path / "mine"
    own.mkdir()
    (own / "thesis.tex").write_text("years of work")
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", own, "--overwrite")
    assert code == 2 and "not created by toolkit" in err and (own / "thesis.tex").read_text() == "years of work"

    out = tmp_path / "eval"
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out)[0] == 0
    assert outputs.marker_kind(out) == "evaluation"
    (out / "notes.txt").write_text("mine")  # a file of the user's inside a toolkit folder
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out, "--overwrite")
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").is_file()
    (out / "notes.txt").unlink()
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out, "--overwrite")[0] == 0
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*old*"))


def test_a_failed_overwrite_leaves_the_old_folder_intact(trained, run_copy, capsys, tmp_path):
    data, _ = trained
    out = tmp_path / "eval"
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out)[0] == 0
    before = digest(out)
    other = photo_tree(tmp_path / "other", 3, classes=("a", "zebra"))  # a class the model does not know
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", other, "--out", out, "--overwrite")
    assert code == 2 and "zebra" in err
    assert digest(out) == before and not list(tmp_path.glob(".eval*"))


def test_finetune_overwrite_trains_beside_the_old_run_and_swaps_at_the_end(trained, run_copy, capsys):
    data, _ = trained
    assert run_cli(capsys, "finetune", "--data", data, "--out", run_copy, "--overwrite", *TINY, "--seed", "5")[0] == 0
    recipe = (run_copy / "recipe.toml").read_text()
    assert "seed = 5" in recipe and f'data = "{data.resolve()}"' in recipe  # absolute data path
    assert json.loads((run_copy / "state.json").read_text())["finished"] is True
    assert not list(run_copy.parent.glob(".run.*"))


# ----------------------------------------------------------------------------- crashes and hangs


def test_named_pipes_and_broken_links_are_error_rows_not_hangs(trained, run_copy, capsys, tmp_path):
    from toolkit.data.verify import verify_files

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    done: list = []
    worker = threading.Thread(target=lambda: done.append(verify_files([str(fifo)])), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert done, "verifying a named pipe did not return within 5 s"
    assert "named pipe" in done[0][0].reason

    out = tmp_path / "pred.csv"
    start = time.perf_counter()
    code, _ = run_cli(capsys, "predict", "--model", run_copy, "--images", fifo, tmp_path / "dangling.jpg",
                      trained[0] / "a" / "0.jpg", "--out", out)
    assert code == 0 and time.perf_counter() - start < 60
    rows = {Path(r.split(",")[0]).name: r for r in out.read_text().splitlines()[1:]}
    assert "named pipe" in rows["fifo.jpg"] and "does not exist" in rows["dangling.jpg"]


def test_predict_output_checks(trained, run_copy, capsys, tmp_path):
    data, _ = trained
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", data, "--out", folder, "--overwrite")
    assert code == 2 and "is a folder" in err
    mine = tmp_path / "mine.csv"
    mine.write_text("name,score\nx,1\n")
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", data, "--out", mine, "--overwrite")
    assert code == 2 and "not a predictions CSV" in err and mine.read_text() == "name,score\nx,1\n"
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", data, "--out", data / "p.csv")
    assert code == 2 and "lies inside --images" in err and not (data / "p.csv").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", empty, "--out", tmp_path / "p.csv")
    assert code == 2 and "No image files found" in err and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("layout", ["one-per-class", "empty-val", "val-missing-a-class"])
def test_splits_without_a_validation_image_per_class_are_refused_before_any_folder(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout == "one-per-class":
        photo_tree(data, 1)
        fragment = "only 1 usable image"
    elif layout == "empty-val":
        photo_tree(data / "train", 4)
        (data / "val").mkdir()
        fragment = str(data / "val")
    else:
        photo_tree(data / "train", 4)
        photo_tree(data / "val", 2, classes=("a",))
        fragment = "['b']"
    before = digest(data)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", out, *TINY)
    assert code == 2 and fragment in err, err
    assert not out.exists() and digest(data) == before


@pytest.mark.parametrize("flags, fragment", [
    (["--val-fraction", "0"], "val_fraction must be in (0, 1)"),
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295] (2**32 - 1). Received: seed=-1"),
    (["--head-lr", "inf"], "head_lr must be a finite number"),
    (["--head-lr", "nan"], "head_lr must be a finite number"),
])
def test_bad_settings_are_refused_before_any_folder(tmp_path, capsys, flags, fragment):
    data = photo_tree(tmp_path / "data", 4)
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "run", *TINY, *flags)
    assert code == 2 and fragment in err, err
    assert not (tmp_path / "run").exists()


def test_unusable_classes_are_named_with_their_files(tmp_path, capsys):
    data = photo_tree(tmp_path / "data", 4, classes=("good",))
    (data / "bad").mkdir()
    for i in range(3):
        (data / "bad" / f"{i}.jpg").write_bytes(b"<html>404</html>")
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "run", *TINY)
    assert code == 2 and "every image of ['bad'] is unusable" in err and str(data / "bad" / "0.jpg") in err
    assert not (tmp_path / "run").exists()
    assert run_cli(capsys, "inspect", "--data", data)[0] == 2  # after its report (next test)


def test_inspect_reports_the_problems_before_saying_it_cannot_train(tmp_path, capsys):
    data = photo_tree(tmp_path / "data", 4, classes=("good",))
    (data / "bad").mkdir()
    (data / "bad" / "0.jpg").write_bytes(b"<html>404</html>")
    assert main(["inspect", "--data", str(data)]) == 2
    out = capsys.readouterr().out
    assert str(data / "bad" / "0.jpg") in out and "HTML" in out and "cannot train on this data" in out


def test_data_that_is_a_file_is_named_as_such(tmp_path, capsys):
    text = tmp_path / "afile.txt"
    text.write_text("hello")
    code, err = run_cli(capsys, "finetune", "--data", text, "--out", tmp_path / "run")
    assert code == 2 and "is a file, not a folder or a .csv manifest" in err and not (tmp_path / "run").exists()


def test_classes_json_must_match_the_model(run_copy, capsys, tmp_path):
    images = photo_tree(tmp_path / "imgs", 1)
    for names in ([], ["a", "b", "c"], {"a": 1}):
        (run_copy / "classes.json").write_text(json.dumps(names))
        code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv")
        assert code == 2 and "classes.json" in err, err
    (run_copy / "classes.json").write_text("[not json")
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv")
    assert code == 2 and "classes.json is corrupt" in err
    assert not (tmp_path / "p.csv").exists()


def test_damaged_and_unsafe_model_files_are_user_errors(run_copy, capsys, tmp_path):
    import keras

    images = photo_tree(tmp_path / "imgs", 1)
    model = run_copy / "model.keras"
    model.write_bytes(model.read_bytes()[:2000])
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv")
    assert code == 2 and "model.keras: not loaded" in err and "truncated or corrupt" in err

    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    evil = keras.layers.Lambda(lambda x: __import__("os").system("echo pwned") * 0 + x)(pooled)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(evil)).save(model)
    code, err = run_cli(capsys, "explain", "--model", run_copy, "--images", images, "--out", tmp_path / "cams")
    assert code == 2 and "safe mode refuses" in err and not (tmp_path / "cams").exists()


def test_explain_file_names_stay_inside_out(run_copy, capsys, tmp_path):
    (run_copy / "classes.json").write_text(json.dumps(["../../ESCAPED", "b"]))
    images = photo_tree(tmp_path / "imgs", 1)
    out = tmp_path / "deep" / "cams"
    code, _ = run_cli(capsys, "explain", "--model", run_copy, "--images", images, "--out", out, "--class", "../../ESCAPED")
    assert code == 0
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(written) == 2 and all("ESCAPED" in n for n in written)  # a/0.jpg and b/0.jpg: two files
    assert all(p.parent == out for p in tmp_path.rglob("*ESCAPED*"))


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_other_flags(run_copy, capsys):
    unfinished(run_copy)
    before = digest(run_copy)
    code, err = run_cli(capsys, "finetune", "--resume", run_copy, "--head-epochs", "7", "--out", "elsewhere")
    assert code == 2 and "--head-epochs" in err and "--out" in err
    assert digest(run_copy) == before


def test_resume_refuses_changed_classes_and_a_held_lock(trained, run_copy, capsys, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    recipe = (run_copy / "recipe.toml").read_text().replace(str(trained[0].resolve()), str(data))
    (run_copy / "recipe.toml").write_text(recipe)
    unfinished(run_copy)
    photo_tree(data, 3, classes=("c",))
    before = digest(run_copy)
    code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "added ['c']" in err and digest(run_copy) == before
    shutil.rmtree(data / "c")
    with runs.locked(run_copy):
        code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "in use by another toolkit process" in err


def test_resume_names_missing_and_damaged_files(run_copy, capsys):
    unfinished(run_copy)
    state = (run_copy / "state.json").read_text()
    (run_copy / "state.json").write_text("{truncated")
    code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "state.json is corrupt" in err
    (run_copy / "state.json").unlink()
    code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "state.json is missing" in err and "head.best.weights.h5" in err
    (run_copy / "state.json").write_text(state)
    last = run_copy / "head.last.weights.h5"
    last.write_bytes(last.read_bytes()[:100])
    code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "head.last.weights.h5 cannot be read" in err


def test_resume_recomputes_a_corrupt_feature_cache_from_another_directory(run_copy, capsys, tmp_path, monkeypatch,
                                                                          caplog):
    unfinished(run_copy)
    cache = run_copy / "cache" / "features.npz"
    cache.write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.chdir(tmp_path)  # the recorded data path is absolute
    code, _ = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 0 and "unreadable" in caplog.text and "computing it again" in caplog.text
    assert json.loads((run_copy / "state.json").read_text())["finished"] is True
    np.load(cache)["train_x"]  # rewritten whole


# ----------------------------------------------------------------------------- smaller


def test_csv_rows_that_disagree_on_a_label_are_skipped(tmp_path):
    from toolkit.data.datasets import load_splits

    data = photo_tree(tmp_path / "imgs", 4)
    rows = ["path,label"] + [f"imgs/{c}/{i}.jpg,{c}" for c in "ab" for i in range(4)] + ["imgs/a/0.jpg,b"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits(tmp_path / "m.csv")
    assert str(data / "a" / "0.jpg") not in splits.train.paths + splits.val.paths
    assert any("listed twice" in p.reason and "different labels" in p.reason for p in splits.skipped())


def test_links_pipes_and_odd_folders_are_listed_not_followed(tmp_path):
    from toolkit.data.datasets import load_splits

    data = photo_tree(tmp_path / "data", 4)
    (data / "zloop").symlink_to(data)
    (data / "a" / "back").symlink_to(data)
    (data / "a" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    os.mkfifo(data / "b" / "pipe.jpg")
    (data / "b" / "folder.jpg").mkdir()
    splits = load_splits(data)
    assert splits.class_names == ("a", "b")
    assert len(splits.train) + len(splits.val) == 8
    reasons = {Path(p.path).name: p.reason for p in splits.problems}
    assert "loop" in reasons["zloop"] and "loop" in reasons["back"]
    assert "does not exist" in reasons["gone.jpg"] and "named pipe" in reasons["pipe.jpg"]
    assert "folder named like an image" in reasons["folder.jpg"]


def test_markdown_tables_survive_odd_file_names():
    from toolkit.train.report import markdown_cell

    row = f"| {markdown_cell('a|b' + chr(10) + 'c.jpg', code=True)} | {markdown_cell('x|y')} |"
    assert "\n" not in row and row.count("|") - row.count("\\|") == 3


def test_few_training_images_warn(tmp_path):
    from toolkit.data.datasets import check_trainable, load_splits

    data = photo_tree(tmp_path / "data", 6)
    assert check_trainable(load_splits(data, val_fraction=0.2)) == []
    warnings = check_trainable(load_splits(data, val_fraction=0.99))
    assert warnings and "fewer than 5 per class" in warnings[0]


@pytest.mark.slow
def test_explain_on_an_extreme_aspect_ratio_stays_within_memory(run_copy, tmp_path):
    """A 20000x100 JPEG: the whole-image view is held to a pixel budget (measured: the peak RSS of the process).

    The peak is /proc's VmHWM of the process's own memory. Not ru_maxrss: Linux carries it over from the forked
    copy of the parent across exec, so in a long test session it reports pytest's own size."""
    recipe = run_copy / "recipe.toml"  # the default 224 px input (the head is fully convolutional)
    recipe.write_text(recipe.read_text().replace("image_size = 64", "image_size = 224"))
    row = np.linspace(0, 255, 20000, dtype=np.uint8)
    Image.fromarray(np.broadcast_to(row[None, :, None], (100, 20000, 3)).copy()).save(tmp_path / "wide.jpg")
    code = ("import re, sys; from toolkit.cli.main import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "explain", "--model", str(run_copy), "--images",
                           str(tmp_path / "wide.jpg"), "--out", str(tmp_path / "cams")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    maxrss_gb = int(done.stdout.split("maxrss_kb")[1].split()[0]) / 2**20
    assert 0.3 < maxrss_gb < 3.0, maxrss_gb


def test_evaluate_summary_names_what_it_counted(trained, run_copy, capsys, tmp_path):
    data, _ = trained
    assert main(["evaluate", "--model", str(run_copy), "--data", str(data), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "on 12 images (all of --data)" in out, out
