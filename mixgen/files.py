"""Writing files so that no fault leaves one that lies: atomic writes under temp names unique per
process, stale temp cleanup, disk space reserved before memory-mapping, and file digests. Used in
OUT and outside it (the ONNX cache, index files); where OUT may be is ``mixgen.output.checks``, the
names of its files ``mixgen.layout``, and faults and SIGTERM become one line in ``mixgen.faults``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixgen.layout import TEMP_SUFFIX


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (weights, index Parquets, written outputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest_or_none(path: Path) -> str | None:
    """``file_digest``, or None where the file cannot be read (verify reports it as missing)."""
    try:
        return file_digest(path)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Temp files


def temp_path(path: Path) -> Path:
    """A hidden sibling name unique to this process (pid and host), so that concurrent workers on
    one shared filesystem never write through the same temp file; ``remove_stale_temps`` can tell
    from the name whether its writer is gone."""
    return Path(path).with_name(f".{Path(path).name}.{os.getpid()}@{socket.gethostname()}{TEMP_SUFFIX}")


def _temp_owner(name: str) -> tuple[int, str] | None:
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX) and "@" in name):
        return None
    left, _, host = name[: -len(TEMP_SUFFIX)].rpartition("@")
    pid = left.rpartition(".")[2]
    return (int(pid), host) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temps(*directories: Path, include_own: bool = False) -> list[Path]:
    """Delete temp files left by dead writers on this host (kill -9, power loss). Temps of live
    processes and of other hosts are left alone: they may belong to a sibling worker."""
    removed = []
    host = socket.gethostname()
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:  # gone (a slice board removed by the worker that sealed the caches)
            continue
        for entry in entries:
            owner = _temp_owner(entry.name)
            if owner is None or owner[1] != host or not entry.is_file(follow_symlinks=False):
                continue
            pid = owner[0]
            if (pid == os.getpid() and include_own) or not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a process-unique temp sibling of ``path``; on success fsync it and rename it into
    place, on failure remove it. Readers see the whole file or none of it."""
    temp = temp_path(path)
    try:
        with open(temp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_file(Path(path), "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str))


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file; OSError for anything else. Opened without blocking, so a FIFO
    (or a symlink to one) in OUT is refused at once instead of waiting for a writer for good."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is absent, unreadable or not an object."""
    try:
        data = json.loads(read_regular(Path(path)).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_npy(path: Path, array: Any) -> None:
    import numpy as np

    with atomic_file(Path(path)) as f:
        np.save(f, array)


def _fallocate(fd: int, nbytes: int) -> int:
    """Linux fallocate(2) without glibc's slow write-a-byte-per-block emulation; 0 or an errno."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return errno.EOPNOTSUPP
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int
    return 0 if fallocate(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()


def allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` whose blocks are reserved now where the filesystem allows:
    a full disk then fails here, before any work, with ENOSPC instead of midway through a cache."""
    with open(path, "wb") as f:
        code = _fallocate(f.fileno(), nbytes)
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(code, os.strerror(code), str(path))
        f.truncate(nbytes)


# ---------------------------------------------------------------------------------------------
