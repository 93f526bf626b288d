"""One writer per OUT: the workers of one job (one per shard index) may share it, nobody else.

Two kinds of flock(2) files live in OUT, never removed while they can be in use:

- ``OUT/.mixgen.lock`` is the door: held exclusively for the short critical section in which a
  process checks who else is writing, claims its place, and (with ``--overwrite``) removes an old
  run and publishes the new record. Workers started at the same moment pass it one at a time, so
  exactly one of them removes the old run and the others find the new one already in place.
- ``OUT/.mixgen.lock.<shard index>`` is held exclusively for the whole run by the worker of that
  shard index and names it (pid, host, command, job fingerprint, number of shards).

Use: ``with Door(out): lock = claim(...); <prepare OUT, publish the record>``, run, ``lock.release()``.

The source stage's slices are claimed the same way (``hold``: one flock file per slice under
OUT/.mixgen, naming its holder), and ``held`` serialises its short decisions (``mixgen.pipeline.prepare``).

The kernel drops a flock when its process dies, however it dies: a lock file left by kill -9 or
a power loss is only a name, and the next run takes it over. No lock is taken where fcntl is
missing (not POSIX)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError
from mixgen.layout import DOOR_NAME, WORKER_PREFIX

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def command_line() -> str:
    """The command of this process as a user would type it (``mixgen snapmix SRC OUT ...``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("mixgen", "__main__.py", "-m"):
        argv[0] = "mixgen"
    text = shlex.join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _flock(fd: int, flags: int) -> bool:
    """flock(2); False when another holds it (LOCK_NB). On a filesystem without locks (some
    network mounts answer ENOLCK) it counts as taken: mixgen then runs unlocked, as before."""
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    return True


def _try_lock(fd: int) -> bool:
    return _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def hold(path: Path) -> int | None:
    """Take the flock of ``path`` (created if needed) without waiting and write who holds it; the
    descriptor to close when done, or None while a live process holds it. A holder that dies,
    however it dies, leaves the file free for the next taker."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its folder is gone: the work it guarded is finished
        return None
    if fcntl is not None and not _try_lock(fd):
        os.close(fd)
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command_line()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


@contextlib.contextmanager
def held(path: Path):
    """An exclusive flock on ``path`` for the body, waiting for it as long as it takes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            _flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def member(path: Path) -> int:
    """Join the workers sharing one piece of work: a shared flock on ``path``, held until the
    descriptor is closed (or the process dies). Members join and leave inside one exclusive
    section (``held``), so that ``last_member`` there tells whether anyone else is still at it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        _flock(fd, fcntl.LOCK_SH)
    return fd


def last_member(fd: int) -> bool:
    """Whether no other live process holds ``member``'s flock; close ``fd`` afterwards."""
    return fcntl is None or _try_lock(fd)


class Door:
    """The short exclusive section for checking, claiming, overwriting and the first record.
    Entered on creation; ``close`` (idempotent) leaves it."""

    def __init__(self, out: Path):
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        self.fd = os.open(Path(out) / DOOR_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self) -> Door:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Holder:
    """What a live lock holder wrote about itself."""

    pid: int | None
    host: str
    command: str
    fingerprint: str | None
    shard_index: int | None
    num_shards: int | None
    started: str

    def describe(self) -> str:
        where = f"pid {self.pid}" if self.pid else "a process starting up"
        where += f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        since = f", running since {self.started}" if self.started else ""
        return f"{where}{since}: {self.command}" if self.command else where + since


def _read_holder(fd: int) -> Holder:
    try:
        info: dict[str, Any] = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    return Holder(
        pid=info.get("pid"),
        host=str(info.get("host") or ""),
        command=str(info.get("command") or ""),
        fingerprint=info.get("fingerprint"),
        shard_index=info.get("shard_index"),
        num_shards=info.get("num_shards"),
        started=str(info.get("started") or ""),
    )


def holder_of(path: Path) -> Holder:
    """Who holds (or last held) the lock file ``path``, as it wrote itself there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return Holder(None, "", "", None, None, None, "")
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


class OutLock:
    """This worker's claim on OUT, held until ``release`` (or the process ends)."""

    def __init__(self, out: Path, fd: int | None, path: Path | None):
        self.out, self.fd, self.path = Path(out), fd, path

    def release(self, inside_door: bool = False) -> None:
        """Remove the lock file and drop the lock. The removal passes the door (``inside_door``:
        the caller is in it already), so that no newcomer is claiming the same file just now."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError), contextlib.nullcontext() if inside_door else Door(self.out):
            if self.path is not None:
                self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holders(out: Path, remove_stale: bool = True) -> list[tuple[int, Holder]]:
    """(shard index, holder) of every worker lock of OUT held by a live process. Stale lock files
    (their process is gone) are removed: call it inside ``door``. With ``remove_stale=False`` it
    only looks, for a command that only reads OUT (``mixgen verify``), outside the door."""
    if fcntl is None:
        return []
    holders = []
    try:
        entries = list(os.scandir(out))
    except OSError:
        return []
    for entry in entries:
        suffix = entry.name[len(WORKER_PREFIX) :] if entry.name.startswith(WORKER_PREFIX) else ""
        if not suffix.isdigit():
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                if remove_stale:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
            else:
                holders.append((int(suffix), _read_holder(fd)))
        finally:
            os.close(fd)
    return sorted(holders, key=lambda item: item[0])


def _live_holder(path: Path) -> Holder | None:
    """Who holds the lock file ``path``, or None when nobody alive does (or it is not there). Only
    looks: a stale file is left in place (``live_holders``, inside the door, removes it) and the
    probe lock lasts microseconds, which ``claim`` waits out."""
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None  # stale: its process is gone (closing the fd drops our probe lock)
        return _read_holder(fd)
    finally:
        os.close(fd)


def _refusal(out: Path, why: str, holder: Holder) -> MixgenError:
    stop = f"kill {holder.pid}" if holder.pid else "stop it"
    return MixgenError(
        f"OUT {out} is being written by {why} ({holder.describe()}); wait for it to finish "
        f"or stop it ({stop}) and re-run, or choose another OUT"
    )


def refuse_if_taken(out: Path, shard_index: int) -> None:
    """Refuse at once, before any slow start-up work, when a live process holds this shard
    index's lock: whatever job it runs, two writers of one shard index never cooperate. (The
    full check, which needs the job's fingerprint, is ``claim``.)"""
    holder = _live_holder(Path(out) / f"{WORKER_PREFIX}{shard_index}")
    if holder is None:
        return
    if holder.command and holder.command == command_line():
        why = "the same command"
    elif holder.num_shards and holder.num_shards > 1:
        why = f"worker {shard_index} of a sharded job"
    else:
        why = "another mixgen process"
    raise _refusal(out, why, holder)


def claim(out: Path, fingerprint: str, shard_index: int, num_shards: int) -> OutLock:
    """Take this worker's lock on OUT, inside ``door``. Refuses (MixgenError, one line) when a live
    process writes OUT as another job, as another split of this one, or as this same shard index;
    sibling workers of this job (other shard indices, same fingerprint and shard count) pass."""
    out = Path(out)
    if fcntl is None:  # pragma: no cover
        return OutLock(out, None, None)
    for index, holder in live_holders(out):
        same_job = holder.fingerprint == fingerprint and holder.num_shards == num_shards
        if same_job and index != shard_index:
            continue
        if not same_job:
            why = "another mixgen run"
        elif num_shards > 1:
            why = f"worker {index} of this job (--shard-index {index} twice?)"
        else:
            why = "the same command"
        raise _refusal(out, why, holder)
    path = out / f"{WORKER_PREFIX}{shard_index}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    # Only a newcomer's probe (refuse_if_taken, outside the door) can hold it now, for microseconds.
    for _ in range(100):
        if _try_lock(fd):
            break
        time.sleep(0.01)
    else:
        holder = _read_holder(fd)
        os.close(fd)
        raise _refusal(out, "another mixgen process", holder)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command_line(),
        "fingerprint": fingerprint,
        "shard_index": shard_index,
        "num_shards": num_shards,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return OutLock(out, fd, path)
