"""The per-source caches under OUT/.mixgen, and the checksums that keep a damaged one from being
used: fixed-size record files (views, feature maps) and whole arrays (CAM maps, grids, ...).

Records are read and written with pread/pwrite rather than a memory map: the data then sits in
the OS page cache, which the kernel can drop under pressure, instead of in this process's
resident set, so peak RSS stays small however many sources there are.

Every cache file ``F`` that is reused across runs has a sidecar ``F.crc32``: one CRC-32 per
record (zlib's, about 2.7 GB/s on one core here), the CRC-32 of the cache's JSON companion
(its status or probe record) when it has one, and a CRC-32 of the sidecar itself. It is written
last, so a cache without one was never finished; ``damage``/``load_checked_array`` compare every
record before reuse, and whatever does not match is rebuilt, never used."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from mixgen.files import read_regular
from mixgen.layout import digests_path

_MAGIC = b"MXCRC32\0"
_HEADER = struct.Struct("<8sQQq")  # magic, record count, record bytes, CRC-32 of the JSON or -1


def crc32(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32 of a contiguous buffer (zlib releases the GIL for large ones)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data)


def _file_crc(path: Path | None) -> int:
    if path is None:
        return -1
    return zlib.crc32(read_regular(path))


def seal(path: Path, digests: np.ndarray, record_bytes: int, meta_path: Path | None = None) -> None:
    """Write ``path``'s sidecar: its per-record CRC-32s and that of ``meta_path`` (written before)."""
    from mixgen.files import atomic_file

    values = np.ascontiguousarray(digests, dtype="<u4")
    body = _HEADER.pack(_MAGIC, len(values), record_bytes, _file_crc(meta_path)) + values.tobytes()
    with atomic_file(digests_path(path)) as f:
        f.write(body + struct.pack("<I", zlib.crc32(body)))


def load_seal(path: Path, count: int, record_bytes: int, meta_path: Path | None = None) -> np.ndarray | str:
    """The per-record CRC-32s of ``path``, or why they cannot be trusted (a short phrase)."""
    try:
        blob = read_regular(digests_path(path))
    except OSError:
        return "no checksums (never finished)"
    if len(blob) < _HEADER.size + 4 or zlib.crc32(blob[:-4]) != struct.unpack("<I", blob[-4:])[0]:
        return "its checksum file is damaged"
    magic, n, nbytes, meta_crc = _HEADER.unpack_from(blob)
    if magic != _MAGIC or n != count or nbytes != record_bytes or len(blob) != _HEADER.size + 4 * n + 4:
        return "its checksum file does not match it"
    try:
        if meta_crc != _file_crc(meta_path):
            return f"{Path(meta_path).name} changed"
    except OSError:
        return f"{Path(meta_path).name} unreadable"
    return np.frombuffer(blob, dtype="<u4", count=n, offset=_HEADER.size)


def _mismatch(expected: np.ndarray, actual: np.ndarray) -> str | None:
    bad = int(np.count_nonzero(expected != actual))
    return f"{bad} of {len(expected)} records" if bad else None


def row_digests(array: np.ndarray) -> np.ndarray:
    """One CRC-32 per row (first axis) of ``array``."""
    return np.array([crc32(row) for row in array], dtype=np.uint32)


def save_checked_array(path: Path, array: np.ndarray, meta_path: Path | None = None) -> None:
    """np.save ``array`` atomically, then its sidecar (one CRC-32 per row; ``meta_path``, a JSON
    describing the array, must be written before)."""
    from mixgen.files import save_npy

    save_npy(path, array)
    seal(path, row_digests(array), int(array[0].nbytes) if len(array) else 0, meta_path)


def load_checked_array(
    path: Path, count: int | None = None, meta_path: Path | None = None
) -> tuple[np.ndarray | None, str | None]:
    """(array, None) when ``path`` holds ``count`` rows (any number: None) that match their
    checksums; (None, None) when there is no such cache; (None, why) when it is damaged."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None, "unreadable"
    if array.ndim < 1 or len(array) != (len(array) if count is None else count):
        return None, "wrong shape"
    count = len(array)
    expected = load_seal(path, count, int(array[0].nbytes) if count else 0, meta_path)
    if isinstance(expected, str):
        return None, expected
    problem = _mismatch(expected, row_digests(array))
    return (None, problem) if problem else (array, None)


def clear_entries(*paths: Path) -> str | None:
    """Make way for a cache being rebuilt under ``paths``: an empty folder sitting at one of its
    names is removed (a rename onto it would fail); returns what was there, for the note that the
    cache is rebuilt, or None. A folder that holds anything is refused in one line, never removed."""
    from mixgen.errors import MixgenError

    found = None
    for path in map(Path, paths):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            path.rmdir()
        except OSError as exc:
            raise MixgenError(
                f"{path} is a folder where mixgen keeps a cache file, and it cannot be removed "
                f"({exc.strerror or exc}); move it out of OUT and re-run"
            ) from None
        found = found or f"{path.name} was a folder"
    return found


def remove_cache(path: Path) -> None:
    """Remove a cache file and its sidecar (a damaged one, before it is rebuilt)."""
    for p in (Path(path), digests_path(path)):
        with contextlib.suppress(OSError):
            p.unlink()


def _chunks(count: int, size: int) -> Iterable[list[int]]:
    for start in range(0, count, size):
        yield list(range(start, min(start + size, count)))


class RecordFile:
    """``count`` records of ``shape``/``dtype`` in one file; thread-safe for distinct records."""

    def __init__(self, path: Path, count: int, shape: tuple[int, ...], dtype: np.dtype | str):
        """Open an existing file of exactly ``count`` records (``outdir.allocate`` makes new ones)."""
        self.path, self.count, self.shape, self.dtype = Path(path), count, tuple(shape), np.dtype(dtype)
        self.record_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # no effect on a regular file
        opened = os.fstat(self.fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_size != self.count * self.record_bytes:
            os.close(self.fd)
            raise ValueError(f"{self.path} has the wrong size for {count} records of {shape}")
        # CRC-32 of each record as written; a new file (see outdir.allocate) holds zeros.
        self.digests = np.full(count, zlib.crc32(bytes(self.record_bytes)), dtype=np.uint32)

    def write(self, position: int, record: np.ndarray) -> None:
        data = np.ascontiguousarray(record, dtype=self.dtype)
        assert data.shape == self.shape, (data.shape, self.shape)
        buffer = memoryview(data).cast("B")
        self.digests[position] = zlib.crc32(buffer)
        os.pwrite(self.fd, buffer, position * self.record_bytes)

    def read(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Records at ``positions`` as one (len, *shape) array."""
        out = np.empty((len(positions), *self.shape), dtype=self.dtype)
        view = memoryview(out.reshape(len(positions), -1)).cast("B")
        for row, position in enumerate(positions):
            start = row * self.record_bytes
            got = os.preadv(self.fd, [view[start : start + self.record_bytes]], int(position) * self.record_bytes)
            if got != self.record_bytes:
                raise OSError(f"short read from {self.path}")
        return out

    def sync(self) -> None:
        os.fsync(self.fd)

    def seal(self, path: Path | None = None, meta_path: Path | None = None) -> None:
        """Sync, then write the sidecar of the file (now at ``path`` if it was renamed)."""
        self.sync()
        seal(path or self.path, self.digests, self.record_bytes, meta_path)

    def read_digests(self, pool: Executor | None = None, chunk: int = 64) -> np.ndarray:
        """CRC-32 of every record as it is on disk now (read in chunks, on ``pool`` if given)."""

        def one(positions: list[int]) -> np.ndarray:
            return row_digests(self.read(positions))

        mapper: Callable = pool.map if pool is not None else map
        parts = list(mapper(one, _chunks(self.count, chunk)))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def damage(self, meta_path: Path | None = None, pool: Executor | None = None) -> str | None:
        """None when every record matches the sidecar written by ``seal``; else why not. Also
        adopts the checked digests, so that a later ``seal`` stays right."""
        expected = load_seal(self.path, self.count, self.record_bytes, meta_path)
        if isinstance(expected, str):
            return expected
        actual = self.read_digests(pool)
        problem = _mismatch(expected, actual)
        if problem is None:
            self.digests = actual
        return problem

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
