"""The index of a run's sources: ``Source`` (path, class id, row of its bytes) and ``SourceIndex``
with the digest that tells whether SRC changed. Kept apart from the scanners (``mixgen.sources.scan``,
``mixgen.sources.index_files``) so that both build it without importing each other."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol


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
