"""How a run meets faults: an OS error while writing OUT becomes one actionable line, and SIGTERM
(torchrun or SLURM stopping a job) becomes an interrupt, so the run records why it stopped and
discards its unfinished shard."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError


def fault_error(exc: OSError, fallback: Path) -> MixgenError:
    """One actionable line for an OS error met while writing OUT."""
    where = exc.filename or fallback
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
        return MixgenError(f"no space left on device writing {where}; free space and re-run the same command to resume")
    if exc.errno == errno.EFBIG:
        return MixgenError(
            f"file too large writing {where}: it reached the file size limit (ulimit -f, or the filesystem's); "
            "raise it and re-run the same command to resume (or start anew with a smaller --shard-size)"
        )
    reason = exc.strerror or str(exc) or type(exc).__name__
    return MixgenError(f"{reason}: {where}; fix that and re-run the same command to resume")


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Name ``path`` in an OS error raised without a file name inside the block: a write or close of
    an open file ("File too large", "No space left on device") says which file it was, not OUT."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


_interrupts_seen = 0


def interrupts_seen() -> int:
    """How many Ctrl-C or SIGTERM signals this process has taken under ``interrupts_raise``."""
    return _interrupts_seen


def raise_if_interrupted_since(seen: int) -> None:
    """Raise KeyboardInterrupt if a signal came after ``seen`` but was swallowed on the way: a C
    extension's import (ONNX Runtime, torch) turns an interrupt into an ImportError, and the
    fallback for that error would otherwise carry on as if nothing had been asked."""
    if _interrupts_seen != seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Treat SIGTERM (torchrun or SLURM stopping a job) like Ctrl-C, so that the run records
    'interrupted' and discards its unfinished shard, and count both (``interrupts_seen``). A signal
    the process ignores (a background job's Ctrl-C) stays ignored. Only possible in the main
    thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        global _interrupts_seen
        _interrupts_seen += 1
        raise KeyboardInterrupt

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
