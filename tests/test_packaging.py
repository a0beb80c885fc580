"""The package as users install it: a wheel (not an editable install), run from outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_finetune_from_any_directory(sample_data, tmp_path):
    source = tmp_path / "source"  # the tracked files only: a build/ folder left in the checkout cannot leak in
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():  # toolkit/recipe_files -> ../recipes
            os.symlink(os.readlink(REPO / name), source / name)
        else:
            shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("toolkit_finetune-*.whl")
    # the distribution name resolves to this project, extras included (PyPI's "toolkit" is another project)
    resolved = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                               "--no-index", "--find-links", str(wheels), "--report", "-", "--quiet",
                               "toolkit-finetune[onnx]"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    (item,) = json.loads(resolved)["install"]
    assert item["download_info"]["url"].endswith(wheel.name) and item["metadata"]["name"] == "toolkit-finetune"
    assert "onnxruntime>=1.17; extra == \"onnx\"" in item["metadata"]["requires_dist"]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install: the wheel's copy is used
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import sys, toolkit; print(toolkit.__file__, toolkit.__version__, "
                            "'tensorflow' in sys.modules)"], env=env, cwd=elsewhere, capture_output=True, text=True,
                           check=True).stdout.split()
    assert where[0].startswith(str(target)) and where[1:] == ["0.1.0", "False"], where
    lazy = subprocess.run([sys.executable, "-c", "import toolkit, sys; toolkit.finetune; toolkit.Run; "
                           "assert 'tensorflow' not in sys.modules"], env=env, cwd=elsewhere, capture_output=True,
                          text=True)
    assert lazy.returncode == 0, lazy.stderr[-2000:]
    done = subprocess.run([str(target / "bin" / "toolkit"), "finetune", "--data", str(sample_data), "--epochs", "1",
                           "--img-size", "64", "--out", "out"], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "out" / "model.keras").is_file() and "accuracy" in done.stdout
    names = subprocess.run([str(target / "bin" / "toolkit"), "finetune", "--data", str(sample_data), "--recipe",
                            "quik"], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert names.returncode == 2 and "accurate, quick, small-data" in names.stderr
    shipped = target / "toolkit" / "recipe_files"  # the top-level recipes/, as files inside the package
    assert not shipped.is_symlink() and sorted(p.name for p in shipped.iterdir()) == sorted(
        p.name for p in (REPO / "recipes").glob("*.toml"))
    assert all((shipped / p.name).read_bytes() == p.read_bytes() for p in (REPO / "recipes").glob("*.toml"))
    # the tour's default recipe (224 px, cross-validation, audit) on a sample of 12 images per class
    _readme_python_tour_runs(env, tmp_path / "tour", make_sample(tmp_path / "sample12", per_class=12))


def readme_python_blocks(readme: str) -> list[str]:
    """The ```python blocks of the README's "## Python" section, in order."""
    section = readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


def _readme_python_tour_runs(env: dict, folder: Path, sample_data: Path) -> None:
    """The README's Python tour, as written, from the installed wheel, outside the repository (its data/sample is
    the generated sample)."""
    blocks = readme_python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks and "toolkit.finetune(" in blocks[0]
    (folder / "data").mkdir(parents=True)
    os.symlink(sample_data, folder / "data" / "sample")
    (folder / "tour.py").write_text("\n".join(blocks), encoding="utf-8")
    done = subprocess.run([sys.executable, "tour.py"], env=env, cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]  # worker processes that re-run tour.py stop at once
    assert "expected accuracy on new images" in done.stdout and "model.onnx" in done.stdout, done.stdout[-2000:]
    assert (folder / "runs" / "sample-python" / "model.keras").is_file()
    assert (folder / "exports" / "sample" / "model.onnx").is_file()
