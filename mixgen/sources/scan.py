"""Scanning SRC into a hashed index of (image path, class id): an ImageFolder or CUB-200-2011
folder here, an index file (CSV, TSV, JSONL, Parquet, Hugging Face image Parquet) in
``mixgen.sources.index_files``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mixgen.errors import MixgenError, UsageError
from mixgen.layout import RECORD_NAME  # a folder holding it is a mixgen OUT: its images are outputs
from mixgen.sources.index import NOT_FOUND, Source, SourceIndex, special_file

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CUB_MARKERS = ("images.txt", "image_class_labels.txt")


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
    from mixgen.sources.index_files import INDEX_SUFFIXES, read_index

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
    if (src / RECORD_NAME).is_file():
        raise MixgenError(f"SRC {src} holds a mixgen run ({RECORD_NAME}), not source images; pass the image folder")
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
        return (path / RECORD_NAME).is_file()
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
            warnings.append(f"folder {entry.name!r} ignored: it holds a mixgen run ({RECORD_NAME}), not sources")
        else:
            class_dirs.append(entry.name)
    if not class_dirs:
        raise MixgenError(f"SRC {src} has no class sub-folders: expected SRC/<class>/<image>")
    items: list[Source] = []
    rejected: list[dict[str, str]] = []
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
                warnings.append(f"folder {where!r} ignored: it holds a mixgen run ({RECORD_NAME}), not sources")
            rel_dir = Path(dirpath).relative_to(src)
            images = [f for f in filenames if _is_image(f)]
            good = [f for f in images if _utf8(f)]
            bad_names += len(images) - len(good)
            for f in good:
                path = (rel_dir / f).as_posix()
                if kind := special_file(os.path.join(dirpath, f)):
                    rejected.append({"path": path, "reason": f"{path}: {kind}"})
                else:
                    found.append(path)
        if not found:
            warnings.append(f"class folder {name!r} holds no images")
        items.extend(Source(path, label) for path in sorted(found))
    rejected.sort(key=lambda r: r["path"])
    if bad_names:
        warnings.append(f"{bad_names} image(s) ignored: file names that are not valid UTF-8; rename them")
    stray = []
    for entry in os.scandir(src):
        with contextlib.suppress(OSError):
            if entry.is_file() and _is_image(entry.name):
                stray.append(entry.name)
    if stray:
        warnings.append(f"{len(stray)} image(s) directly in SRC ignored (not in a class folder)")
    return SourceIndex(src, "imagefolder", class_dirs, items, warnings=warnings, rejected=rejected)


def _read_table(path: Path) -> list[tuple[int, str, str]]:
    """(line number, id, value) of each non-blank ``<id> <value>`` line of a CUB text file."""
    if not path.is_file():
        raise MixgenError(f"CUB layout: {path} is missing; point SRC at the CUB_200_2011 folder")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MixgenError(f"CUB layout: {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MixgenError(f"CUB layout: {path} line {line} is not UTF-8 text; save the file as UTF-8") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            raise MixgenError(
                f"CUB layout: {path} line {number}: {line.strip()[:60]!r} is not '<id> <value>'; fix the line"
            )
        rows.append((number, parts[0], parts[1].strip()))
    return rows


def cub_table(path: Path) -> dict[str, tuple[str, int]]:
    """{id: (value, line number)} of a CUB text file; an id on two lines is refused (the files must
    say one thing of each image), naming both lines."""
    table: dict[str, tuple[str, int]] = {}
    for number, key, value in _read_table(path):
        if key in table:
            raise MixgenError(
                f"CUB layout: {path} line {number}: id {key} is listed again (line {table[key][1]}); "
                "keep one line per id"
            )
        table[key] = (value, number)
    return table


def _cub_split(path: Path, images: dict[str, tuple[str, int]]) -> dict[str, bool]:
    """{image id: is a train image} from train_test_split.txt: every value 0 or 1, every image of
    images.txt on a line (an image left out or marked otherwise would be dropped without a word)."""
    split = {}
    for key, (value, number) in cub_table(path).items():
        if value not in ("0", "1"):
            raise MixgenError(
                f"CUB layout: {path} line {number}: {value[:20]!r} is not 1 (train) or 0 (test); fix the line"
            )
        split[key] = value == "1"
    for image_id, (_, number) in images.items():
        if image_id not in split:
            raise MixgenError(
                f"CUB layout: image {image_id} (images.txt line {number}) has no line in {path.name}; add one"
            )
    return split


def _cub_id(text: str, path: Path, number: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise MixgenError(f"CUB layout: {path} line {number}: {text[:40]!r} is not a whole number; fix the line")
    return int(text)


def _cub_classes(src: Path, class_ids: dict[str, tuple[int, int]], images: dict[str, tuple[str, int]]):
    """Class names and {original class id: 0-based id}: the ids of ``classes.txt`` in file order (a
    subset such as species 026-050 keeps its original ids), else the ids used, sorted, each named
    by the folder of its first image."""
    path = src / "classes.txt"
    if path.is_file():
        classes, position = [], {}
        for number, key, name in _read_table(path):
            class_id = _cub_id(key, path, number)
            if class_id in position:
                raise MixgenError(f"CUB layout: {path} line {number}: class {class_id} is listed twice; fix the file")
            position[class_id] = len(classes)
            classes.append(name)
        return classes, position
    folder = {}
    for image_id, (class_id, _) in sorted(class_ids.items(), key=lambda kv: kv[1][1]):
        if image_id in images:
            folder.setdefault(class_id, Path(images[image_id][0]).parent.name or str(class_id))
    ordered = sorted({class_id for class_id, _ in class_ids.values()})
    return [folder.get(c, str(c)) for c in ordered], {c: i for i, c in enumerate(ordered)}


def _scan_cub(src: Path, split: str) -> SourceIndex:
    if split not in ("train", "test", "all"):
        raise UsageError(f"--split must be train, test or all, not {split!r}")
    images = cub_table(src / "images.txt")
    first_id: dict[str, str] = {}
    for image_id, (rel, number) in images.items():
        if (other := first_id.setdefault(rel, image_id)) != image_id:
            raise MixgenError(
                f"CUB layout: {src / 'images.txt'} line {number}: {rel[:80]} is listed again "
                f"(image {other}, line {images[other][1]}); keep one id per image"
            )
    labels_path = src / "image_class_labels.txt"
    class_ids = {
        key: (_cub_id(value, labels_path, number), number) for key, (value, number) in cub_table(labels_path).items()
    }
    classes, position = _cub_classes(src, class_ids, images)
    is_train = {}
    if split != "all":
        is_train = _cub_split(src / "train_test_split.txt", images)
    items, rejected = [], []
    for image_id, (rel, number) in images.items():
        if split != "all" and is_train.get(image_id) != (split == "train"):
            continue
        if image_id not in class_ids:
            raise MixgenError(
                f"CUB layout: image {image_id} (images.txt line {number}) has no line in {labels_path.name}; add one"
            )
        class_id, label_line = class_ids[image_id]
        if class_id not in position:
            raise MixgenError(
                f"CUB layout: image {image_id} has class {class_id} ({labels_path.name} line {label_line}), "
                "which classes.txt does not list; fix either file"
            )
        path = f"images/{rel}"
        if kind := special_file(src / path):
            rejected.append({"path": path, "reason": f"{path}: {kind}"})
            continue
        if not (src / path).is_file():  # listed, not there: no source, so no cache slot (run record lists it)
            rejected.append({"path": path, "reason": f"{path}: {NOT_FOUND} (images.txt line {number})"})
            continue
        items.append(Source(path, position[class_id]))
    items.sort(key=lambda s: s.path)
    rejected.sort(key=lambda r: r["path"])
    return SourceIndex(src, "cub", classes, items, rejected=rejected)
