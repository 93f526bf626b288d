"""Index files as SRC: a CSV, TSV, JSONL or Parquet table of (path, label) rows next to the images,
or a Hugging Face image Parquet (what ``datasets`` writes and the Hub serves) that holds the image
bytes itself. Rows become sources in file order; a row that cannot be a source (empty path or
label, missing file, a path listed twice) is refused with a reason and listed with the unreadable
images instead of failing the run.

Why it is over 400 lines: four formats (CSV/TSV, JSONL, Parquet, Hugging Face image Parquet) share
one row model, one label policy (names, ids, the bound on unnamed ids) and one set of refusals."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import posixpath
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixgen.errors import MixgenError, exc_line
from mixgen.files import file_digest
from mixgen.sources.index import NOT_FOUND, Source, SourceIndex, special_file

INDEX_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
INTEGER = re.compile(r"^[+-]?\d+$")
# Row groups of a Hugging Face Parquet kept decoded at once: the view decoder walks the rows in
# order from several threads, so a few groups cover every thread's next rows.
CACHED_GROUPS = 4
# Integer labels without --classes are named by themselves, ids 0..max: an id far beyond what the
# rows could hold (a typo, a hash, 1e300) would make that list huge, so such a row is refused.
MAX_UNNAMED_CLASS_ID = 100_000
UNNAMED_IDS_PER_ROW = 10
MAX_ID_DIGITS = 30  # longer digit strings are out of any range (and int() refuses over 4300 digits)


@dataclass
class _Row:
    """One raw row: where it is (for messages), its path or image, its label, its byte row."""

    where: str
    path: Any
    label: Any
    row: int = -1


def read_index(
    path: Path, path_column: str = "path", label_column: str = "label", classes_file: Path | None = None
) -> SourceIndex:
    """The SourceIndex of an index file (chosen by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    names = _read_classes(classes_file) if classes_file is not None else None
    blobs: ParquetImages | None = None
    content_digest = ""
    if suffix in (".csv", ".tsv"):
        rows, typed = _read_csv(path, path_column, label_column, "\t" if suffix == ".tsv" else ","), False
        layout, metadata_names = "index", None
    elif suffix == ".jsonl":
        rows, typed = _read_jsonl(path, path_column, label_column), True
        layout, metadata_names = "index", None
    elif suffix == ".parquet":
        rows, blobs, metadata_names = _read_parquet(path, path_column, label_column)
        typed = True
        layout = "hf-parquet" if blobs is not None else "index"
        if blobs is not None:
            content_digest = file_digest(path)
    else:
        raise MixgenError(f"SRC {path}: index files must end in {', '.join(INDEX_SUFFIXES)}")
    if names is None and metadata_names is not None:
        problem = _class_names_problem(metadata_names, "class id")
        if problem:
            raise MixgenError(
                f"SRC {path}: the ClassLabel names of column {label_column!r}: {problem}; "
                "fix the dataset's features or name the classes with --classes"
            )
        names = metadata_names
    return _build(path, layout, rows, typed, names, blobs, content_digest)


def _read_classes(path: Path) -> list[str]:
    """Class names, one per line, line i naming id i (blank lines at the end are ignored)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise MixgenError(f"--classes {path}: {reason}; pass a text file, one class name per line") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise MixgenError(f"--classes {path}: holds no class names; write one name per line")
    problem = _class_names_problem(lines, "line")
    if problem:
        raise MixgenError(f"--classes {path}: {problem}; line i must name class id i-1, each name once")
    return lines


def _class_names_problem(names: list[str], position: str) -> str | None:
    """Why a list of class names cannot name classes (a blank or repeated name: they become
    folder names of OUT, which ``datasets``' imagefolder loader and every reader need distinct),
    or None. ``position``: how a name's place is called in messages ("line" counts from 1)."""
    offset = 1 if position == "line" else 0
    blank = next((i for i, name in enumerate(names) if not name.strip()), None)
    if blank is not None:
        return f"{position} {blank + offset} is blank"
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return f"class {name!r} is listed twice"
        seen.add(name)
    return None


def _missing_column(path: Path, column: str, option: str, columns: list[str]) -> MixgenError:
    shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
    return MixgenError(f"SRC {path} has no column {column!r} (columns: {shown or 'none'}); name it with {option}")


@contextlib.contextmanager
def _any_field_size() -> Iterator[None]:
    """Lift the csv module's field size limit (128 kB by default: a valid CSV with a long value in
    any column, a caption or an embedded JSON, would be refused) to the largest a C long holds,
    and put it back after."""
    limit = sys.maxsize
    while True:
        try:
            previous = csv.field_size_limit(limit)
            break
        except OverflowError:  # a C long of 32 bits (Windows)
            limit //= 2
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: Path, path_column: str, label_column: str, delimiter: str) -> list[_Row]:
    try:
        with _any_field_size(), open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            # The header is the first line that is not blank (an editor's lone newline is no header).
            header = next((values for values in reader if any(v.strip() for v in values)), None)
            if header is None:
                names = (
                    f"{path_column} and {label_column}, separated by a tab"
                    if delimiter == "\t"
                    else f"{path_column}{delimiter}{label_column}"
                )
                raise MixgenError(
                    f"SRC {path}: the index file is empty; write a header line ({names}), then one line per image"
                )
            header = [h.strip() for h in header]
            for column, option in ((path_column, "--path-column"), (label_column, "--label-column")):
                if column not in header:
                    raise _missing_column(path, column, option, header)
            p, lab = header.index(path_column), header.index(label_column)
            rows = []
            for values in reader:
                if not any(v.strip() for v in values):
                    continue
                rows.append(
                    _Row(
                        f"line {reader.line_num}",
                        values[p] if p < len(values) else None,
                        values[lab] if lab < len(values) else None,
                    )
                )
            return rows
    except UnicodeDecodeError:
        raise MixgenError(f"SRC {path} is not UTF-8 text; save the index as UTF-8") from None
    except csv.Error as exc:
        raise MixgenError(f"SRC {path}: malformed {delimiter!r}-separated text ({exc}); fix the file") from None
    except OSError as exc:
        raise MixgenError(f"SRC {path} cannot be read ({exc.strerror or exc})") from None


def _read_jsonl(path: Path, path_column: str, label_column: str) -> list[_Row]:
    rows, seen_columns = [], set()
    bad: list[_Row] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    bad.append(_Row(f"line {number}", None, None))
                    continue
                if not isinstance(record, dict):
                    bad.append(_Row(f"line {number}", None, None))
                    continue
                seen_columns.update(record)
                rows.append(_Row(f"line {number}", record.get(path_column), record.get(label_column)))
    except UnicodeDecodeError:
        raise MixgenError(f"SRC {path} is not UTF-8 text; save the index as UTF-8") from None
    except OSError as exc:
        raise MixgenError(f"SRC {path} cannot be read ({exc.strerror or exc})") from None
    if not rows and not bad:
        raise MixgenError(
            f"SRC {path}: the index file is empty; write one JSON object per image, one per line "
            f'({{"{path_column}": ..., "{label_column}": ...}})'
        )
    for column, option in ((path_column, "--path-column"), (label_column, "--label-column")):
        if rows and column not in seen_columns:
            raise _missing_column(path, column, option, sorted(seen_columns))
    for row in bad:
        row.label = _NOT_AN_OBJECT
    return sorted(rows + bad, key=lambda r: int(r.where.split()[1]))


_NOT_AN_OBJECT = object()  # label of a JSONL line that is not a JSON object


def _is_image_struct(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and {arrow_type.field(i).name for i in range(arrow_type.num_fields)} >= {
        "bytes",
        "path",
    }


def _read_parquet(path: Path, path_column: str, label_column: str) -> tuple[list[_Row], ParquetImages | None, Any]:
    """Rows of a Parquet index: a string path column, or an image struct<bytes, path> column (the
    ``image`` column of a Hugging Face image dataset unless --path-column names another)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_file() and path.stat().st_size == 0:
        raise MixgenError(f"SRC {path}: the index file is empty (0 bytes); write the table again or pick another file")
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except Exception as exc:  # noqa: BLE001 - any reader error means an unreadable file
        reason = exc_line(exc)
        raise MixgenError(f"SRC {path} is not a readable Parquet file ({reason})") from None
    columns = schema.names
    image_column = path_column
    if path_column not in columns and path_column == "path" and "image" in columns:
        image_column = "image"
    if image_column not in columns:
        raise _missing_column(path, path_column, "--path-column", columns)
    if label_column not in columns:
        raise _missing_column(path, label_column, "--label-column", columns)
    image_type = schema.field(image_column).type
    label_type = schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        raise MixgenError(f"SRC {path}: column {label_column!r} is {label_type}; labels must be integers or strings")
    metadata_names = _class_label_names(schema, label_column)
    if _is_image_struct(image_type):
        blobs = ParquetImages(path, image_column)
        paths, has_bytes = blobs.scan()
        labels = parquet.read(columns=[label_column]).column(0).to_pylist()
        rows = []
        for i, (name, label) in enumerate(zip(paths, labels, strict=True)):
            if has_bytes[i]:
                rows.append(_Row(f"row {i}", {"name": name, "stem": path.name}, label, i))
            else:
                rows.append(_Row(f"row {i}", name, label))
        return rows, blobs, metadata_names
    if not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise MixgenError(
            f"SRC {path}: column {image_column!r} is {image_type}; it must hold paths (strings) "
            "or images (struct<bytes, path>)"
        )
    table = parquet.read(columns=[image_column, label_column])
    paths, labels = table.column(0).to_pylist(), table.column(1).to_pylist()
    rows = [_Row(f"row {i}", p, lab) for i, (p, lab) in enumerate(zip(paths, labels, strict=True))]
    return rows, None, metadata_names


def _class_label_names(schema: Any, column: str) -> list[str] | None:
    """ClassLabel names of ``column`` from the ``huggingface`` schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


class ParquetImages:
    """Random access to the image bytes of a Parquet file by row. Row groups are read whole and a
    few kept (the decoder asks for rows in order), under a lock: the view decoders are threads."""

    def __init__(self, path: Path, column: str) -> None:
        import pyarrow.parquet as pq

        self.path, self.column = Path(path), column
        self._file = pq.ParquetFile(self.path)
        self._starts = [0]
        for g in range(self._file.num_row_groups):
            self._starts.append(self._starts[-1] + self._file.metadata.row_group(g).num_rows)
        self._groups: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _group(self, g: int) -> Any:
        with self._lock:
            if g in self._groups:
                self._groups.move_to_end(g)
                return self._groups[g]
            column = self._file.read_row_group(g, columns=[self.column]).column(0).combine_chunks().field("bytes")
            self._groups[g] = column
            while len(self._groups) > CACHED_GROUPS:
                self._groups.popitem(last=False)
            return column

    def scan(self) -> tuple[list[str | None], list[bool]]:
        """Per row: its recorded path and whether it holds bytes (a row with only a path names a
        file instead). One pass over the file, a row group at a time."""
        paths: list[str | None] = []
        present: list[bool] = []
        for g in range(self._file.num_row_groups):
            column = self._file.read_row_group(g, columns=[self.column]).column(0).combine_chunks()
            paths.extend(column.field("path").to_pylist())
            present.extend(column.field("bytes").is_valid().to_pylist())
        return paths, present

    def read(self, row: int) -> bytes:
        import bisect

        g = bisect.bisect_right(self._starts, row) - 1
        value = self._group(g)[row - self._starts[g]].as_py()
        return value or b""


def _label_value(raw: Any, typed: bool) -> tuple[str, Any]:
    """('int', n), ('name', s) or ('bad', reason) for one raw label."""
    if raw is _NOT_AN_OBJECT:
        return "bad", "not a JSON object"
    if raw is None:
        return "bad", "empty label"
    if isinstance(raw, bool):
        return "bad", f"label {raw!r} is neither a class id nor a class name"
    if isinstance(raw, int):
        return "int", raw
    if isinstance(raw, float):
        if math.isfinite(raw) and raw.is_integer():
            return "int", int(raw)
        return "bad", f"label {raw!r} is not an integer class id"
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return "bad", "empty label"
        if not typed and INTEGER.match(text):
            if len(text.lstrip("+-").lstrip("0")) > MAX_ID_DIGITS:
                return "bad", f"class id {_shown(text)} is out of range; ids are 0..C-1, named with --classes"
            return "int", int(text)
        return "name", text
    return "bad", f"label {raw!r} is neither a class id nor a class name"


def _shown(value: Any) -> str:
    """A label for a message: a number of hundreds of digits shortened."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text.lstrip('+-'))} digits)"


def _source_path(raw: Any, where: str) -> tuple[str | None, str]:
    """The manifest name of a row's image (POSIX, normalised) or None and why."""
    if isinstance(raw, dict):  # bytes inside the Parquet: its recorded path, else <file>#<row>
        name = raw.get("name")
        if isinstance(name, str) and name.strip():
            return posixpath.normpath(name.strip().replace("\\", "/")), ""
        return f"{raw['stem']}#{where.split()[1]}", ""
    if raw is None or not isinstance(raw, str) or not raw.strip():
        return None, "empty path"
    return posixpath.normpath(raw.strip().replace("\\", "/")), ""


def _build(
    path: Path,
    layout: str,
    rows: list[_Row],
    typed: bool,
    names: list[str] | None,
    blobs: ParquetImages | None,
    content_digest: str,
) -> SourceIndex:
    base = path.resolve().parent
    rejected: list[dict[str, str]] = []
    accepted: list[tuple[str, str, Any, int, str]] = []  # (name, kind, value, row, where)
    first_row: dict[str, str] = {}
    shared_names: set[str] = set()
    for row in rows:
        where = f"{path.name} {row.where}"
        if row.label is _NOT_AN_OBJECT:
            rejected.append({"path": where, "reason": f"{where}: not a JSON object"})
            continue
        name, why = _source_path(row.path, row.where)
        if name is None:
            rejected.append({"path": where, "reason": f"{where}: {why}"})
            continue
        kind, value = _label_value(row.label, typed)
        if kind == "bad":
            rejected.append({"path": name, "reason": f"{name}: {value} ({where})"})
            continue
        # A file is one source however its path is written (relative, absolute, through "..").
        key = name if row.row >= 0 else os.path.normpath(os.path.join(base, name))
        if key in first_row:
            if row.row >= 0:
                # Two byte rows with one recorded name are two images: name both by their rows.
                shared_names.add(name)
            else:
                why = f"listed again (first at {first_row[key]})"
                rejected.append({"path": name, "reason": f"{name}: {why} ({where})"})
                continue
        else:
            first_row[key] = row.where
        if row.row < 0 and (special := special_file(base / name)):
            rejected.append({"path": name, "reason": f"{name}: {special} ({where})"})
            continue
        if row.row < 0 and not (base / name).is_file():
            rejected.append({"path": name, "reason": f"{name}: {NOT_FOUND} ({where})"})
            continue
        accepted.append((name, kind, value, row.row, row.where))
    warnings: list[str] = []
    if shared_names:
        accepted = [
            (f"{path.name}#{where.split()[1]}" if name in shared_names and row >= 0 else name, kind, value, row, where)
            for name, kind, value, row, where in accepted
        ]
        warnings.append(
            f"{len(shared_names)} image path(s) recorded on several rows of {path.name}; "
            f"those rows are named {path.name}#<row>"
        )
    kinds = [kind for _, kind, *_ in accepted]
    if set(kinds) == {"int", "name"}:
        rarer = min(("int", "name"), key=kinds.count)
        _, _, value, _, where = accepted[kinds.index(rarer)]
        first = f"first {'class id' if rarer == 'int' else 'name'} {_shown(value)!r} at {where}"
        raise MixgenError(
            f"SRC {path}: the label column mixes class ids (integers) and class names ({first}); "
            "use one kind throughout"
        )
    classes, items = _classes_and_items(path, accepted, names, rejected)
    if not items:
        detail = f" ({len(rejected)} row(s) refused, e.g. {rejected[0]['reason']})" if rejected else ""
        raise MixgenError(f"SRC {path} lists no usable images{detail}")
    return SourceIndex(
        path,
        layout,
        classes,
        items,
        warnings=warnings,
        rejected=rejected,
        base=base,
        blobs=blobs,
        content_digest=content_digest,
    )


def _classes_and_items(
    path: Path, accepted: list[tuple[str, str, Any, int, str]], names: list[str] | None, rejected: list[dict[str, str]]
) -> tuple[list[str], list[Source]]:
    """Class ids: names sorted (or in --classes order); integers as given, named by --classes,
    the Parquet's ClassLabel names or themselves."""
    is_named = any(kind == "name" for _, kind, *_ in accepted)
    if is_named:
        classes = names if names is not None else sorted({value for _, _, value, _, _ in accepted})
        ids = {name: i for i, name in enumerate(classes)}
    else:
        limit = min(MAX_UNNAMED_CLASS_ID, max(1_000, UNNAMED_IDS_PER_ROW * len(accepted)))
        top = max((value for _, _, value, _, _ in accepted if 0 <= value < limit), default=-1)
        classes = names if names is not None else [str(i) for i in range(top + 1)]
    items = []
    for name, _, value, row, where in accepted:
        if not is_named and names is None and value >= limit:
            why = (
                f"class id {_shown(value)} is far beyond the {len(accepted)} rows' ids (over {limit - 1}); "
                "name the classes with --classes, one per line"
            )
            rejected.append({"path": name, "reason": f"{name}: {why} ({path.name} {where})"})
            continue
        if is_named:
            label = ids.get(value)
            if label is None:
                why = f"class {value!r} not in --classes"
                rejected.append({"path": name, "reason": f"{name}: {why} ({path.name} {where})"})
                continue
        else:
            label = value
            if not 0 <= label < len(classes):
                why = "no label (-1)" if label == -1 else f"class id {_shown(label)} outside 0..{len(classes) - 1}"
                rejected.append({"path": name, "reason": f"{name}: {why} ({path.name} {where})"})
                continue
        items.append(Source(name, label, row))
    return classes, items
