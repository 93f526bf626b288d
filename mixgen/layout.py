"""Every file mixgen keeps in OUT, named here and nowhere else, so that this one page is OUT's map
and ``--overwrite``, ``verify`` and the scanners match exactly what the writers make. Standard
library only: the CLI, the scanners and the writers all read it, and none pays for pyarrow.

    OUT/
      mixgen.json                       the run record                  RECORD_NAME
      mixgen.worker-I-of-N.json         one worker's record (a job)     WORKER_RECORD
      .mixgen.lock, .mixgen.lock.I      the door, worker I's lock       DOOR_NAME, WORKER_PREFIX
      data/                                                             DATA_DIR
        00000/metadata.parquet          files writer: one folder/shard  shard_dir, MANIFEST_NAME
        00000/.metadata.parquet.grown   a grow's manifest, pending      PENDING_MANIFEST
        00000/.grown.NAME               a grow's redone output or tar   GROWN_PREFIX
        00000/_000000000.jpg                                            image_name
        00000.tar                       webdataset writer: one tar      tar_path
          000000000.jpg, .json                                          member_name, json_name
      .mixgen/                          caches                          CACHE_DIR
        sources.npy, sources-stat.npy, views-KEY.u8/.json, maps-KEY.npy/.json, head-KEY.npy, *.crc32
        slices-KEY/00000.lock .npy .f16 .json, members.lock, sealed
        prepare.lock, records.lock, backbone-HOST.lock

Any file is first written under a temp name (``mixgen.files.temp_path``: ``.NAME.PID@HOST.tmp``)
and renamed into place. ``mixgen cam`` writes another kind of OUT: ``cams.json`` and, per
source, ``<source>.png`` and ``<source>.npy``.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMP_SUFFIX = ".tmp"

# OUT itself
RECORD_NAME = "mixgen.json"
WORKER_RECORD = "mixgen.worker-{index}-of-{count}.json"
WORKER_GLOB = "mixgen.worker-*-of-*.json"
DOOR_NAME = ".mixgen.lock"
WORKER_PREFIX = ".mixgen.lock."

# OUT/data: the shards
DATA_DIR = "data"
MANIFEST_NAME = "metadata.parquet"
# A grown shard keeps its finished manifest until the new one is whole: the outputs it redoes and
# its new tar wait under GROWN_PREFIX names, and the new manifest is written as PENDING_MANIFEST
# first; the commit then moves them into place (mixgen.output.writers: ``finish_grow``, ``settle``).
GROWN_PREFIX = ".grown."
PENDING_MANIFEST = ".metadata.parquet.grown"
OUTPUT_NAME = re.compile(r"_?\d{9,}\.\w+")  # an output (files) or tar member name: what a grow may add
SHARD_FOLDER = re.compile(r"^\d{5}$")
IMAGE = re.compile(r"^_\d{9}\.\w+$")  # image_name
TAR_NAME = re.compile(r"^\d{5}\.tar$")

# OUT/.mixgen: the caches
CACHE_DIR = ".mixgen"
SOURCES_NAME = "sources.npy"
STATS_NAME = "sources-stat.npy"  # size, mtime and content hash of each source (not in 0.4.0 runs)
DIGEST_SUFFIX = ".crc32"
PREPARE_LOCK = "prepare.lock"  # serialises opening, joining and finishing the slices (short)
RECORDS_LOCK = "records.lock"  # serialises merging the workers' records
BOARD_MEMBERS = "members.lock"
BOARD_SEALED = "sealed"
SLICES_GLOB = "slices-*"
# The caches' names, their checksum sidecars, the campass features temp, and the locks.
CACHE_FILE = re.compile(
    r"^(?:views|maps|head|sources|features)[-.][\w.-]+$|^(?:records|prepare)\.lock$|^backbone-[\w.-]+\.lock$"
)
SLICE_BOARD = re.compile(r"^slices-\w+$")  # a job's slices while it prepares them
SLICE_FILE = re.compile(r"^\d{5}\.(?:lock|npy|f16|json)$|^members\.lock$|^sealed$")

# mixgen cam's OUT
CAMS_INDEX = "cams.json"


def data_dir(out: Path) -> Path:
    return Path(out) / DATA_DIR


def shard_dir(out: Path, shard: int) -> Path:
    """The files writer's folder of a shard (also where each shard's manifest is)."""
    return data_dir(out) / f"{shard:05d}"


def image_name(index: int, fmt: str) -> str:
    """``_000000042.jpg``: the leading underscore makes pyarrow, pandas and Spark skip images when
    they read ``OUT/data`` as a Parquet dataset, while Hugging Face imagefolder still finds them."""
    return f"_{index:09d}.{fmt}"


def tar_path(out: Path, shard: int) -> Path:
    return data_dir(out) / f"{shard:05d}.tar"


def member_name(index: int, fmt: str) -> str:
    """``000000042.jpg``: the WebDataset key is the part before the first dot."""
    return f"{index:09d}.{fmt}"


def json_name(image_member: str) -> str:
    return image_member.partition(".")[0] + ".json"


def digests_path(path: Path) -> Path:
    """The checksum sidecar of a cache file."""
    return Path(path).with_name(Path(path).name + DIGEST_SUFFIX)


def views_path(cache: Path, key: str) -> Path:
    return Path(cache) / f"views-{key}.u8"


def views_status(cache: Path, key: str) -> Path:
    return Path(cache) / f"views-{key}.json"


def maps_path(cache: Path, key: str) -> Path:
    return Path(cache) / f"maps-{key}.npy"


def maps_meta(cache: Path, key: str) -> Path:
    """The probe's record beside the maps (sealed with them)."""
    return Path(cache) / f"maps-{key}.json"


def head_path(cache: Path, key: str) -> Path:
    """The probe's fitted head beside the maps it made (sealed with the probe's record): what the
    teacher (--label-weights teacher) classifies each mixed image with, on resume too."""
    return Path(cache) / f"head-{key}.npy"


def tar_of_manifest(manifest: Path) -> Path:
    """The webdataset writer's tar of the shard whose manifest this is."""
    return manifest.parent.parent.resolve() / f"{manifest.parent.name}.tar"


def slices_dir(cache: Path, key: str) -> Path:
    return Path(cache) / f"slices-{key}"


def slice_file(board: Path, k: int, suffix: str) -> Path:
    return Path(board) / f"{k:05d}.{suffix}"


def backbone_lock(cache: Path, host: str) -> Path:
    return Path(cache) / f"backbone-{host}.lock"


def cam_names(name: str) -> tuple[str, str]:
    """``mixgen cam``'s overlay and map of one source, relative to its OUT."""
    return f"{name}.png", f"{name}.npy"
