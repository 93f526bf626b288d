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
