"""``--overwrite``: remove the previous run from OUT, and only what mixgen itself names there: its
run records, its shard folders with their manifests, images and tars, its caches and its temps.
Everything is looked at before anything is removed, so a foreign file among them (or a folder
mixgen never makes, or ``data`` as a symbolic link) stops the removal in one line with nothing
lost; and a file that cannot be removed is an error, never a previous run silently kept."""

from __future__ import annotations

import os
from pathlib import Path

from mixgen.errors import MixgenError
from mixgen.layout import (
    CACHE_DIR,
    CACHE_FILE,
    DATA_DIR,
    IMAGE,
    MANIFEST_NAME,
    SHARD_FOLDER,
    SLICE_BOARD,
    SLICE_FILE,
    TAR_NAME,
    TEMP_SUFFIX,
)


def _is_temp(name: str) -> bool:
    """files.temp_path's form: ``.NAME.PID@HOST.tmp``."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and "@" in name


def _refuse(out: Path, path: Path, what: str) -> MixgenError:
    return MixgenError(
        f"OUT {out}: --overwrite removes only mixgen's own files, and {path} {what}; "
        "move it out of OUT (or choose a new OUT) and re-run"
    )


def _own_files(out: Path, folder: Path, is_own_file, files: list[Path], skip: set[Path] = frozenset()) -> None:
    """Collect the files of ``folder``; any entry that is not a regular file mixgen names (nor one of
    ``skip``, collected apart) is refused."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if Path(entry.path) in skip:
            continue
        if not entry.is_file(follow_symlinks=False):
            raise _refuse(out, Path(entry.path), "is not a file mixgen writes")
        if not (is_own_file(entry.name) or _is_temp(entry.name)):
            raise _refuse(out, Path(entry.path), "is not a file mixgen writes")
        files.append(Path(entry.path))


def _top_folder(out: Path, name: str) -> Path | None:
    path = out / name
    if path.is_symlink():
        raise _refuse(out, path, f"is a symbolic link (to {os.readlink(path)}), not the folder mixgen made")
    if not path.exists():
        return None
    if not path.is_dir():
        raise _refuse(out, path, "is not a folder")
    return path


def previous_run_files(out: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) of the previous run's shards and caches in OUT, folders deepest first;
    MixgenError naming the first entry among them that mixgen does not name."""

    out = Path(out)
    files: list[Path] = []
    folders: list[Path] = []
    data = _top_folder(out, DATA_DIR)
    if data is not None:
        for entry in sorted(os.scandir(data), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False) and SHARD_FOLDER.match(entry.name):
                _own_files(out, path, lambda name: name == MANIFEST_NAME or bool(IMAGE.match(name)), files)
                folders.append(path)
            elif entry.is_file(follow_symlinks=False) and (TAR_NAME.match(entry.name) or _is_temp(entry.name)):
                files.append(path)
            else:
                raise _refuse(out, path, "is not a shard mixgen writes")
        folders.append(data)
    cache = _top_folder(out, CACHE_DIR)
    if cache is not None:
        boards = [
            Path(e.path) for e in os.scandir(cache) if e.is_dir(follow_symlinks=False) and SLICE_BOARD.match(e.name)
        ]
        for board in boards:
            _own_files(out, board, lambda name: bool(SLICE_FILE.match(name)), files)
            folders.append(board)
        _own_files(out, cache, lambda name: bool(CACHE_FILE.match(name)), files, skip=set(boards))
        folders.append(cache)
    return files, folders


def remove_previous_run(out: Path, records: list[Path]) -> None:
    """Remove the previous run (see the module doc); MixgenError, one line, when something foreign
    sits among its files (nothing is removed then) or a file cannot be removed. The run records go
    last: a removal that stops midway leaves OUT a mixgen run, which --overwrite can finish."""
    files, folders = previous_run_files(out)
    for path in files:
        _remove(out, path, os.unlink)
    for path in folders:
        _remove(out, path, os.rmdir)
    for path in records:
        _remove(out, path, os.unlink)


def _remove(out: Path, path: Path, remove) -> None:
    try:
        remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MixgenError(
            f"OUT {out}: --overwrite could not remove {path} ({exc.strerror or exc}); "
            "remove the previous run by hand or choose a new OUT"
        ) from None
