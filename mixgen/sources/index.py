"""The index of a run's sources: ``Source`` (path, class id, row of its bytes) and ``SourceIndex``
with the digest that tells whether SRC changed. Kept apart from the scanners (``mixgen.sources.scan``,
``mixgen.sources.index_files``) so that both build it without importing each other."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from mixgen.layout import RECORD_NAME

NOT_FOUND = "file not found"  # the reason of a listed source that is not there (index file, CUB)
SHORTFALL_SHARE = 0.05  # over this share of the listed sources unusable, the summary says so first


@dataclass(frozen=True)
class Source:
    """One input image: its path relative to SRC (POSIX form) and its 0-based class id. ``row``
    is where its bytes lie in the index's byte source (a Hugging Face Parquet), -1 for a file."""

    path: str
    label: int
    row: int = -1


class ByteSource(Protocol):
    """Image bytes stored inside an index file, read by row (thread-safe)."""

    def read(self, row: int) -> bytes: ...


@dataclass
class SourceIndex:
    """The sources of a run. ``root`` is SRC as given (a folder or an index file); ``base`` is the
    folder that relative source paths resolve against (``root`` itself for a folder)."""

    root: Path
    layout: str
    classes: list[str]
    items: list[Source]
    digest: str = ""
    warnings: list[str] = field(default_factory=list)
    # Sources refused while scanning (an index row with an empty label, a missing file or listed
    # twice; a FIFO or other non-regular file in any layout): listed with the unreadable images,
    # as {"path", "reason"}.
    rejected: list[dict[str, str]] = field(default_factory=list)
    base: Path | None = None
    blobs: ByteSource | None = field(default=None, repr=False, compare=False)
    content_digest: str = ""  # of the bytes inside the index file, when it holds images

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = self.root
        if not self.digest:
            self.digest = _digest(self)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: list[int]) -> SourceIndex:
        """The index restricted to the given positions (used to drop unreadable images)."""
        return replace(self, items=[self.items[i] for i in keep], digest="", warnings=list(self.warnings))

    def locate(self, item: Source) -> Path | bytes:
        """Where a source's pixels are: its file, or its bytes inside the index file."""
        if item.row >= 0 and self.blobs is not None:
            return self.blobs.read(item.row)
        return self.base / item.path


def _digest(index: SourceIndex) -> str:
    """Hash of layout, classes, and every (path, label, byte size): changes when SRC changes."""
    h = hashlib.sha256()
    h.update(f"{index.layout}\n".encode())
    if index.content_digest:
        h.update(f"content\t{index.content_digest}\n".encode())
    for name in index.classes:
        h.update(f"class\t{name}\n".encode())
    for item in index.items:
        if item.row >= 0:
            h.update(f"{item.path}\t{item.label}\trow {item.row}\n".encode())
            continue
        try:
            size = (index.base / item.path).stat().st_size
        except OSError:
            size = -1
        h.update(f"{item.path}\t{item.label}\t{size}\n".encode())
    return h.hexdigest()


def shortfall(index: SourceIndex, readable: Sequence[bool] | None = None) -> str | None:
    """In words, when a large share of what SRC lists cannot be used (over SHORTFALL_SHARE) or a
    class has no usable photo: how many, which share, and what to do; else None. ``readable``:
    which of ``index.items`` decoded (None before decoding: the scan's refusals alone)."""
    unreadable = 0 if readable is None else len(readable) - sum(map(bool, readable))
    listed = len(index.items) + len(index.rejected)
    missing = sum(NOT_FOUND in r["reason"] for r in index.rejected)
    unusable = len(index.rejected) + unreadable
    usable = [item for k, item in enumerate(index.items) if readable is None or readable[k]]
    empty = len(index.classes) - len({item.label for item in usable})
    if not listed or (unusable <= SHORTFALL_SHARE * listed and not empty):
        return None
    parts = []
    if unusable:
        what = "are missing or unreadable" if missing else "cannot be read"
        what = "are missing" if missing == unusable else what
        photos = "photos" if index.layout == "imagefolder" else "listed photos"
        parts.append(f"{unusable:,} of {listed:,} {photos} ({_percent(unusable / listed)}) {what}")
    if empty:
        verb, what = "has" if empty == 1 else "have", "none" if parts else "no readable photo"
        parts.append(f"{empty:,} of {len(index.classes):,} classes {verb} {what}")
    if index.layout == "cub":
        advice = (
            "check that SRC/images holds every photo images.txt lists for the split, or drop the missing ones' "
            "lines from images.txt (class ids stay those of classes.txt)"
        )
    elif index.layout == "imagefolder":
        advice = f"check that SRC is complete (what could not be read is listed in {RECORD_NAME})"
    else:
        advice = "check the index's paths against its folder, or drop the rows it cannot use"
    uses = f"the {len(usable):,} usable photos" if len(usable) != 1 else "the one usable photo"
    return f"{'; '.join(parts)}: the run uses {uses}; {advice}"


def _percent(share: float) -> str:
    """75 %, 0.4 %, 99.9 %: whole percents unless that would round to 0 or 100."""
    value = 100 * share
    if 0 < value < 1 or 99 < value < 100:
        return f"{value:.1f} %"
    return f"{value:.0f} %"


def special_file(path: Path | str) -> str | None:
    """What a path is when it exists but is no regular file ("a FIFO", ...), else None (a regular
    file, or nothing there: the decoder then lists it as unreadable). Opening a FIFO would block
    the decoder for good, so only regular files are ever read."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    kind = next((name for test, name in kinds if test(mode)), "a device")
    return f"{kind}, not a regular file; only regular files are read"
