"""The safe torch-checkpoint reader: both serialisations, digests, refusal of payloads."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from toolkit.backbones.weights import (
    KNOWN_CHECKPOINTS,
    CheckpointError,
    ChecksumError,
    UnsafeCheckpointError,
    read_torch_checkpoint,
    sha256_of,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["tiny_legacy.pth", "tiny_zip.pt"])
def test_reads_real_torch_files_in_both_formats(name):
    expected = json.loads((FIXTURES / "tiny_expected.json").read_text())
    state = read_torch_checkpoint(FIXTURES / name)
    assert list(state) == list(expected)  # order kept (OrderedDict)
    for key, want in expected.items():
        got = state[key]
        assert list(got.shape) == want["shape"], key
        np.testing.assert_allclose(got.astype(np.float64).ravel(), want["values"], rtol=0, atol=0, err_msg=key)
    assert state["half"].dtype == np.float16
    assert state["bn.num_batches_tracked"].dtype == np.int64
    assert state["fc.weight_t"].flags["C_CONTIGUOUS"]  # views are materialised as own arrays


@pytest.mark.parametrize("filename", sorted(KNOWN_CHECKPOINTS))
def test_known_checkpoints_are_installed_and_match_their_digest(filename):
    path = KNOWN_CHECKPOINTS[filename].path()
    assert path is not None, f"{KNOWN_CHECKPOINTS[filename].package} not installed (requirements/weights.txt)"
    assert sha256_of(path) == KNOWN_CHECKPOINTS[filename].sha256
    state = read_torch_checkpoint(path)
    assert len(state) > 250 and all(isinstance(v, np.ndarray) for v in state.values())


def test_byte_flipped_checkpoint_is_refused(tmp_path):
    original = KNOWN_CHECKPOINTS["mobilenet_v2-b0353104.pth"].path()
    tampered = tmp_path / original.name  # same name, so the recorded digest applies
    shutil.copyfile(original, tampered)
    with open(tampered, "r+b") as f:
        f.seek(os.path.getsize(tampered) // 2)
        byte = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="does not match"):
        read_torch_checkpoint(tampered)


def test_explicit_digest_is_enforced():
    with pytest.raises(ChecksumError):
        read_torch_checkpoint(FIXTURES / "tiny_zip.pt", sha256="0" * 64)
    digest = sha256_of(FIXTURES / "tiny_zip.pt")
    assert "conv.weight" in read_torch_checkpoint(FIXTURES / "tiny_zip.pt", sha256=digest)


class _Payload:
    """A pickle that would run a shell command when loaded by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_file_with(obj, path: Path) -> None:
    with open(path, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, obj, []):
            pickle.dump(part, f, protocol=2)


def test_pickle_payload_in_legacy_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _legacy_file_with({"weight": _Payload(marker)}, path)
    # Sanity: plain pickle *would* run it (proves the payload is real).
    with open(path, "rb") as f:
        for _ in range(4):
            pickle.load(f)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_pickle_payload_in_zip_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": _Payload(marker)}, protocol=2))
        archive.writestr("evil/version", "3\n")
    with pytest.raises(UnsafeCheckpointError):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_malformed_files_get_clear_errors(tmp_path):
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        read_torch_checkpoint(not_torch)
    truncated = tmp_path / "tiny.pth"
    data = (FIXTURES / "tiny_legacy.pth").read_bytes()
    truncated.write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="truncated"):
        read_torch_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(tmp_path / "missing.pth")
