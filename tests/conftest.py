"""Shared fixtures. TensorFlow's C++ logging is quietened before anything imports it."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Verification verdicts and converted images go to a throw-away cache, never the user's.
if "TOOLKIT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TOOLKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="toolkit-test-cache-")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets, or skip the test saying why."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"needs the shared dataset {name!r} at {path} (absent on this machine)")
    return path


def kill_after_epochs(cmd: list[str], state_file: Path, stage: str, epochs: int = 2, timeout: float = 240) -> int:
    """Start ``cmd`` (a finetune), SIGKILL it once ``stage`` in its state.json has finished ``epochs`` epochs;
    returns how many it had finished (the test fails when the run ends or stalls first)."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(state_file.read_text()).get(stage, {}).get("epochs_done", 0) if state_file.is_file() else 0
        except json.JSONDecodeError:  # caught mid-write of a temporary copy: try again
            done = 0
        if done >= epochs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return done
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run finished or stalled before it could be killed")


def make_sample(out: Path, per_class: int, size: int = 128) -> Path:
    """The project's own sample dataset (four shapes), generated fresh by data/make_sample.py into ``out``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_sample(out, per_class=per_class, size=size)
    return out


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The sample dataset at 24 images per class."""
    return make_sample(tmp_path_factory.mktemp("sample"), per_class=24)


TINY = ["--image-size", "64", "--head-epochs", "2", "--batch-size", "8", "--cache-features", "auto", "--freeze", "all"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): a small real dataset and a finished holdout run trained on it, shared by the tests that only
    read them (a test that changes the run works on ``run_copy``)."""
    from tests.badinput import photo_tree
    from toolkit.cli.main import main

    root = tmp_path_factory.mktemp("trained")
    data = photo_tree(root / "data", 6)
    assert main(["finetune", "--data", str(data), "--out", str(root / "run"), *TINY, "--seed", "3", "--cv", "off"]) == 0
    return data, root / "run"


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run that a test may change."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained[1], copy)
    return copy
