"""A run folder is input, not authority: what state.json, ensemble.json, calibration.json, unknown.npz and
recipe.toml say is validated like a flag, and --overwrite replaces only an output of the same kind that holds
nothing but what toolkit wrote, checked again at the moment of the swap.

Every case runs the real CLI and checks the exit status, a message naming the file or flag, no traceback, no
folder left behind, and the bytes of every user file and earlier output before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.badinput import photo_tree
from tests.conftest import TINY, kill_after_epochs
from tests.test_safety import digest, run_cli, unfinished
from toolkit.cli.main import main
from toolkit.core import outputs, paths, runs


def user_folder(path: Path) -> Path:
    """A folder of the user's own: no marker, files that toolkit never wrote."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "sub" / "data.bin").write_bytes(os.urandom(1000))
    return path


def staged_beside(run: Path, target: Path) -> Path:
    """``run`` moved to where an interrupted ``--overwrite`` of ``target`` would have left it."""
    stage = target.with_name(paths.staging_name(target))
    shutil.move(run, stage)
    return stage


# ----------------------------------------------------------------------------- 1-4: nothing is lost


def test_state_json_cannot_name_another_folder_to_replace(run_copy, tmp_path, capsys):
    victim = user_folder(tmp_path / "victim")
    other_run = tmp_path / "other"
    shutil.copytree(run_copy, other_run)
    before = {p: digest(p) for p in (victim, other_run)}
    unfinished(run_copy)
    for replaces in (str(victim), str(other_run), {"name": "victim", "id": "x"}, {"name": "../victim", "id": "x"},
                     {"name": "other", "id": outputs.identity(other_run)}, ["victim"], 7):
        state = json.loads((run_copy / "state.json").read_text()) | {"replaces": replaces}
        (run_copy / "state.json").write_text(json.dumps(state))
        code, err = run_cli(capsys, "finetune", "--resume", run_copy)
        assert code == 2 and "state.json names a folder to replace" in err, (replaces, err)
    assert {p: digest(p) for p in before} == before


def test_a_staged_run_swaps_only_into_the_marked_folder_it_was_made_for(run_copy, tmp_path, capsys):
    victim = user_folder(tmp_path / "victim")
    before = digest(victim)
    unfinished(run_copy)
    stage = staged_beside(run_copy, victim)  # named as victim's staging folder, but victim is the user's
    state = json.loads((stage / "state.json").read_text()) | {"replaces": {"name": "victim", "id": "guessed"}}
    (stage / "state.json").write_text(json.dumps(state))
    code, err = run_cli(capsys, "finetune", "--resume", stage)
    assert code == 2 and "is not the folder this output was started to replace" in err, err
    assert digest(victim) == before and json.loads((stage / "state.json").read_text())["finished"] is True


def test_the_swap_rechecks_the_folder_it_replaces(trained, run_copy, tmp_path, capsys):
    """--overwrite killed mid-run; the user then adds a file to the old run: the swap keeps it, and the next
    --resume, once it is moved out, puts the new run in place."""
    data, _ = trained
    cmd = [sys.executable, "-m", "toolkit.cli.main", "finetune", "--data", str(data), "--out", str(run_copy), "--overwrite",
           "--image-size", "64", "--batch-size", "8", "--freeze", "all", "--head-epochs", "40", "--seed", "4",
           "--cv", "off", "--early-stopping-patience", "40"]
    stage = run_copy.with_name(paths.staging_name(run_copy))
    assert kill_after_epochs(cmd, stage / "state.json", "head", epochs=1) >= 1
    (run_copy / "notes.txt").write_text("mine")
    before = digest(run_copy)
    code, err = run_cli(capsys, "finetune", "--resume", stage)
    assert code == 2 and "notes.txt" in err and f"--resume {stage}" in err, err
    assert digest(run_copy) == before and json.loads((stage / "state.json").read_text())["finished"] is True
    (run_copy / "notes.txt").unlink()
    code, _ = run_cli(capsys, "finetune", "--resume", stage)
    assert code == 0 and not stage.exists() and "seed = 4" in (run_copy / "recipe.toml").read_text()
    assert "replaces" not in json.loads((run_copy / "state.json").read_text())
    assert not list(tmp_path.glob(".*"))


def test_overwrite_replaces_only_an_output_of_the_same_kind(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    before = digest(other)
    code, err = run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", other, "--overwrite")
    assert code == 2 and "holds a toolkit run" in err and "writes an evaluation" in err, err
    evaluation = tmp_path / "eval"
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", evaluation)[0] == 0
    evaluated = digest(evaluation)
    code, err = run_cli(capsys, "export", "--model", run_copy, "--format", "savedmodel", "--out", evaluation,
                        "--overwrite")
    assert code == 2 and "holds a toolkit evaluation" in err and "writes an export" in err
    code, err = run_cli(capsys, "explain", "--model", run_copy, "--images", data / "a" / "0.jpg", "--out", other,
                        "--overwrite")
    assert code == 2 and "holds a toolkit run" in err
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", evaluation, "--overwrite", *TINY)
    assert code == 2 and "holds a toolkit evaluation" in err
    assert digest(other) == before and digest(evaluation) == evaluated


def test_overwrite_looks_inside_the_folders_it_would_delete(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    (run_copy / "cache" / "my-notes.txt").write_text("mine")
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", run_copy, "--overwrite", *TINY)
    assert code == 2 and "cache/my-notes.txt" in err
    (run_copy / "cache" / "my-notes.txt").unlink()
    (run_copy / "link").symlink_to(tmp_path)
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", run_copy, "--overwrite", *TINY)
    assert code == 2 and "(link)" in err
    assert not list(tmp_path.glob(".run*"))


def build_ensemble(run: Path, folder: Path, spec: dict | None = None) -> Path:
    """A finished ensemble of two copies of ``run`` (as `finetune --ensemble` lays one out)."""
    folder.mkdir()
    outputs.mark(folder, "ensemble")
    for name in ("1-m", "2-m"):
        shutil.copytree(run, folder / name)
    runs.write_json(folder / runs.ENSEMBLE_FILE, spec or {"members": ["1-m", "2-m"], "weights": [1.0, 1.0]})
    return folder


def test_ensemble_json_cannot_name_a_folder_to_replace_or_members_outside(trained, tmp_path, capsys):
    data, run = trained
    victim = user_folder(tmp_path / "victim")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run, elsewhere)
    before = {p: digest(p) for p in (victim, elsewhere)}
    ensemble = build_ensemble(run, tmp_path / "ens")
    images = data / "a" / "0.jpg"
    for spec, fragment in [
        ({"members": ["1-m", "2-m"], "replaces": str(victim)}, "names a folder to replace"),
        ({"members": ["1-m", "2-m"], "replaces": {"name": "victim", "id": "x"}}, "names a folder to replace"),
        ({}, "'members' lists"), ([], "'members' lists"), ({"members": []}, "'members' lists"),
        ({"members": ["../elsewhere"]}, "not a sub-folder"), ({"members": [str(elsewhere)]}, "not a sub-folder"),
        ({"members": ["1-m", "1-m"]}, "a member twice"),
        ({"members": ["1-m", "2-m"], "weights": [0, 1]}, "'weights' must be"),
        ({"members": ["1-m", "2-m"], "weights": ["a", 1]}, "'weights' must be"),
        ({"members": ["1-m", "2-m"], "weights": [1]}, "'weights' must be"),
    ]:
        runs.write_json(ensemble / runs.ENSEMBLE_FILE, spec)
        for argv in (["finetune", "--resume", ensemble], ["predict", "--model", ensemble, "--images", images, "--out",
                                                          tmp_path / "p.csv"]):
            code, err = run_cli(capsys, *argv)
            assert code == 2 and "ensemble.json" in err and fragment in err, (spec, err)
    (ensemble / "3-m").symlink_to(elsewhere)
    runs.write_json(ensemble / runs.ENSEMBLE_FILE, {"members": ["1-m", "3-m"]})
    code, err = run_cli(capsys, "predict", "--model", ensemble, "--images", images, "--out", tmp_path / "p.csv")
    assert code == 2 and "not a sub-folder" in err
    assert {p: digest(p) for p in before} == before and not (tmp_path / "p.csv").exists()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_crafted_state_file_loses_a_users_byte(tmp_path, data):
    """Property: whatever state.json says it replaces, and whatever is beside it, resuming's checks (read_state,
    then the swap) never remove or change a file that toolkit did not write."""
    from toolkit.train.run_state import read_state, swap_in

    base = Path(tempfile.mkdtemp(dir=tmp_path))
    user = user_folder(base / "mine")  # unmarked
    marked = base / "theirs"  # a toolkit run holding a file of the user's
    marked.mkdir()
    outputs.mark(marked, "run")
    (marked / "notes.txt").write_text("mine too")
    clean = base / "clean"  # a toolkit run with only toolkit files: the one legitimate target
    clean.mkdir()
    clean_id = outputs.mark(clean, "run")
    (clean / runs.METRICS_FILE).write_text("{}")
    names = ["mine", "theirs", "clean", "absent", "..", ".", "", "mine/sub", "../mine", str(user), "/"]
    target = data.draw(st.sampled_from(["mine", "theirs", "clean", "absent", "x" * 300]))
    stage = base / paths.staging_name(Path(target))
    stage.mkdir()
    outputs.mark(stage, data.draw(st.sampled_from(["run", "ensemble", "evaluation"])))
    name = st.one_of(st.sampled_from(names), st.text(string.printable, max_size=20))
    ident = st.one_of(st.just(clean_id), st.just(outputs.read_marker(marked)["id"]), st.text(max_size=12))
    replaces = data.draw(st.one_of(
        st.fixed_dictionaries({"name": name, "id": ident}), name, st.none(), st.integers(),
        st.dictionaries(st.sampled_from(["name", "id", "path", "kind"]), st.one_of(name, ident, st.integers()))))
    (stage / runs.STATE_FILE).write_text(json.dumps({"finished": True, "replaces": replaces}))
    protected = {p: p.read_bytes() for p in (user / "thesis.tex", user / "sub" / "data.bin", marked / "notes.txt")}
    try:
        state = read_state(stage, resuming=True)
        if state.replaces is not None:
            swap_in(stage, state.replaces, "run")
    except ValueError:  # UserError: refused
        pass
    assert {p: p.read_bytes() for p in protected} == protected


# ----------------------------------------------------------------------------- 5-10: crashes and leftovers


def test_file_names_that_are_not_utf8_are_rows_not_crashes(trained, run_copy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    odd = os.fsdecode(bytes(data / "a") + b"/caf\xe9.jpg")
    shutil.copy(data / "a" / "0.jpg", odd)
    code, _ = run_cli(capsys, "predict", "--model", run_copy, "--images", data, "--out", tmp_path / "p.csv")
    assert code == 0 and "caf\\xe9.jpg,,,,,,,file name is not valid UTF-8" in (tmp_path / "p.csv").read_text()
    assert main(["inspect", "--data", str(data)]) == 0
    assert "caf\\xe9.jpg: file name is not valid UTF-8" in capsys.readouterr().out
    code, _ = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "r", *TINY, "--head-epochs", "1")
    assert code == 0 and "caf\\\\xe9.jpg" in (tmp_path / "r" / runs.DATA_FILE).read_text()


def test_a_file_rewritten_with_the_same_size_and_mtime_is_verified_again(tmp_path):
    from toolkit.data.verify import VerificationCache, verify_files

    data = photo_tree(tmp_path / "data", 1)
    path = data / "a" / "0.jpg"
    cache = tmp_path / "cache"
    assert verify_files([str(path)], VerificationCache(cache))[0].ok
    stat = path.stat()
    path.write_bytes(os.urandom(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    again = verify_files([str(path)], VerificationCache(cache))[0]
    assert not again.ok and "not an image" in again.reason


def test_out_of_range_seeds_sizes_and_batches_are_refused_before_any_folder(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    for flags, fragment in ((["--seed", str(2**64)], "seed must be an integer in [0, 4294967295]"),
                            (["--img-size", "30000"], "image_size must be 0 (the backbone's own) or an integer in [32, "
                                                      "1024]"),
                            (["--batch-size", "1000000000"], "batch_size must be at most 1024")):
        code, err = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "r", *TINY[2:], *flags)
        assert code == 2 and fragment in err, err
        assert not (tmp_path / "r").exists()
    images = data / "a" / "0.jpg"
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv",
                        "--batch-size", "1000000000")
    assert code == 2 and "--batch-size must be in [1, 1024]" in err
    code, err = run_cli(capsys, "export", "--model", run_copy, "--format", "onnx", "--out", tmp_path / "x",
                        "--image-size", "30000")
    assert code == 2 and "--image-size must be an integer in [32, 1024]" in err
    recipe = run_copy / runs.RECIPE_FILE
    recipe.write_text(recipe.read_text().replace("image_size = 64", "image_size = 30000"))
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv")
    assert code == 2 and "recipe.toml" in err and "image_size must be" in err, err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "x").exists()


def test_long_names_fit(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    images = tmp_path / "imgs"
    images.mkdir()
    long_image = images / ("p" * 245 + ".jpg")
    shutil.copy(data / "a" / "0.jpg", long_image)
    shutil.copy(data / "b" / "0.jpg", images / "short.jpg")
    code, _ = run_cli(capsys, "explain", "--model", run_copy, "--images", images, "--out", tmp_path / "cams")
    written = [p.name for p in (tmp_path / "cams").iterdir() if not p.name.startswith(".")]
    assert code == 0 and len(written) == 2 and all(len(n.encode()) <= 255 for n in written)
    out = tmp_path / ("e" * 250)
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out)[0] == 0
    assert run_cli(capsys, "evaluate", "--model", run_copy, "--data", data, "--out", out, "--overwrite")[0] == 0
    assert (out / runs.METRICS_FILE).is_file()
    csv = tmp_path / ("c" * 251 + ".csv")
    assert run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", csv)[0] == 0
    assert csv.read_text().startswith(runs.PREDICTIONS_HEADER)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("where", ["a-file", "under-proc", "home-a-file"])
def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(trained, run_copy, tmp_path, capsys, caplog,
                                                                  monkeypatch, where):
    data, _ = trained
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    if where == "home-a-file":
        monkeypatch.delenv("TOOLKIT_CACHE_DIR")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        monkeypatch.setenv("HOME", str(blocker))
    else:
        monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(blocker) if where == "a-file" else "/proc/toolkit-cache")
    alpha = data / "a" / "0.jpg"  # a converted copy needs somewhere to live: a PNG with transparency
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image

    Image.open(alpha).convert("RGBA").save(images / "alpha.png")
    code, _ = run_cli(capsys, "predict", "--model", run_copy, "--images", images, alpha, "--out", tmp_path / "p.csv")
    assert code == 0 and "cannot be written" in caplog.text and "TOOLKIT_CACHE_DIR" in caplog.text
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",," not in r for r in rows[1:])
    assert blocker.read_text() == "not a folder"


def test_the_output_location_is_checked_before_any_work(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["predict", "--model", run_copy, "--images", data, "--out", afile / "p.csv"],
                 ["evaluate", "--model", run_copy, "--data", data, "--out", afile / "e"],
                 ["audit", "--data", data, "--backbones", "mobilenet_v2", "--out", afile / "a"],
                 ["finetune", "--data", data, "--out", afile / "r", *TINY]):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and "is a file, not a folder" in err and str(afile) in err, err
        assert "images predicted" not in capsys.readouterr().out
    assert afile.read_text() == "x"


# ----------------------------------------------------------------------------- 11-14: memory and hangs


def test_a_huge_sparse_file_is_a_row_never_read(run_copy, tmp_path, capsys):
    images = tmp_path / "imgs"
    photo_tree(images, 1)
    with open(images / "a" / "huge.jpg", "wb") as f:
        f.truncate(9 * 2**30)
    code, _ = run_cli(capsys, "predict", "--model", run_copy, "--images", images, "--out", tmp_path / "p.csv")
    assert code == 0 and "file too large to be a photo (9,216 MB > 512 MB" in (tmp_path / "p.csv").read_text()
    main(["inspect", "--data", str(images)])
    assert "huge.jpg: file too large" in capsys.readouterr().out


def test_a_model_file_with_a_huge_json_member_is_refused_before_keras_reads_it(run_copy, tmp_path, capsys):
    import zipfile

    from toolkit.predict.members import MAX_KERAS_JSON_BYTES

    model = run_copy / runs.MODEL_FILE
    with zipfile.ZipFile(model, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("config.json", "w", force_zip64=True) as member:
            for _ in range(MAX_KERAS_JSON_BYTES // 2**20 + 1):
                member.write(b" " * 2**20)
    assert model.stat().st_size < 2**20  # spaces pack small
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", run_copy / runs.CURVES_FILE, "--out",
                        tmp_path / "p.csv")
    assert code == 2 and "config.json member is 65 MB" in err, err


def test_a_data_service_that_is_not_there_is_named_not_waited_for(trained, run_copy, tmp_path, capsys):
    import time

    data, _ = trained
    start = time.perf_counter()
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "r", *TINY, "--data-service",
                        "grpc://127.0.0.1:1")
    assert code == 2 and "--data-service grpc://127.0.0.1:1: no tf.data service dispatcher answers" in err
    code, err = run_cli(capsys, "data-service", "worker", "--dispatcher", "grpc://127.0.0.1:1")
    assert code == 2 and "--dispatcher grpc://127.0.0.1:1" in err
    assert time.perf_counter() - start < 30 and not (tmp_path / "r").exists()
    recipe = run_copy / runs.RECIPE_FILE
    recipe.write_text(recipe.read_text().replace('data_service = ""', 'data_service = "grpc://127.0.0.1:1"'))
    unfinished(run_copy)
    code, err = run_cli(capsys, "finetune", "--resume", run_copy)
    assert code == 2 and "data_service in" in err and "recipe.toml" in err


def test_data_service_ports_and_work_dir_are_checked(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, fragment in ((["--port", "99999"], "--port must be in 0-65535"), (["--port", "-5"], "--port must be"),
                           (["--work-dir", str(afile)], "--work-dir")):
        code, err = run_cli(capsys, "data-service", "dispatcher", *argv)
        assert code == 2 and fragment in err, err


# ----------------------------------------------------------------------------- 15-22: wrong results and messages


@pytest.mark.parametrize("temperature", [0, -1, 1e-320, "NaN", '"abc"', 1e9, "true"])
def test_calibration_temperatures_are_checked(run_copy, tmp_path, capsys, temperature):
    (run_copy / runs.CALIBRATION_FILE).write_text(f'{{"temperature": {temperature}}}')
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", run_copy / runs.CURVES_FILE, "--out",
                        tmp_path / "p.csv")
    assert code == 2 and "calibration.json: temperature must be a number in [0.01, 100.0]" in err, err
    assert not (tmp_path / "p.csv").exists()


def test_predict_weights_are_checked(trained, run_copy, tmp_path, capsys):
    images = trained[0] / "a" / "0.jpg"
    for weights, fragment in ((["-1", "2"], "finite numbers > 0"), (["0", "1"], "finite numbers > 0"),
                              (["1"], "one weight per --model"), (["1", "2", "3"], "one weight per --model")):
        code, err = run_cli(capsys, "predict", "--model", run_copy, "--model", run_copy, "--weights", *weights,
                            "--images", images, "--out", tmp_path / "p.csv")
        assert code == 2 and fragment in err, err
    code, _ = run_cli(capsys, "predict", "--model", run_copy, "--model", run_copy, "--weights", "2", "1", "--images",
                      images, "--out", tmp_path / "p.csv", "--all-probs")
    assert code == 0
    row = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    assert abs(float(row[-3]) + float(row[-2]) - 1) < 1e-5 and 0 <= float(row[2]) <= 1


def test_crafted_unknown_statistics_are_refused(run_copy, tmp_path, capsys):
    from toolkit.predict.unknown import load_scorer

    path = run_copy / runs.UNKNOWN_FILE
    with np.load(path) as saved:
        good = {k: saved[k] for k in saved.files}
    n, width = good["bank"].shape
    for change, fragment in (
        ({"reference": np.zeros(0)}, "reference"), ({"bank": np.zeros((n, width + 1), np.float16)}, "bank has shape"),
        ({"bank": np.zeros((0, width), np.float16), "bank_labels": np.zeros(0, np.int32)}, "bank has shape"),
        ({"spread": np.zeros((2, 2))}, "spread"), ({"bank_labels": np.full(n, 7, np.int32)}, "bank_labels"),
        ({"bank_labels": np.full(n, -1, np.int32)}, "bank_labels"), ({"reference": np.array([np.inf])}, "reference"),
        ({"bank": np.full((n, width), np.nan, np.float16)}, "not finite"),
    ):
        np.savez(path, **(good | change))
        code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", run_copy / runs.CURVES_FILE, "--out",
                            tmp_path / "p.csv", "--unknown", "auto")
        assert code == 2 and "unknown.npz does not fit this model" in err and fragment in err, (change.keys(), err)
    np.savez(path, **good)
    assert load_scorer(run_copy, 2, width).bank.shape == (n, width)


def test_split_names_beside_class_folders_are_refused(tmp_path, capsys):
    data = photo_tree(tmp_path / "data", 3, classes=("bus", "car", "train"))
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", tmp_path / "r", *TINY)
    assert code == 2 and "holds train/ beside bus/, car/" in err and "rename it" in err
    code, err = run_cli(capsys, "inspect", "--data", data)
    assert code == 2 and "train/ a split or a class" in err
    assert not (tmp_path / "r").exists()


def test_labels_equal_up_to_case_are_named(tmp_path, capsys):
    data = photo_tree(tmp_path / "data", 3, classes=("ants", "ANTS", "bees"))
    assert main(["inspect", "--data", str(data)]) == 0
    assert "classes 'ANTS' and 'ants' differ only in upper/lower case" in capsys.readouterr().out


def test_explain_reports_predicts_calibrated_probability(trained, run_copy, tmp_path, capsys, caplog):
    import logging

    image = trained[0] / "a" / "1.jpg"
    (run_copy / runs.CALIBRATION_FILE).write_text('{"temperature": 3.0}')  # far from 1: the difference shows
    assert run_cli(capsys, "predict", "--model", run_copy, "--images", image, "--out", tmp_path / "p.csv")[0] == 0
    predicted = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert run_cli(capsys, "explain", "--model", run_copy, "--images", image, "--out", tmp_path / "cams")[0] == 0
    line = next(r.getMessage() for r in caplog.records if "explain:" in r.getMessage() and "p=" in r.getMessage())
    assert f"→ {predicted[1]} (p={float(predicted[2]):.3f})" in line, (line, predicted)



def test_inspect_and_predict_numbers_are_checked(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    for argv, fragment in ((["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
                           (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
                           (["--seed", "-3"], "--seed must be an integer in [0, 4294967295]"),
                           (["--seed", str(2**64)], "--seed must be an integer in [0, 4294967295]")):
        code, err = run_cli(capsys, "inspect", "--data", data, *argv)
        assert code == 2 and fragment in err, err
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", data, "--out", tmp_path / "p.csv",
                        "--top-k", "-3")
    assert code == 2 and "--top-k must be >= 1" in err and not (tmp_path / "p.csv").exists()


def test_pca_and_class_lists_of_a_run_are_checked(run_copy, tmp_path, capsys):
    unfinished(run_copy)
    for pca in ({"eigenvalues": [1, 2], "eigenvectors": [[1]]}, {"eigenvalues": ["x"] * 3}, [], {}):
        (run_copy / runs.PCA_FILE).write_text(json.dumps(pca))
        code, err = run_cli(capsys, "finetune", "--resume", run_copy)
        assert code == 2 and "pca.json must hold 3 eigenvalues" in err, err
    (run_copy / runs.PCA_FILE).unlink()
    (run_copy / runs.CLASSES_FILE).write_text('["a", "a"]')
    code, err = run_cli(capsys, "predict", "--model", run_copy, "--images", run_copy / runs.CURVES_FILE, "--out",
                        tmp_path / "p.csv")
    assert code == 2 and "distinct class names" in err
    assert not (tmp_path / "p.csv").exists()


def test_a_leftover_staging_folder_with_user_files_is_not_emptied(trained, run_copy, tmp_path, capsys):
    data, _ = trained
    stage = run_copy.with_name(paths.staging_name(run_copy))
    stage.mkdir()
    outputs.mark(stage, "evaluation")
    (stage / "mine.txt").write_text("mine")
    code, err = run_cli(capsys, "finetune", "--data", data, "--out", run_copy, "--overwrite", *TINY)
    assert code == 2 and "mine.txt" in err and (stage / "mine.txt").read_text() == "mine"


def test_a_crafted_verification_cache_cannot_point_at_another_file(tmp_path):
    from toolkit.data.verify import VerificationCache, verify_files

    data = photo_tree(tmp_path / "data", 1)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((data / "b" / "0.jpg").read_bytes())
    cache = tmp_path / "cache"
    path = str(data / "a" / "0.jpg")
    verify_files([path], VerificationCache(cache))
    lines = [json.loads(line) for line in (cache / "verified.jsonl").read_text().splitlines()]
    lines[0]["record"]["decode_path"] = str(secret)
    (cache / "verified.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert verify_files([path], VerificationCache(cache))[0].decode_path == path
