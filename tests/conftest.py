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


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The project's own sample dataset, generated fresh by data/make_sample.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("sample")
    module.make_sample(out, per_class=24, size=128)
    return out
