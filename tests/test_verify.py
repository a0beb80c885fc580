"""Bad input never stops good data, and nothing is silent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.badinput import build_corpus, huge_jpeg
from toolkit.data.datasets import DatasetError, load_splits
from toolkit.data.verify import CONVERTED_MAX_SIDE, VerificationCache, verify_file, verify_files


@pytest.fixture()
def cache(tmp_path) -> VerificationCache:
    return VerificationCache(tmp_path / "cache")


def test_every_bad_input_case_is_reported_by_name_and_good_images_remain(tmp_path, cache):
    root = tmp_path / "data"
    expected = build_corpus(root)
    splits = load_splits(root, cache=cache)
    problems = {Path(p.path).relative_to(root).as_posix() if Path(p.path).is_absolute() or p.path.startswith(str(root)) else p.path: p
                for p in splits.problems if p.path.startswith(str(root))}
    used = {Path(p).relative_to(root).as_posix() for p in splits.train.paths + splits.val.paths}
    for rel, (status, fragment) in expected.items():
        if status == "skipped":
            assert rel in problems and problems[rel].severity == "skipped", rel
            assert fragment.lower() in problems[rel].reason.lower(), (rel, problems[rel].reason)
            assert rel not in used
        else:
            assert rel in used, f"{rel} should be usable"
            if fragment:
                assert fragment in problems[rel].reason, (rel, problems.get(rel))
    # hidden files never enter; the empty class is reported; leakage is reported
    assert not any(".DS_Store" in p for p in used)
    assert any(p.path.endswith("green") and "empty class folder" in p.reason for p in splits.problems)
    leaks = [p for p in splits.problems if p.reason.startswith("leakage")]
    assert len(leaks) == 1 and "copy_of_train.jpg" in leaks[0].reason
    assert splits.class_names == ("blue", "red")  # the empty 'green' class is not a class


@pytest.mark.slow
def test_good_images_still_train_and_the_run_report_names_every_skipped_file(tmp_path):
    from toolkit.api import train
    from toolkit.config.recipes import build_config

    root = tmp_path / "data"
    expected = build_corpus(root)
    config = build_config(None, {"data": str(root), "freeze": "all", "image_size": 64, "head_epochs": 2, "batch_size": 8})
    result = train(config, out=tmp_path / "run", verbose=0)
    report = (tmp_path / "run" / "report.md").read_text()
    for rel, (status, fragment) in expected.items():
        if status == "skipped":
            assert f"`{root / rel}`" in report, rel
    assert "leakage" in report and result.metrics["n_val"] > 0
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["statistics"]["skipped_files"] == sum(s == "skipped" for s, _ in expected.values())


def test_converted_images_are_what_a_viewer_shows(tmp_path, cache):
    root = tmp_path / "data"
    build_corpus(root)
    records = {Path(r.path).name: r for r in verify_files(sorted(str(p) for p in (root / "train" / "red").iterdir()), cache)}
    rotated = records["rotated.jpg"]
    assert (rotated.width, rotated.height) == (60, 90)  # EXIF 6: 90x60 stored → 60x90 shown
    shown = Image.open(rotated.decode_path)
    expected = Image.open(root / "train" / "red" / "rotated.jpg").transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(np.asarray(shown, dtype=int) - np.asarray(expected.convert("RGB"), dtype=int)).mean()
    assert diff < 6, diff
    alpha = np.asarray(Image.open(records["alpha.png"].decode_path))
    assert alpha.shape[-1] == 3
    cmyk = np.asarray(Image.open(records["cmyk.jpg"].decode_path), dtype=float)
    assert cmyk[..., 0].mean() > cmyk[..., 2].mean() + 40  # still red after CMYK → RGB
    assert records["deep16.png"].decode_path == records["deep16.png"].path  # TF reads 16-bit PNG itself
    assert records["scan.tiff"].is_jpeg and records["scan.tiff"].decode_path.endswith(".jpg")


def test_verdicts_are_cached_by_path_size_and_mtime(tmp_path, cache):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (30, 20), (10, 20, 30)).save(path)
    first = verify_files([str(path)], cache)[0]
    assert first.ok
    reloaded = VerificationCache(cache.directory)
    assert reloaded.get(str(path)) == first
    path.write_bytes(b"")  # changed file: the cache entry no longer applies
    assert reloaded.get(str(path)) is None
    assert not verify_files([str(path)], reloaded)[0].ok


def test_huge_image_is_decoded_without_its_full_bitmap(tmp_path):
    path = tmp_path / "huge.jpg"
    huge_jpeg(path, 8000)
    # Peak memory of a fresh process, read from VmHWM (ru_maxrss would include the
    # pytest parent's peak, which survives fork + exec on Linux).
    script = (
        "import json; from pathlib import Path;"
        "from toolkit.data.verify import verify_file;"
        f"r = verify_file({str(path)!r}, Path({str(tmp_path / 'conv')!r}));"
        "peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps([r.ok, r.width, r.height, r.reason, peak]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    ok, width, height, reason, peak_kb = json.loads(out)
    assert ok and max(width, height) <= CONVERTED_MAX_SIDE and "downscaled from 8000x8000" in reason
    assert peak_kb < 180_000, f"peak RSS {peak_kb / 1024:.0f} MB: the full 8000x8000 bitmap (183 MB) was decoded"


def test_small_images_and_odd_names_flow_through_the_pipeline(tmp_path, cache):
    from toolkit.data.pipeline import make_dataset

    root = tmp_path / "data"
    build_corpus(root)
    splits = load_splits(root, cache=cache)
    ds = make_dataset(splits.train, 64, 8, training=True, seed=0)
    seen = sum(int(x.shape[0]) for x, _ in ds)
    assert seen == len(splits.train)
    for x, _ in make_dataset(splits.val, 64, 8, training=False):
        assert x.shape[1:] == (64, 64, 3)


def test_a_run_that_cannot_work_names_the_folder(tmp_path, cache):
    root = tmp_path / "allbad"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"allbad.*no usable images"):
        load_splits(root, cache=cache)
    Image.new("RGB", (8, 8)).save(root / "a" / "ok.png")
    with pytest.raises(DatasetError, match=r"only one class \['a'\]"):
        load_splits(root, cache=cache)


def test_csv_manifest(tmp_path, cache):
    (tmp_path / "imgs").mkdir()
    rows = ["path,label,split"]
    for i in range(6):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'},{'val' if i >= 4 else 'train'}")
    rows.append("imgs/missing.png,cat,train")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits(tmp_path / "labels.csv", cache=cache)
    assert splits.class_names == ("cat", "dog")
    assert len(splits.train) == 4 and len(splits.val) == 2
    assert any("missing.png" in p.path and "missing" in p.reason for p in splits.skipped())
    (tmp_path / "bad.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['label', 'path'\]"):
        load_splits(tmp_path / "bad.csv", cache=cache)


def test_verify_file_never_raises_on_unreadable_path(tmp_path):
    record = verify_file(str(tmp_path / "nope.jpg"), tmp_path)
    assert not record.ok and "cannot read" in record.reason
