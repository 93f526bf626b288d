"""Where OUT may be: the checks that refuse an OUT inside SRC, sources inside OUT, and an OUT that
is a file, read-only, or a folder of someone else's files, each before anything is written there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mixgen.errors import MixgenError
from mixgen.layout import CACHE_DIR, RECORD_NAME, WORKER_GLOB

if TYPE_CHECKING:
    from mixgen.sources.index import SourceIndex


def check_out_outside_src(src: Path, out: Path) -> None:
    """Refuse an OUT equal to or inside SRC (exit 1, like any OUT refused): the next scan of SRC would take the
    outputs for sources, and every run on SRC would count as a different one."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        return  # a missing SRC is reported by the scan; an index file lists its sources itself
    real_src, real_out = src.resolve(), out.resolve()
    if real_out == real_src or real_src in real_out.parents:
        where = "is SRC itself" if real_out == real_src else f"is inside SRC {src}"
        raise MixgenError(
            f"OUT {out} {where}: the next scan of SRC would read the outputs as sources; choose an OUT outside SRC"
        )


def check_sources_outside_out(index: SourceIndex, out: Path) -> None:
    """Refuse an index file that lists images inside OUT (the mirror of ``check_out_outside_src``):
    --overwrite or a new run's files would replace them before they are read, and a later run
    would read outputs as sources."""
    inside = os.path.realpath(out) + os.sep
    for item in index.items:
        if item.row < 0 and os.path.normpath(os.path.join(index.base, item.path)).startswith(inside):
            raise MixgenError(
                f"SRC {index.root} lists images inside OUT {out} (first: {item.path}); "
                "choose an OUT that holds none of the sources"
            )


def _check_writable(out: Path) -> None:
    """Refuse an OUT this process cannot create or write in (a read-only folder, a path through a
    file) with one line, before the slow start-up and in a dry run too."""
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MixgenError(f"OUT {out}: {existing} is a file, not a folder; choose another OUT")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "in it" if existing == out else f"in {existing} to create it"
        raise MixgenError(f"OUT {out}: no permission to write {where}; choose an OUT you can write to")


def check_out_is_ours(out: Path) -> None:
    """Refuse an OUT that is a file, or a non-empty folder holding no mixgen run, before anything
    (even a lock file) is written there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MixgenError(f"OUT {out} is a file; choose a folder")
    _check_writable(out)
    if not out.is_dir() or (out / RECORD_NAME).is_file() or any(out.glob(WORKER_GLOB)):
        return
    # No record yet: only a sibling worker's cache, lock or temp files may be there already.
    foreign = sorted(e.name for e in os.scandir(out) if not e.name.startswith(CACHE_DIR))
    if foreign:
        raise MixgenError(
            f"OUT {out} is not empty and holds no mixgen run (found {foreign[0]!r}); choose an empty or new folder"
        )
