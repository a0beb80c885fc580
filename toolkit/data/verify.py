"""Verify every image once, by decoding it (never by its extension), and cache
the verdict by (path, size, mtime) so the next run does not decode it again.

Why a verification pass: one corrupt file inside a tf.data pipeline kills the
whole run an hour in, and TensorFlow silently mishandles some valid images
(EXIF rotation ignored, alpha dropped, TIFF unsupported). Each file is
classified once:

* usable as is: the fast TF pipeline decodes the original (JPEG, PNG incl.
  16-bit, palette and grey, first frame of a GIF, BMP, WebP);
* usable after conversion: EXIF-rotated photos (rotation applied), CMYK
  JPEGs, images with transparency (composited on white), TIFF and other
  formats only PIL reads, and huge images (downscaled, JPEG draft decoding so
  an 8000x8000 photo never needs its full-size bitmap). The converted copy is
  written once into the cache folder and the pipeline reads that;
* unusable: skipped, with the reason (empty, truncated, not an image, ...).

The content hash computed on the way finds byte-identical files, e.g. the same
photo in train and test (leakage).

A file is sized before it is read: one larger than :func:`max_file_bytes` (a sparse
9 GB "photo") is refused with a row, never read. A file name that is not valid UTF-8
is refused with a row that shows it escaped (``caf\\xe9.jpg``): TensorFlow, CSVs and JSON
all need text names. The verdict cache is only a cache: when its folder cannot be
written, a temporary one is used for the process, with one warning.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps, UnidentifiedImageError

from toolkit.core import runs
from toolkit.core.processes import GUARD_HINT
from toolkit.data.discovery import printable

logger = logging.getLogger(__name__)

# Formats TensorFlow's decode_image reads correctly as they are.
TF_NATIVE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP"})
# Above this many pixels an image is downscaled once into the cache (decode cost and memory).
HUGE_PIXELS = 24_000_000
CONVERTED_MAX_SIDE = 2048
# Refuse outright above this (a decompression bomb, not a photo).
MAX_PIXELS = 400_000_000
# Files above this many bytes are not read (TOOLKIT_MAX_IMAGE_MB sets another cap): the largest photos and scans
# are tens of MB, and each verifying process holds a whole file.
DEFAULT_MAX_IMAGE_MB = 512
CACHE_VERSION = 2  # the stamp: size, mtime, ctime and inode


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """The verdict on one file."""

    path: str
    ok: bool
    reason: str = ""  # why the file is unusable, or what was done to it (conversion note)
    width: int = 0  # as the model sees it (after EXIF rotation / downscaling)
    height: int = 0
    format: str = ""
    decode_path: str = ""  # what the pipeline reads: the original or its converted copy
    is_jpeg: bool = False  # decode_path is a JPEG: only the crop window needs decoding
    sha1: str = ""


def max_file_bytes() -> int:
    """The largest image file read, in bytes (``TOOLKIT_MAX_IMAGE_MB``, default :data:`DEFAULT_MAX_IMAGE_MB`)."""
    text = os.environ.get("TOOLKIT_MAX_IMAGE_MB", "")
    try:
        megabytes = float(text) if text else DEFAULT_MAX_IMAGE_MB
    except ValueError:
        megabytes = -1.0
    if not 0 < megabytes < 2**40:
        from toolkit.core.errors import UserError

        raise UserError(f"TOOLKIT_MAX_IMAGE_MB must be a number of megabytes > 0. Received: {text!r}")
    return int(megabytes * 2**20)


def default_cache_dir() -> Path:
    env = os.environ.get("TOOLKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "toolkit"


def _sniff(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image: HTML page (a download that saved an error page?)"
    if b"\0" in data[:4096]:
        return "not an image: unrecognised binary data"
    try:
        data[:4096].decode("utf-8")
        return "not an image: text file"
    except UnicodeDecodeError:
        return "not an image: unrecognised binary data"


def _not_a_regular_file(path: str) -> str:
    """Why ``path`` cannot be read as an image file without risk ("" if it can).

    Only regular files are opened: reading a named pipe blocks until something writes to it,
    and a device can stream forever. Symbolic links count as what they point to.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"symbolic link to {os.readlink(path)!r}, which does not exist"
        return "cannot read file: no such file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read file: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return ""
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    return f"not an image file: {kind}"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _to_rgb(image: Image.Image) -> Image.Image:
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def verify_file(path: str, converted_dir: Path) -> ImageRecord:
    """Decode ``path`` fully and decide how the pipeline should read it. Never raises."""
    if printable(path) != path:
        return ImageRecord(path, False, "file name is not valid UTF-8; rename the file (e.g. with convmv)")
    unreadable = _not_a_regular_file(path)
    if unreadable:
        return ImageRecord(path, False, unreadable)
    try:
        size, cap = os.stat(path).st_size, max_file_bytes()
        if size > cap:
            return ImageRecord(path, False, f"file too large to be a photo ({size / 2**20:,.0f} MB > {cap / 2**20:,.0f} "
                                            "MB; TOOLKIT_MAX_IMAGE_MB sets the limit); not read")
        data = Path(path).read_bytes()
    except OSError as exc:
        return ImageRecord(path, False, f"cannot read file: {exc.strerror or exc}")
    sha1 = hashlib.sha1(data).hexdigest()
    if not data:
        return ImageRecord(path, False, "empty file (0 bytes)", sha1=sha1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            width, height = image.size
            if width * height > MAX_PIXELS:
                return ImageRecord(path, False, f"too large to decode safely ({width}x{height})", format=fmt, sha1=sha1)
            orientation = image.getexif().get(0x0112, 1)
            huge = width * height > HUGE_PIXELS
            if fmt == "JPEG" and huge:
                # DCT-domain downscaling: the full-size bitmap is never allocated.
                image.draft("RGB", (CONVERTED_MAX_SIDE, CONVERTED_MAX_SIDE))
            image.load()  # full decode: catches truncated and corrupt data
    except UnidentifiedImageError:
        return ImageRecord(path, False, _sniff(data), sha1=sha1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ImageRecord(path, False, f"corrupt or truncated image: {exc}", sha1=sha1)

    notes = []
    if fmt not in TF_NATIVE_FORMATS:
        notes.append(f"{fmt or 'unknown'} format converted")
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} applied")
    if image.mode in ("CMYK", "YCbCr") and fmt == "JPEG":
        notes.append(f"{image.mode} JPEG converted to RGB")
    if _has_alpha(image):
        notes.append("transparency composited on white")
    if huge:
        notes.append(f"downscaled from {width}x{height}")
    if getattr(image, "n_frames", 1) > 1:
        notes.append("animated: first frame used")

    needs_conversion = [n for n in notes if not n.startswith("animated")]
    if not needs_conversion:
        return ImageRecord(path, True, "; ".join(notes), width, height, fmt, path, fmt == "JPEG", sha1)

    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        if max(image.size) > CONVERTED_MAX_SIDE and huge:
            image.thumbnail((CONVERTED_MAX_SIDE, CONVERTED_MAX_SIDE), Image.BILINEAR, reducing_gap=2.0)
        target = converted_dir / f"{sha1}.jpg"
        if not target.is_file():
            with runs.atomic_path(target) as tmp:
                image.save(tmp, format="JPEG", quality=95)
    except (OSError, ValueError) as exc:
        return ImageRecord(path, False, f"could not be converted: {exc}", format=fmt, sha1=sha1)
    return ImageRecord(path, True, "; ".join(notes), image.width, image.height, fmt, str(target), True, sha1)


class VerificationCache:
    """Verdicts keyed by absolute path, valid while the file's size, mtime, ctime and inode are unchanged.

    The ctime cannot be set back by a program (``touch -d`` sets the mtime, and moves the ctime to now), so
    a file rewritten with the same size and mtime is verified again.
    """

    def __init__(self, directory: Path | None = None):
        self.directory = usable_cache_dir(Path(directory) if directory else default_cache_dir())
        self.file = self.directory / "verified.jsonl"
        self.converted_dir = self.directory / "converted"
        self._entries: dict[str, dict] = {}
        if self.file.is_file():
            try:
                text = self.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = ""  # an unreadable cache only costs a re-verification
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a damaged line only costs a re-verification
                if isinstance(entry, dict) and entry.get("v") == CACHE_VERSION and isinstance(entry.get("key"), str):
                    self._entries[entry["key"]] = entry

    @staticmethod
    def _stamp(path: str) -> tuple[int, ...] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino

    def get(self, path: str) -> ImageRecord | None:
        key = os.path.abspath(path)
        entry = self._entries.get(key)
        stamp = self._stamp(path)
        if entry is None or stamp is None or tuple(entry.get("stamp", ())) != stamp:
            return None
        try:
            record = ImageRecord(**entry["record"])
        except (KeyError, TypeError):
            return None  # a damaged entry: verify again
        if record.ok and not self._own_copy(record):
            return None  # converted copy deleted (or not the cache's own): verify again
        return dataclasses.replace(record, path=path)

    def _own_copy(self, record: ImageRecord) -> bool:
        """The pipeline reads the file itself, or this cache's converted copy of it, which exists."""
        decode = Path(record.decode_path)
        if os.path.abspath(record.decode_path) != os.path.abspath(record.path) and decode.parent != self.converted_dir:
            return False
        return decode.is_file()

    def put(self, record: ImageRecord) -> None:
        stamp = self._stamp(record.path)
        if stamp is None:
            return
        key = os.path.abspath(record.path)
        self._entries[key] = {"v": CACHE_VERSION, "key": key, "stamp": list(stamp), "record": dataclasses.asdict(record)}

    def save(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            runs.write_text(self.file, "".join(json.dumps(e) + "\n" for e in self._entries.values()))
        except OSError as exc:  # a full disk, say: the next run verifies again
            logger.warning("verification cache %s not saved (%s); the next run verifies these files again", self.file,
                           exc.strerror or exc)


_FALLBACK: dict[str, Path] = {}


def usable_cache_dir(directory: Path) -> Path:
    """``directory`` if a cache can be kept there; otherwise, with one warning, a temporary folder of this process."""
    try:
        (directory / "converted").mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
        return directory
    except OSError as exc:
        key = str(directory)
        if key not in _FALLBACK:
            import atexit
            import shutil

            _FALLBACK[key] = Path(tempfile.mkdtemp(prefix="toolkit-cache-"))
            atexit.register(shutil.rmtree, _FALLBACK[key], True)
            logger.warning("the verification cache %s cannot be written (%s); using %s for this run (set "
                           "TOOLKIT_CACHE_DIR to a writable folder to keep verdicts between runs)", directory,
                           exc.strerror or exc, _FALLBACK[key])
        return _FALLBACK[key]


def _verify_chunk(args: tuple[list[str], str]) -> list[ImageRecord]:
    paths, converted_dir = args
    return [verify_file(p, Path(converted_dir)) for p in paths]


def verify_files(
    paths: Iterable[str],
    cache: VerificationCache | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> list[ImageRecord]:
    """Verdicts for ``paths`` in order; uncached files are decoded in worker processes."""
    max_file_bytes()  # a bad TOOLKIT_MAX_IMAGE_MB: one line, before any process starts
    cache = cache or VerificationCache()
    paths = list(paths)
    records: dict[str, ImageRecord] = {}
    todo = []
    for p in paths:
        cached = cache.get(p)
        if cached is None:
            todo.append(p)
        else:
            records[p] = cached
    if todo:
        cache.converted_dir.mkdir(parents=True, exist_ok=True)
        workers = workers or os.cpu_count() or 1
        logger.info("verifying %d new image files (%d cached) with %d processes", len(todo), len(records), workers)
        chunk = max(1, min(64, len(todo) // (workers * 4) or 1))
        chunks = [(todo[i : i + chunk], str(cache.converted_dir)) for i in range(0, len(todo), chunk)]
        bar = None
        if progress:
            from keras.utils import Progbar

            bar = Progbar(len(todo), unit_name="image")
        def collect(done: list[ImageRecord]) -> None:
            for r in done:
                records[r.path] = r
                cache.put(r)
            if bar:
                bar.add(len(done))

        if workers > 1 and len(chunks) > 1:
            try:
                # spawn, not fork: the parent may hold TensorFlow's threads.
                ctx = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                    for done in pool.map(_verify_chunk, chunks):
                        collect(done)
            except concurrent.futures.process.BrokenProcessPool:
                # a __main__ that spawn cannot re-import (stdin, some notebooks), or one that calls the toolkit at import
                logger.warning("worker processes unavailable; verifying in this process (a script that calls the "
                               "toolkit: %s)", GUARD_HINT)
        for c in chunks:
            if any(p not in records for p in c[0]):
                collect(_verify_chunk(c))
        cache.save()
    return [records[p] for p in paths]
