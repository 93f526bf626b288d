"""Shard writers: how a shard's images reach disk. ``files`` writes each image into the shard's
folder next to its manifest (``data/NNNNN/_000000042.jpg``); ``webdataset`` writes one tar per
shard (``data/NNNNN.tar``: ``000000042.jpg`` + ``000000042.json`` per output, in index order), the
layout the ``webdataset`` library, ``datasets.load_dataset("webdataset")`` and large-scale trainers
stream. Either way the manifest is ``data/NNNNN/metadata.parquet``, written last and atomically, so
a shard is complete exactly when its manifest is there and matches its images.

A writer owns the shard layout, and everything that depends on it goes through one small
interface, used by the run, ``verify`` and ``verify --recompute`` alike: ``file_name`` of output
i (the manifest's ``file_name``); ``open`` a shard, ``add`` image bytes with their row (from any
thread, in any order), ``commit``; ``is_complete`` and ``discard_unfinished`` for resume;
``complete_prefix``, ``kept_rows`` and ``open(..., keep)`` to extend the last shard of a grown run
(its finished manifest kept until the new one is whole; ``settle`` finishes or undoes a cut one);
``output_digest`` (the sha256 of an output as stored); and its own verification of a shard
(``claims``, ``check_shard``, ``leftovers``)."""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError
from mixgen.faults import writing
from mixgen.files import file_digest_or_none, temp_path
from mixgen.layout import (
    GROWN_PREFIX,
    MANIFEST_NAME,
    OUTPUT_NAME,
    PENDING_MANIFEST,
    TAR_NAME,
    TEMP_SUFFIX,
    image_name,
    json_name,
    member_name,
    shard_dir,
    tar_path,
)
from mixgen.output.tarfiles import check_tar, json_row, members_before, read_tar_index, tar_header

# A hashing job of verify: returns its problems and the number of images it hashed.
HashJob = Callable[[], tuple[list[str], int]]
ManifestRows = tuple[list[str], list[str], list[int]]  # a manifest's file names, sha256 and indices
Extras = dict[int, Path]  # data/ entries a writer claims, by shard
ShardCheck = tuple[list[tuple[list[str], str]], list[HashJob]]  # (problem lines, kind) and hashing jobs
Fingerprints = str | Collection[str]  # the run fingerprint(s) a kept shard's manifest may carry


def _accepted(fingerprint: Fingerprints) -> Collection[str]:
    return (fingerprint,) if isinstance(fingerprint, str) else fingerprint


class Shard(abc.ABC):
    """One shard being written."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @abc.abstractmethod
    def add(self, row: dict[str, Any], data: bytes) -> None:
        """One output's encoded bytes with its manifest row (sha256 set); any thread, any order."""
        raise NotImplementedError

    @abc.abstractmethod
    def commit(self, rows: list[dict[str, Any]]) -> None:
        """Make the shard durable, images first and the manifest last (atomically)."""
        raise NotImplementedError


class ShardWriter(abc.ABC):
    """The writer interface (see the module's docstring), and what every writer shares: the shard's
    folder, where its manifest lies, and reading, reopening and cleaning it. ``FilesWriter`` and
    ``WebDatasetWriter`` are its two kinds; ``make_writer`` picks one by ``--writer``."""

    name: str

    def __init__(self, out: Path, fmt: str) -> None:
        self.out, self.format = Path(out), fmt

    def directory(self, shard: int) -> Path:
        return shard_dir(self.out, shard)

    @abc.abstractmethod
    def file_name(self, index: int) -> str:
        """The manifest's ``file_name`` of output ``index``."""

    @abc.abstractmethod
    def where(self, shard: int, file_name: str) -> str:
        """Where an output lies, relative to OUT, for messages."""

    @abc.abstractmethod
    def output_digest(self, shard: int, file_name: str) -> str | None:
        """sha256 of an output's stored bytes; None where it cannot be read."""

    # verify: what a shard's folder and data/ must hold besides the manifest

    @abc.abstractmethod
    def claims(self, entry_name: str) -> int | None:
        """The shard a data/ entry other than a shard folder belongs to (None: not this writer's)."""

    @abc.abstractmethod
    def check_shard(self, shard: int, files: set[str], rows: ManifestRows, extras: Extras) -> ShardCheck:
        """A committed shard's layout problems (the lines of each kind, with the kind's name: verify
        caps each) and the hashing jobs that compare its images with the manifest's sha256.
        ``files``: the names in the shard's folder; ``rows``: the manifest's file names, sha256
        and indices; ``extras``: the data/ entries ``claims`` took, this shard's removed."""

    @abc.abstractmethod
    def leftovers(self, extras: dict[int, Path]) -> list[str]:
        """Entries claimed by no committed shard."""

    @abc.abstractmethod
    def is_complete(self, shard: int, expected: range, fingerprint: Fingerprints) -> bool:
        """Done only when the manifest is this run's, opens with exactly the expected indices and
        every image it names exists."""

    @abc.abstractmethod
    def open(self, shard: int, span: range, table_schema: Any, keep: int | None = None) -> Shard:
        """A shard to write ``span`` into; with ``keep``, the outputs of ``span`` before it are
        already stored (``complete_prefix``) and stay."""

    @abc.abstractmethod
    def discard_unfinished(self, shard: int) -> None:
        """Remove a shard that holds no manifest: its images were never committed."""

    def _manifest_names(self, shard: int, expected: range, fingerprint: Fingerprints) -> list[str] | None:
        """The manifest's file names when it opens with exactly the expected indices and its
        metadata carries this run's fingerprint (a shard of another run, even with the same
        indices, is never adopted; a grown run also accepts the run it grows), else None."""
        import pyarrow.parquet as pq

        from mixgen.output.manifest import metadata_of

        path = self.directory(shard) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            with pq.ParquetFile(path) as manifest:  # not read_table: it imports pyarrow.dataset (pandas)
                if metadata_of(manifest.schema_arrow).get("fingerprint") not in _accepted(fingerprint):
                    return None
                table = manifest.read(columns=["index", "file_name"])
        except Exception:  # noqa: BLE001 - any unreadable manifest is simply redone
            return None
        if sorted(table.column("index").to_pylist()) != list(expected):
            return None
        return table.column("file_name").to_pylist()

    def complete_prefix(self, shard: int, span: range, fingerprint: Fingerprints) -> int:
        """Where the outputs of a complete shorter shard stop (``span.start`` when there is none): the
        last shard of a run with fewer --pairs, which a grown run extends instead of redoing. The
        shorter shard must be the run's (or the grown run's: ``fingerprint``), like any kept shard."""
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.directory(shard) / MANIFEST_NAME) as manifest:
                indices = sorted(manifest.read(columns=["index"])[0].to_pylist())
        except Exception:  # noqa: BLE001 - no manifest, or an unreadable one: nothing to keep
            return span.start
        stop = span.start + len(indices)
        if not span.start < stop < span.stop or indices != list(range(span.start, stop)):
            return span.start
        return stop if self.is_complete(shard, range(span.start, stop), fingerprint) else span.start

    def kept_rows(self, shard: int, keep: int) -> list[dict[str, Any]]:
        """The manifest rows of the outputs before ``keep`` that a reopened shard keeps."""
        import pyarrow.parquet as pq

        rows = pq.read_table(self.directory(shard) / MANIFEST_NAME).to_pylist()
        return [row for row in rows if row["index"] < keep]

    def clean(self, shard: int) -> None:
        directory = self.directory(shard)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    def _listed(self, shard: int) -> set[str] | None:
        """The file names the shard's manifest lists (None when it has none or cannot be read): what
        ``settle`` keeps in the shard's folder beside the manifest."""
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.directory(shard) / MANIFEST_NAME) as manifest:
                return set(manifest.read(columns=["file_name"]).column("file_name").to_pylist())
        except Exception:  # noqa: BLE001 - no manifest, or an unreadable one
            return None

    def settle(self, shard: int) -> None:
        """Leave a shard as a committed manifest says after a grow of it was cut: finish the commit
        when its new manifest was already written whole (``PENDING_MANIFEST``), else remove what the
        grow added beside the kept manifest (outputs it does not list, GROWN files, temps). A
        file of any other name is left alone (``verify`` names it)."""
        directory = self.directory(shard)
        if (directory / PENDING_MANIFEST).is_file():
            finish_grow(directory)
            return
        if not (directory / MANIFEST_NAME).is_file():
            return
        listed = self._listed(shard)
        if listed is None:
            return  # an unreadable manifest: the shard is redone, and cleaned, as unfinished
        for entry in os.scandir(directory):
            name = entry.name
            added = name.startswith(GROWN_PREFIX) or name.endswith(TEMP_SUFFIX) or OUTPUT_NAME.fullmatch(name)
            if added and name not in listed and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)

    def _discard_folder(self, shard: int) -> None:
        """Remove a shard folder that holds no manifest: its images were never committed. A shard
        with one (a grown shard being extended) goes back to what its manifest says (``settle``)."""
        directory = self.directory(shard)
        if (directory / MANIFEST_NAME).is_file() or (directory / PENDING_MANIFEST).is_file():
            self.settle(shard)
        elif directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


class FilesWriter(ShardWriter):
    """``files``: images as files in the shard folder, beside its manifest."""

    name = "files"

    def file_name(self, index: int) -> str:
        return image_name(index, self.format)

    def where(self, shard: int, file_name: str) -> str:
        return (self.directory(shard) / file_name).relative_to(self.out).as_posix()

    def output_digest(self, shard: int, file_name: str) -> str | None:
        return file_digest_or_none(self.directory(shard) / file_name)

    def claims(self, entry_name: str) -> int | None:
        return None

    def check_shard(self, shard: int, files: set[str], rows: ManifestRows, extras: Extras) -> ShardCheck:
        names, digests, _ = rows
        directory = self.directory(shard)
        counted = set(names)
        absent = [n for n in dict.fromkeys(names) if n not in files or "/" in n or n == MANIFEST_NAME]
        orphans = sorted(files - counted - {MANIFEST_NAME})
        problems = [
            ([f"{directory / n}: listed in the manifest but missing" for n in absent], "missing files"),
            ([f"{directory / n}: orphan file (not in the manifest)" for n in orphans], "orphans"),
        ]
        absent_set = set(absent)
        jobs = [
            functools.partial(_check_file, directory / n, d)
            for n, d in zip(names, digests, strict=True)
            if n not in absent_set
        ]
        return problems, jobs

    def leftovers(self, extras: dict[int, Path]) -> list[str]:
        return []

    def is_complete(self, shard: int, expected: range, fingerprint: Fingerprints) -> bool:
        names = self._manifest_names(shard, expected, fingerprint)
        directory = self.directory(shard)
        return names is not None and all((directory / name).is_file() for name in names)

    def open(self, shard: int, span: range, table_schema: Any, keep: int | None = None) -> Shard:
        """A shard to write ``span`` into; with ``keep``, the outputs of ``span`` before it are
        already stored (``complete_prefix``) and stay, and so does the shard's finished manifest
        until the new one is whole: the outputs it lists from ``keep`` on are redone under GROWN
        names (``commit`` moves them into place)."""
        if keep is None or keep <= span.start:
            self.clean(shard)
            return FilesShard(self.directory(shard), table_schema)
        self.settle(shard)
        redone = {name for name in self._listed(shard) or () if _output_index(name) >= keep}
        return FilesShard(self.directory(shard), table_schema, frozenset(redone))

    def discard_unfinished(self, shard: int) -> None:
        self._discard_folder(shard)


class FilesShard(Shard):
    def __init__(self, directory: Path, table_schema: Any, redone: frozenset[str] = frozenset()) -> None:
        """``redone``: the outputs a kept manifest lists that this grown shard writes anew (under
        GROWN names until ``commit``, so the kept manifest never lists a changed file)."""
        super().__init__(directory)
        self.schema, self.redone = table_schema, redone

    def add(self, row: dict[str, Any], data: bytes) -> None:
        name = row["file_name"]
        path = self.directory / (GROWN_PREFIX + name if name in self.redone else name)
        with writing(path), open(path, "wb") as f:
            f.write(data)

    def commit(self, rows: list[dict[str, Any]]) -> None:
        from mixgen.output import manifest

        if (self.directory / MANIFEST_NAME).is_file():  # a grown shard: its kept manifest goes last
            manifest.write_shard(self.directory, rows, self.schema, PENDING_MANIFEST)
            finish_grow(self.directory)
        else:
            manifest.write_shard(self.directory, rows, self.schema)


def finish_grow(directory: Path) -> None:
    """The end of a grown shard's commit, also run again by ``settle`` after a cut one: move the
    redone outputs (and the new tar) over the old, then the pending manifest over the kept one. Each
    step is a rename, so repeating it after a crash is safe."""
    tar_name = tar_path(directory.parent.parent, int(directory.name)).name
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(GROWN_PREFIX):
            name = entry.name[len(GROWN_PREFIX) :]
            os.replace(entry.path, directory.parent / name if name == tar_name else directory / name)
    os.replace(directory / PENDING_MANIFEST, directory / MANIFEST_NAME)
    from mixgen.output.manifest import fsync_dir

    with contextlib.suppress(OSError):
        for where in (directory, directory.parent):
            fsync_dir(where)


def _output_index(name: str) -> int:
    """The output index in an output's file or member name (``_000000042.jpg``, ``000000042.jpg``)."""
    return int(name.lstrip("_").partition(".")[0])


def _check_file(path: Path, digest: str) -> tuple[list[str], int]:
    actual = file_digest_or_none(path)
    if actual is None:
        return [f"{path}: cannot be read"], 1
    if actual != digest:
        return [f"{path}: sha256 differs from the manifest (corrupt or replaced)"], 1
    return [], 1


class WebDatasetWriter(ShardWriter):
    """One tar per shard beside the shard's manifest folder; ``file_name`` in the manifest is the
    image's member name inside ``data/NNNNN.tar``."""

    name = "webdataset"

    def file_name(self, index: int) -> str:
        return member_name(index, self.format)

    def where(self, shard: int, file_name: str) -> str:
        return f"{tar_path(self.out, shard).relative_to(self.out).as_posix()}:{file_name}"

    def output_digest(self, shard: int, file_name: str) -> str | None:
        path = tar_path(self.out, shard)
        try:
            offset, size = read_tar_index(path)[file_name]
            with open(path, "rb") as f:
                f.seek(offset)
                return hashlib.sha256(f.read(size)).hexdigest()
        except (OSError, KeyError, tarfile.TarError, MixgenError):
            return None

    def claims(self, entry_name: str) -> int | None:
        return int(entry_name[:5]) if TAR_NAME.match(entry_name) else None

    def check_shard(self, shard: int, files: set[str], rows: ManifestRows, extras: Extras) -> ShardCheck:
        directory = self.directory(shard)
        problems: list[tuple[list[str], str]] = []
        jobs: list[HashJob] = []
        tar = extras.pop(shard, None)
        if tar is None:
            missing = f"{tar_path(self.out, shard)}: missing (the shard's images); re-run the same command"
            problems.append(([missing], "tars"))
        else:
            jobs.append(functools.partial(check_tar, tar, directory / MANIFEST_NAME))
        orphans = sorted(files - {MANIFEST_NAME})
        problems.append(([f"{directory / n}: unexpected file in a tar shard's folder" for n in orphans], "files"))
        return problems, jobs

    def leftovers(self, extras: dict[int, Path]) -> list[str]:
        return [
            f"{tar}: tar without a manifest (an unfinished shard; re-run the same command to redo it)"
            for _, tar in sorted(extras.items())
        ]

    def is_complete(self, shard: int, expected: range, fingerprint: Fingerprints) -> bool:
        """Done when the manifest is this run's, opens with the expected indices and the tar holds
        exactly its members, each whole."""
        names = self._manifest_names(shard, expected, fingerprint)
        if names is None:
            return False
        try:
            members = read_tar_index(tar_path(self.out, shard))
        except (OSError, tarfile.TarError, MixgenError):
            return False
        wanted = [m for name in sorted(names) for m in (name, json_name(name))]
        return list(members) == wanted

    def clean(self, shard: int) -> None:
        tar_path(self.out, shard).unlink(missing_ok=True)
        super().clean(shard)

    def open(self, shard: int, span: range, table_schema: Any, keep: int | None = None) -> Shard:
        final = tar_path(self.out, shard)
        if keep is None or keep <= span.start:
            self.clean(shard)
            return TarShard(self.directory(shard), final, span, table_schema, self.format)
        self.settle(shard)  # the kept manifest and tar stay until the new tar and manifest are whole
        kept = members_before(final, member_name(keep, self.format))
        return TarShard(self.directory(shard), final, span, table_schema, self.format, (keep, kept))

    def _listed(self, shard: int) -> set[str] | None:
        return set()  # the shard's folder holds only its manifest: anything a grow added goes

    def discard_unfinished(self, shard: int) -> None:
        directory = self.directory(shard)
        if not (directory / MANIFEST_NAME).is_file() and not (directory / PENDING_MANIFEST).is_file():
            tar_path(self.out, shard).unlink(missing_ok=True)
        self._discard_folder(shard)


class TarShard(Shard):
    """Members are appended in index order whatever order the encoder threads finish in: an
    output waits in ``pending`` until every earlier one is in the tar. The tar is written under a
    temp name inside the shard folder, fsynced and renamed to ``data/NNNNN.tar`` on commit."""

    def __init__(
        self, directory: Path, final: Path, span: range, table_schema: Any, fmt: str, kept: tuple[int, int] = (0, 0)
    ) -> None:
        """``kept``: (the first output not kept, the byte length of the kept outputs' members in
        ``final``), when a grown run extends the shard: those bytes start the new tar as they are."""
        super().__init__(directory)
        self.final, self.span, self.schema, self.format = final, span, table_schema, fmt
        keep, length = kept
        self.grown = keep > span.start  # the kept tar and manifest stay until both new ones are whole
        self.temp = directory / (GROWN_PREFIX + final.name) if self.grown else temp_path(directory / final.name)
        self._file = open(self.temp, "wb")  # noqa: SIM115 - closed in commit (or removed with the folder)
        if length:
            with open(final, "rb") as old, writing(final):
                while length > 0:
                    chunk = old.read(min(length, 1 << 24))
                    if not chunk:
                        raise MixgenError(f"{final}: shorter than its members; re-run with --overwrite")
                    self._file.write(chunk)
                    length -= len(chunk)
        # A tar opened for writing starts at the file's position: the kept members stay as they are.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._pending: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._next = max(span.start, keep)
        self._lock = threading.Lock()

    def add(self, row: dict[str, Any], data: bytes) -> None:
        # A write error names the shard's tar (the temp it is written as lies in the shard's folder).
        with self._lock, writing(self.final):
            self._pending[row["index"]] = (row, data)
            while self._next in self._pending:
                ready, image = self._pending.pop(self._next)
                text = json.dumps(json_row(ready, self.schema), ensure_ascii=False, separators=(",", ":")).encode()
                self._tar.addfile(tar_header(ready["file_name"], len(image)), io.BytesIO(image))
                self._tar.addfile(tar_header(json_name(ready["file_name"]), len(text)), io.BytesIO(text))
                self._next += 1

    def commit(self, rows: list[dict[str, Any]]) -> None:
        from mixgen.output import manifest

        if self._pending or self._next != self.span.stop:
            raise RuntimeError(f"tar shard {self.final.name}: outputs {self._next}.. were never added")
        with writing(self.final):
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self.grown:
            manifest.write_shard(self.directory, rows, self.schema, PENDING_MANIFEST)
            finish_grow(self.directory)
            return
        os.replace(self.temp, self.final)
        with contextlib.suppress(OSError):
            fd = os.open(self.final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        manifest.write_shard(self.directory, rows, self.schema)


def make_writer(name: str, out: Path, fmt: str) -> ShardWriter:
    if name == "webdataset":
        return WebDatasetWriter(out, fmt)
    return FilesWriter(out, fmt)
