"""The Parquet manifest: schema, Hugging Face feature metadata, atomic shard writes and reading
all shards back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mixgen.files import atomic_file
from mixgen.layout import DATA_DIR, MANIFEST_NAME, data_dir

SCHEMA_VERSION = 2

BOX = pa.struct([(name, pa.int32()) for name in ("x0", "y0", "x1", "y1")])
TARGET = pa.struct([("class_id", pa.int64()), ("weight", pa.float32())])
FIELDS = [
    ("file_name", pa.string(), False),
    ("index", pa.int64(), False),
    ("method", pa.string(), False),
    ("source_a", pa.string(), False),
    ("source_b", pa.string(), False),
    ("label_a", pa.int64(), False),
    ("label_b", pa.int64(), False),
    ("class_a", pa.string(), False),
    ("class_b", pa.string(), False),
    ("weight_a", pa.float32(), False),
    ("weight_b", pa.float32(), False),
    ("targets", pa.list_(TARGET), False),
    ("box_a", BOX, True),
    ("box_b", BOX, True),
    ("cells", pa.list_(pa.int32()), True),
    ("mask", pa.list_(pa.int32()), True),
    ("label_weights", pa.string(), False),
    ("lam", pa.float32(), True),
    ("area_ratio", pa.float32(), False),
    ("seed", pa.int64(), False),
    ("width", pa.int32(), False),
    ("height", pa.int32(), False),
    ("sha256", pa.string(), False),
]
COLUMNS = [name for name, _, _ in FIELDS]


def _hf_value(arrow_type: pa.DataType) -> Any:
    """Hugging Face `datasets` feature JSON for an Arrow type (legacy list form: read by every version)."""
    if pa.types.is_struct(arrow_type):
        return {arrow_type.field(i).name: _hf_value(arrow_type.field(i).type) for i in range(arrow_type.num_fields)}
    if pa.types.is_list(arrow_type):
        return [_hf_value(arrow_type.value_type)]
    dtype = {"float": "float32", "double": "float64"}.get(str(arrow_type), str(arrow_type))
    return {"dtype": dtype, "_type": "Value"}


def hf_features(class_names: list[str]) -> dict[str, Any]:
    features = {name: _hf_value(arrow_type) for name, arrow_type, _ in FIELDS}
    for column in ("label_a", "label_b"):
        features[column] = {"names": list(class_names), "_type": "ClassLabel"}
    return features


def schema(run_metadata: dict[str, Any], class_names: list[str]) -> pa.Schema:
    metadata = {
        "mixgen": json.dumps(run_metadata, sort_keys=True),
        "huggingface": json.dumps({"info": {"features": hf_features(class_names)}}),
    }
    # Every field is declared nullable: `datasets` only applies the ClassLabel metadata to fields
    # whose Arrow definition equals its own, and it treats all fields as nullable.
    return pa.schema([pa.field(n, t) for n, t, _ in FIELDS], metadata=metadata)


def soft_targets(label_a: int, label_b: int, weight_a: float, weight_b: float) -> list[dict[str, Any]]:
    """The normalised soft label: same class merged, weights summing to 1, classes ascending."""
    merged: dict[int, float] = {}
    for label, weight in ((label_a, weight_a), (label_b, weight_b)):
        merged[label] = merged.get(label, 0.0) + max(float(weight), 0.0)
    total = sum(merged.values())
    if total <= 0:
        return [{"class_id": label_a, "weight": 1.0}]
    return [{"class_id": k, "weight": v / total} for k, v in sorted(merged.items()) if v > 0]


def shard_count(pairs: int, shard_size: int) -> int:
    return -(-pairs // shard_size)


def shards_of_worker(pairs: int, shard_size: int, shard_index: int, num_shards: int) -> range:
    """The shards worker ``shard_index`` of ``num_shards`` writes: a range, never a list, so that
    planning takes the same memory for any --pairs."""
    return range(shard_index, shard_count(pairs, shard_size), num_shards)


def outputs_of(shards: range, pairs: int, shard_size: int) -> int:
    """How many outputs ``shards`` (a ``shards_of_worker`` range) hold, counted without a loop."""
    if not shards:
        return 0
    return len(shards) * shard_size - (shard_size - len(shard_span(shards[-1], pairs, shard_size)))


def shards_on_disk(out: Path) -> list[int]:
    """The shards OUT/data holds anything of (a folder or a tar), sorted: what a resume or a
    failed run has to look at, bounded by what was written rather than by --pairs."""
    data = data_dir(out)
    if not data.is_dir():
        return []
    stems = (entry.name.partition(".")[0] for entry in data.iterdir())
    return sorted({int(stem) for stem in stems if stem.isascii() and stem.isdigit()})


def shard_span(shard: int, pairs: int, shard_size: int) -> range:
    """The output indices that shard ``shard`` holds."""
    return range(shard * shard_size, min(pairs, (shard + 1) * shard_size))


def fsync_dir(path: Path) -> None:
    """Make a folder's renames durable (an fsync of the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(directory: Path) -> None:
    """Flush the images written so far to disk (Linux syncfs: one call per shard instead of one
    fsync per image; os.sync elsewhere). Without it, a power cut could keep a renamed manifest
    whose images the kernel had not yet written: a manifest that lies."""
    import ctypes

    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            os.sync()
            return
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(directory))
    finally:
        os.close(fd)


def write_shard(
    directory: Path, rows: list[dict[str, Any]], table_schema: pa.Schema, name: str = MANIFEST_NAME
) -> Path:
    """Write the manifest to a hidden temp name, fsync, then rename into place: a manifest either
    exists whole, with all its images already on disk, or not at all. ``name``: another final name
    (a grown shard's pending manifest, see mixgen.output.writers)."""
    _sync_filesystem(directory)
    rows = sorted(rows, key=lambda r: r["index"])
    table = pa.Table.from_pylist(rows, schema=table_schema)
    final = directory / name
    with atomic_file(final) as f:
        pq.write_table(table, f, compression="zstd")
    fsync_dir(directory)
    return final


def restamp(directory: Path, table_schema: pa.Schema) -> None:
    """Give a kept shard's manifest the run's metadata (a grown run records its new --pairs), its
    rows as they are: the manifest a fresh run would write."""
    path = directory / MANIFEST_NAME
    if (pq.read_schema(path).metadata or {}).get(b"mixgen") != table_schema.metadata[b"mixgen"]:
        write_shard(directory, pq.read_table(path).to_pylist(), table_schema)


def manifest_paths(out: Path) -> list[Path]:
    return sorted(data_dir(out).glob(f"*/{MANIFEST_NAME}"))


def read_manifest(out: Path) -> pa.Table:
    """Every shard's rows as one table, ordered by output index."""
    paths = manifest_paths(out)
    if not paths:
        raise FileNotFoundError(f"{out} holds no manifest ({DATA_DIR}/*/{MANIFEST_NAME})")
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    return table.sort_by("index")


def metadata_of(arrow_schema: pa.Schema) -> dict[str, Any]:
    """The run metadata a manifest's schema carries ({} when it carries none or it is damaged)."""
    try:
        data = json.loads((arrow_schema.metadata or {}).get(b"mixgen") or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_run_metadata(out: Path) -> dict[str, Any]:
    paths = manifest_paths(out)
    if not paths:
        raise FileNotFoundError(f"{out} holds no manifest")
    return json.loads(pq.read_schema(paths[0]).metadata[b"mixgen"])
