"""Housekeeping of the OUT folder so that no fault costs a run or leaves a file that lies: atomic
JSON writes with temp names unique per process, the run record merged from per-worker records
under a file lock (so that ``--num-shards`` workers sharing OUT never clobber each other), stale
temp cleanup, disk space reserved before memory-mapping, and OS faults turned into one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError, UsageError

RECORD_NAME = "mixgen.json"
CACHE_DIR = ".mixgen"
WORKER_RECORD = "mixgen.worker-{index}-of-{count}.json"
WORKER_GLOB = "mixgen.worker-*-of-*.json"
TEMP_SUFFIX = ".tmp"
# Settings of one worker process, not of the run: they stay out of the merged record's config.
WORKER_SETTINGS = ("device", "workers", "batch_size")


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
        if not Path(directory).is_dir():
            continue
        for entry in os.scandir(directory):
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


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is absent, unreadable or not an object."""
    try:
        from mixgen.cache import read_regular

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
# Where OUT may be


def check_out_outside_src(src: Path, out: Path) -> None:
    """Refuse an OUT equal to or inside SRC (UsageError): the next scan of SRC would take the
    outputs for sources, and every run on SRC would count as a different one."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        return  # a missing SRC is reported by the scan; an index file lists its sources itself
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        where = "is SRC itself" if real_out == real_src else f"is inside SRC {src}"
        raise UsageError(
            f"OUT {out} {where}: the next scan of SRC would read the outputs as sources; choose an OUT outside SRC"
        )


def check_out_is_ours(out: Path) -> None:
    """Refuse an OUT that is a file, or a non-empty folder holding no mixgen run, before anything
    (even a lock file) is written there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MixgenError(f"OUT {out} is a file; choose a folder")
    if not out.is_dir() or (out / RECORD_NAME).is_file() or any(out.glob(WORKER_GLOB)):
        return
    # No record yet: only a sibling worker's cache, lock or temp files may be there already.
    foreign = sorted(e.name for e in os.scandir(out) if not e.name.startswith(CACHE_DIR))
    if foreign:
        raise MixgenError(
            f"OUT {out} is not empty and holds no mixgen run (found {foreign[0]!r}); choose an empty or new folder"
        )


# ---------------------------------------------------------------------------------------------
# The run record


def worker_record_path(out: Path, index: int, count: int) -> Path:
    return Path(out) / WORKER_RECORD.format(index=index, count=count)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish_record(out: Path, record: dict[str, Any], shard_index: int, num_shards: int) -> None:
    """Write this worker's state. A single worker owns OUT/mixgen.json. With several workers each
    writes its own mixgen.worker-<i>-of-<N>.json and then, under a lock, rebuilds mixgen.json from
    all N, so that the last writer always sees every worker's latest state."""
    out = Path(out)
    if num_shards == 1:
        write_json(out / RECORD_NAME, record)
        return
    mine = {**record, "worker": {"index": shard_index, "count": num_shards}}
    with _locked(out / CACHE_DIR / "records.lock"):
        write_json(worker_record_path(out, shard_index, num_shards), mine)
        write_json(out / RECORD_NAME, merge_records(out, mine, num_shards))


def merge_records(out: Path, mine: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """The run-level record of N workers: complete only when every worker is; failed or
    interrupted when any is; progress and counts summed."""
    workers = []
    for index in range(num_shards):
        record = mine if index == mine["worker"]["index"] else read_json(worker_record_path(out, index, num_shards))
        if record is None or record.get("fingerprint") != mine.get("fingerprint"):
            record = {"status": "not started"}
        workers.append(record)
    statuses = [w.get("status") for w in workers]
    if all(s == "complete" for s in statuses):
        status = "complete"
    elif "failed" in statuses:
        status = "failed"
    elif "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "running"
    merged = {k: v for k, v in mine.items() if k not in ("worker", "progress", "counts", "timings", "error")}
    merged["status"] = status
    merged["config"] = {k: v for k, v in mine["config"].items() if k not in WORKER_SETTINGS}
    merged["config"]["num_shards"] = num_shards
    merged["workers"] = [
        {
            "index": index,
            "status": w.get("status"),
            "device": (w.get("config") or {}).get("device"),
            "progress": w.get("progress"),
            **({"error": w["error"]} if w.get("error") else {}),
        }
        for index, w in enumerate(workers)
    ]
    progress = [w.get("progress") or {} for w in workers]
    merged["progress"] = {
        "shards_done": sum(p.get("shards_done", 0) for p in progress),
        "outputs_done": sum(p.get("outputs_done", 0) for p in progress),
    }
    if status == "complete":
        keys = ("written", "kept_from_previous_run", "shards")
        counts = dict(mine.get("counts") or {})
        counts.update({k: sum((w.get("counts") or {}).get(k, 0) for w in workers) for k in keys})
        merged["counts"] = counts
    return merged


def remove_worker_records(out: Path) -> None:
    """A single worker covers every shard: per-worker records of an earlier split are obsolete."""
    for path in Path(out).glob(WORKER_GLOB):
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Faults


def fault_error(exc: OSError, fallback: Path) -> MixgenError:
    """One actionable line for an OS error met while writing OUT."""
    where = exc.filename or fallback
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
        return MixgenError(f"no space left on device writing {where}; free space and re-run the same command to resume")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return MixgenError(f"{reason}: {where}; fix that and re-run the same command to resume")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (torchrun or SLURM stopping a job) like Ctrl-C, so that the run records
    'interrupted' and discards its unfinished shard. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with a fixed number of torch CPU threads. Reductions split over threads round
    differently, and an L-BFGS fit amplifies that: fixing the count makes the probe, and so every
    CAM, the same whatever OMP_NUM_THREADS a worker runs with (torchrun sets it to 1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
