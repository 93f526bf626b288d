"""The tar shards of ``--writer webdataset`` as files: member names, fixed headers, the JSON row
beside each image, and reading a tar's index and checking it against its manifest from the
headers alone. (The writer itself, ``TarShard``, is in ``mixgen.output.writers``.)"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from mixgen.errors import MixgenError
from mixgen.layout import json_name

# Fixed tar header fields: a shard's tar is a function of its rows and image bytes alone, so a
# resumed or re-sharded run writes the same bytes.
TAR_MTIME = 0
TAR_MODE = 0o644


def tar_header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def json_row(row: dict[str, Any], table_schema: Any) -> dict[str, Any]:
    """The row as the manifest stores it: schema order, float32 columns rounded to float32."""
    return {f.name: _as_stored(row.get(f.name), f.type) for f in table_schema}


def _as_stored(value: Any, arrow_type: Any) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_float32(arrow_type):
        return float(np.float32(value))
    if pa.types.is_struct(arrow_type):
        return {
            arrow_type.field(i).name: _as_stored(value.get(arrow_type.field(i).name), arrow_type.field(i).type)
            for i in range(arrow_type.num_fields)
        }
    if pa.types.is_list(arrow_type):
        return [_as_stored(v, arrow_type.value_type) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_tar_index(path: Path) -> dict[str, tuple[int, int]]:
    """Member name → (data offset, size) in file order, from the headers alone. Raises MixgenError
    for a tar cut short (a member whose data runs past the end of the file)."""
    size = Path(path).stat().st_size
    members: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.offset_data + info.size > size:
                raise MixgenError(f"{path}: truncated at member {info.name} (the file ends inside it)")
            members[info.name] = (info.offset_data, info.size)
    return members


def check_tar(path: Path, manifest: Path) -> tuple[list[str], int]:
    """``verify`` for one tar shard: it opens whole, holds exactly the manifest's images (each with
    its recorded sha256) and their JSON rows, each equal to its manifest row field for field (the
    JSON is what webdataset trainers read), in index order. Returns problems and images hashed."""
    import pyarrow.parquet as pq

    try:
        manifest_rows = {row["file_name"]: row for row in pq.read_table(manifest).to_pylist()}
    except Exception as exc:  # noqa: BLE001 - verify reports the manifest itself; say why the tar is unchecked
        return [f"{path}: not checked, its manifest {manifest} cannot be read ({exc!r:.120})"], 0
    names = list(manifest_rows)
    try:
        members = read_tar_index(path)
    except MixgenError as exc:
        return [f"{exc}; re-run the same command to redo the shard"], 0
    except (OSError, tarfile.TarError) as exc:
        return [f"{path}: not a readable tar ({exc}); re-run the same command to redo the shard"], 0
    problems: list[str] = []
    of_json = {json_name(name): name for name in names}
    wanted = [m for name in sorted(names) for m in (name, json_name(name))]
    hashed = 0
    with open(path, "rb") as f:
        for name in wanted:
            if name not in members:
                problems.append(f"{path}: member {name} listed in the manifest is missing")
                continue
            offset, size = members[name]
            f.seek(offset)
            data = f.read(size)
            if name in manifest_rows:
                hashed += 1
                if hashlib.sha256(data).hexdigest() != manifest_rows[name]["sha256"]:
                    problems.append(f"{path}: member {name}: sha256 differs from the manifest (corrupt or replaced)")
                continue
            try:
                row = json.loads(data)
            except ValueError:
                problems.append(f"{path}: member {name} is not valid JSON")
                continue
            if differing := _differing_fields(row, manifest_rows[of_json[name]]):
                problems.append(f"{path}: member {name} disagrees with its manifest row ({differing})")
    wanted_set = set(wanted)
    problems.extend(f"{path}: member {m} is not in the manifest" for m in [m for m in members if m not in wanted_set])
    if not problems and list(members) != wanted:
        problems.append(f"{path}: members are not in index order")
    return problems, hashed


def _differing_fields(row: Any, manifest_row: dict[str, Any]) -> str:
    """The fields in which a member's JSON row differs from its manifest row ('' when none)."""
    if not isinstance(row, dict):
        return "not a JSON object"
    fields = [k for k in dict.fromkeys([*manifest_row, *row]) if row.get(k, ...) != manifest_row.get(k, ...)]
    return ", ".join(fields[:4]) + (f" and {len(fields) - 4} more fields" if len(fields) > 4 else "")


def members_before(path: Path, name: str) -> int:
    """The byte length of a tar's members before member ``name`` (all of them when it is absent),
    end-of-archive blocks excluded: the part of a shard's tar a grown run keeps."""
    end = 0
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.name == name:
                return info.offset
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return end
