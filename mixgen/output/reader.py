"""Reading a finished OUT folder back for the viewers and loaders: every shard's rows with the path
of each image, the run settings and where SRC lives. No torch import here, so ``mixgen stats``
stays fast."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixgen.errors import MixgenError
from mixgen.files import read_json
from mixgen.layout import DATA_DIR, MANIFEST_NAME, RECORD_NAME, tar_of_manifest
from mixgen.output.manifest import manifest_paths, read_run_metadata


def _require_run(out: Path) -> list[Path]:
    paths = manifest_paths(out)
    if not paths:
        if not Path(out).is_dir():
            raise MixgenError(f"OUT {out} does not exist; pass the folder a mixgen run wrote")
        raise MixgenError(
            f"OUT {out} holds no manifest ({DATA_DIR}/*/{MANIFEST_NAME}); run e.g. `mixgen snapmix SRC {out}` first"
        )
    return paths


def load_rows(out: Path, columns: list[str] | None = None) -> pa.Table:
    """All shards' rows ordered by output index, plus ``image_path`` (absolute path of the image);
    the shard folder is taken from where each manifest lies, not recomputed from the shard size.
    With the webdataset writer ``image_path`` is ``<shard tar>#<member>``, and ``image_offset``,
    ``image_size`` say where the image's bytes lie in that tar (see ``read_output``)."""
    tables = []
    for path in _require_run(out):
        # Columns a manifest of an older schema lacks are left out, not an error.
        present = set(pq.read_schema(path).names)
        wanted = None if columns is None else sorted({*columns, "file_name", "index"} & present)
        table = pq.read_table(path, columns=wanted)
        if _writer(table.schema) == "webdataset":
            tables.append(_tar_locations(table, path))
            continue
        folder = pa.scalar(f"{path.parent.resolve()}/")
        paths = pc.binary_join_element_wise(folder, table.column("file_name"), "")
        tables.append(table.append_column("image_path", paths))
    return pa.concat_tables(tables).sort_by("index")


def _writer(schema: pa.Schema) -> str:
    try:
        return json.loads((schema.metadata or {})[b"mixgen"])["config"].get("writer", "files")
    except (KeyError, ValueError, TypeError, AttributeError):
        return "files"


def _tar_locations(table: pa.Table, manifest: Path) -> pa.Table:
    """Add image_path, image_offset, image_size for a shard whose images lie in its tar."""
    from mixgen.output.tarfiles import read_tar_index

    tar = tar_of_manifest(manifest)
    try:
        members = read_tar_index(tar)
    except (OSError, tarfile.TarError) as exc:
        raise MixgenError(f"{tar}: cannot be read ({exc}); run `mixgen verify` and re-run the same command") from None
    names = table.column("file_name").to_pylist()
    missing = [n for n in names if n not in members]
    if missing:
        raise MixgenError(f"{tar}: member {missing[0]} of the manifest is missing; re-run the same command")
    table = table.append_column("image_path", pa.array([f"{tar}#{n}" for n in names], pa.string()))
    table = table.append_column("image_offset", pa.array([members[n][0] for n in names], pa.int64()))
    return table.append_column("image_size", pa.array([members[n][1] for n in names], pa.int64()))


def read_output(image_path: str, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of one output image: its file, or its byte range inside a shard tar."""
    if offset is None or size is None:
        return Path(image_path).read_bytes()
    with open(image_path.rpartition("#")[0], "rb") as f:
        f.seek(offset)
        return f.read(size)


def run_metadata(out: Path) -> dict[str, Any]:
    """The ``mixgen`` schema metadata of the manifests (config, classes, backbone, CAM mode)."""
    _require_run(out)
    return read_run_metadata(out)


def run_record(out: Path) -> dict[str, Any]:
    """OUT/mixgen.json, or {} when it is missing or unreadable (the manifests alone still work)."""
    return read_json(Path(out) / RECORD_NAME) or {}


def source_root(out: Path, override: Path | None = None) -> Path | None:
    """Where the run's SRC is (a folder or an index file): ``override`` when given, else the
    recorded root (relative paths are tried against the current folder and OUT's parent). None
    when it cannot be found."""
    if override is not None:
        if not (Path(override).is_dir() or Path(override).is_file()):
            raise MixgenError(f"--src {override} is not a folder or index file; pass the SRC the run was made from")
        return Path(override)
    root = run_record(out).get("source", {}).get("root")
    if not root:
        return None
    candidates = [Path(root)] if Path(root).is_absolute() else [Path(root), Path(out).resolve().parent / root]
    return next((c for c in candidates if c.is_dir() or c.is_file()), None)
