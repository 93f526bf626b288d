"""Fixed-size record files for the per-source caches (views, feature maps) under OUT/.mixgen.

Records are read and written with pread/pwrite rather than a memory map: the data then sits in
the OS page cache, which the kernel can drop under pressure, instead of in this process's
resident set, so peak RSS stays small however many sources there are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RecordFile:
    """``count`` records of ``shape``/``dtype`` in one file; thread-safe for distinct records."""

    def __init__(self, path: Path, count: int, shape: tuple[int, ...], dtype: np.dtype | str):
        """Open an existing file of exactly ``count`` records (``outdir.allocate`` makes new ones)."""
        self.path, self.count, self.shape, self.dtype = Path(path), count, tuple(shape), np.dtype(dtype)
        self.record_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR)
        if os.fstat(self.fd).st_size != self.count * self.record_bytes:
            os.close(self.fd)
            raise ValueError(f"{self.path} has the wrong size for {count} records of {shape}")

    def write(self, position: int, record: np.ndarray) -> None:
        data = np.ascontiguousarray(record, dtype=self.dtype)
        assert data.shape == self.shape, (data.shape, self.shape)
        os.pwrite(self.fd, memoryview(data).cast("B"), position * self.record_bytes)

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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()
