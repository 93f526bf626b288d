"""Scanning SRC into a hashed index of (image path, class id): an ImageFolder or CUB-200-2011
folder here, an index file (CSV, TSV, JSONL, Parquet, Hugging Face image Parquet) in
``mixgen.index_files``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mixgen.errors import MixgenError, UsageError
from mixgen.source_index import Source, SourceIndex

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CUB_MARKERS = ("images.txt", "image_class_labels.txt")
RUN_RECORD = "mixgen.json"  # a folder holding it is a mixgen OUT: its images are outputs, not sources


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan(
    src: Path,
    layout: str = "auto",
    split: str | None = None,
    path_column: str = "path",
    label_column: str = "label",
    classes: Path | None = None,
) -> SourceIndex:
    """Read SRC as an ImageFolder or CUB-200-2011 tree, or as an index file (the column and
    ``classes`` options apply to that only); raise MixgenError if it holds nothing."""
    from mixgen.index_files import INDEX_SUFFIXES, read_index

    src = Path(src)
    if not src.exists():
        raise MixgenError(f"SRC {src} does not exist: pass a folder of class sub-folders or an index file")
    if src.is_file() and src.suffix.lower() in INDEX_SUFFIXES:
        if layout not in ("auto", "index"):
            raise UsageError(f"--layout {layout} does not apply to an index file SRC; drop it")
        if split not in (None, "all"):
            raise UsageError("--split applies to the CUB layout only; drop it for an index file SRC")
        return read_index(src, path_column, label_column, classes)
    if not src.is_dir():
        raise MixgenError(
            f"SRC {src} is not a folder or an index file ({', '.join(INDEX_SUFFIXES)}): "
            "pass a folder of class sub-folders or a path,label table"
        )
    for option, value, default in (
        ("--path-column", path_column, "path"),
        ("--label-column", label_column, "label"),
        ("--classes", classes, None),
    ):
        if value != default:
            raise UsageError(f"{option} applies to an index file SRC only; drop it for a folder")
    if (src / RUN_RECORD).is_file():
        raise MixgenError(f"SRC {src} holds a mixgen run ({RUN_RECORD}), not source images; pass the image folder")
    if layout == "auto":
        layout = "cub" if all((src / m).is_file() for m in CUB_MARKERS) else "imagefolder"
    if layout == "cub":
        index = _scan_cub(src, split or "train")
    elif layout == "imagefolder":
        if split not in (None, "all"):
            raise UsageError("--split applies to the CUB layout only; drop it for an ImageFolder SRC")
        index = _scan_imagefolder(src)
    else:
        raise UsageError(f"--layout must be auto, imagefolder or cub, not {layout!r}")
    if not index.items:
        raise MixgenError(f"SRC {src} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return index


def _utf8(name: str) -> bool:
    """Names must be valid UTF-8: they go into Parquet strings (os gives bytes it cannot decode as
    lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_dir(entry: os.DirEntry) -> bool:
    """DirEntry.is_dir, with a symlink loop or an unreadable entry counting as no folder."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _loops_back(path: Path, src: Path) -> bool:
    """True for a folder that is SRC itself or one of its ancestors (a symlink loop): walking it
    would scan SRC again under another class name."""
    try:
        real, root = path.resolve(strict=True), src.resolve(strict=True)
    except (OSError, RuntimeError):
        return True
    return real == root or real in root.parents


def _holds_run(path: Path) -> bool:
    try:
        return (path / RUN_RECORD).is_file()
    except OSError:
        return False


def _scan_imagefolder(src: Path) -> SourceIndex:
    warnings: list[str] = []
    class_dirs = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith(".") or not _is_dir(entry):
            continue
        if not _utf8(entry.name):
            warnings.append(f"class folder {entry.name!r} ignored: its name is not valid UTF-8; rename it")
        elif _loops_back(src / entry.name, src):
            warnings.append(f"class folder {entry.name!r} ignored: a symlink back to SRC or above (a loop)")
        elif _holds_run(src / entry.name):
            warnings.append(f"folder {entry.name!r} ignored: it holds a mixgen run ({RUN_RECORD}), not sources")
        else:
            class_dirs.append(entry.name)
    if not class_dirs:
        raise MixgenError(f"SRC {src} has no class sub-folders: expected SRC/<class>/<image>")
    items: list[Source] = []
    bad_names = 0
    for label, name in enumerate(class_dirs):
        found = []
        # followlinks=False: a symlinked folder (possibly a loop) is never descended into.
        for dirpath, dirnames, filenames in os.walk(src / name, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _utf8(d))
            runs = [d for d in dirnames if _holds_run(Path(dirpath) / d)]
            for d in runs:
                dirnames.remove(d)
                where = (Path(dirpath) / d).relative_to(src).as_posix()
                warnings.append(f"folder {where!r} ignored: it holds a mixgen run ({RUN_RECORD}), not sources")
            rel_dir = Path(dirpath).relative_to(src)
            images = [f for f in filenames if _is_image(f)]
            good = [f for f in images if _utf8(f)]
            bad_names += len(images) - len(good)
            found.extend((rel_dir / f).as_posix() for f in good)
        if not found:
            warnings.append(f"class folder {name!r} holds no images")
        items.extend(Source(path, label) for path in sorted(found))
    if bad_names:
        warnings.append(f"{bad_names} image(s) ignored: file names that are not valid UTF-8; rename them")
    stray = []
    for entry in os.scandir(src):
        with contextlib.suppress(OSError):
            if entry.is_file() and _is_image(entry.name):
                stray.append(entry.name)
    if stray:
        warnings.append(f"{len(stray)} image(s) directly in SRC ignored (not in a class folder)")
    return SourceIndex(src, "imagefolder", class_dirs, items, warnings=warnings)


def _read_table(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise MixgenError(f"CUB layout: {path} is missing; point SRC at the CUB_200_2011 folder")
    return [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]


def _scan_cub(src: Path, split: str) -> SourceIndex:
    if split not in ("train", "test", "all"):
        raise UsageError(f"--split must be train, test or all, not {split!r}")
    images = dict(_read_table(src / "images.txt"))
    labels = {k: int(v) - 1 for k, v in _read_table(src / "image_class_labels.txt")}
    if (src / "classes.txt").is_file():
        classes = [name for _, name in sorted(_read_table(src / "classes.txt"), key=lambda r: int(r[0]))]
    else:
        classes = sorted({Path(p).parent.name for p in images.values()})
    is_train = {}
    if split != "all":
        is_train = {k: v.strip() == "1" for k, v in _read_table(src / "train_test_split.txt")}
    items = []
    for image_id, rel in images.items():
        if split != "all" and is_train.get(image_id) != (split == "train"):
            continue
        label = labels.get(image_id)
        if label is None or not 0 <= label < len(classes):
            raise MixgenError(f"CUB layout: image {image_id} has no valid class in image_class_labels.txt")
        items.append(Source(f"images/{rel.strip()}", label))
    items.sort(key=lambda s: s.path)
    return SourceIndex(src, "cub", classes, items)
