"""The run record (OUT/mixgen.json): what a run was asked, what it found and how far it got,
written at every step so that a killed run can be resumed and a different one refused. With
several workers each writes its own record and, under a file lock, rebuilds the merged one (so
that ``--num-shards`` workers sharing OUT never clobber each other)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixgen.errors import MixgenError
from mixgen.files import read_json, write_json
from mixgen.layout import CACHE_DIR, RECORD_NAME, RECORDS_LOCK, WORKER_GLOB, WORKER_RECORD
from mixgen.output.cache import clear_entries
from mixgen.output.checks import check_out_is_ours
from mixgen.output.rundiff import WORKER_SETTINGS
from mixgen.version import __version__

if TYPE_CHECKING:
    from mixgen.config import RunConfig
    from mixgen.sources.index import SourceIndex


def prepare_out(
    cfg: RunConfig, fingerprint: str, index: SourceIndex | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Make OUT ready. Returns the previous record when this is a resume of the same run (also when
    only a sibling worker's record exists yet) or a grow of it (more --pairs); refuses a different
    run, naming what differs, unless --overwrite, which removes only mixgen's own files, and never
    touches a folder that holds no mixgen run. Called inside the OUT lock's door (see mixgen.output.lock)."""
    out = cfg.out
    check_out_is_ours(out)
    if not out.is_dir():
        return None
    record_paths = run_record_paths(out)
    if record_paths:
        previous, damaged = _previous_record(out, record_paths, fingerprint)
        if previous.get("fingerprint") == fingerprint:
            return previous
        found: dict[str, str] = {}
        if previous and index is not None:
            from mixgen.output.rundiff import differences, grows

            found = differences(out, previous, cfg.output_settings(), extra or {}, index)
            if grows(out, found, _pairs_of(previous), cfg.pairs, cfg.overwrite, *_grow_base(cfg, previous)):
                return previous
        if not cfg.overwrite and not stopped_before_writing(out, record_paths):
            if not previous:  # a damaged record and no finished shard: nothing to keep or refuse
                return None
            _refuse_different(out, found, damaged)
        from mixgen.output.overwrite import remove_previous_run

        remove_previous_run(out, record_paths)
    return None


def _pairs_of(record: dict[str, Any]) -> Any:
    return (record.get("config") or {}).get("pairs")


def _grow_base(cfg: RunConfig, previous: dict[str, Any]) -> tuple[int | None, int]:
    """What ``rundiff.grows`` needs to take up the run a cut grow was growing."""
    return unfinished_grow_base(previous), cfg.shard_size


def unfinished_grow_base(previous: dict[str, Any] | None) -> int | None:
    """The --pairs of the finished run that ``previous`` (a run record) was growing when it was cut,
    or None when it is no cut grow: a grow keeps that run's outputs until its own are whole."""
    base = (previous or {}).get("grown_from")
    return base if isinstance(base, int) and (previous or {}).get("status") != "complete" else None


def stopped_before_writing(out: Path, record_paths: list[Path]) -> bool:
    """True when every run record in OUT says its run failed or was interrupted and OUT holds no
    output: nothing is there to keep, so a run with other settings (say, SRC without the image a
    --strict run stopped on) may simply start afresh."""
    from mixgen.output.manifest import shards_on_disk

    records = [read_json(path) for path in record_paths]
    stopped = all(isinstance(r, dict) and r.get("status") in ("failed", "interrupted") for r in records)
    return bool(records) and stopped and not shards_on_disk(out)


def run_record_paths(out: Path) -> list[Path]:
    return [p for p in (out / RECORD_NAME, *sorted(out.glob(WORKER_GLOB))) if os.path.lexists(p)]


def _refuse_different(out: Path, found: dict[str, str], damaged: bool = False) -> None:
    what = "; ".join(found.values()) or "settings differ"
    if damaged:
        what += f"; its {RECORD_NAME} is damaged, so this was read from its shards' manifests"
    raise MixgenError(f"OUT {out} holds a different mixgen run ({what}); choose a new OUT or pass --overwrite")


def _previous_record(out: Path, record_paths: list[Path], fingerprint: str | None) -> tuple[dict[str, Any], bool]:
    """The first readable run record, and False; when every record is damaged (unreadable, not a
    JSON object, no fingerprint), the record rebuilt from the shards' manifests, and True."""
    for path in record_paths:
        record = read_json(path)
        if record and record.get("fingerprint"):
            return record, False
    return record_from_manifests(out, fingerprint), True


def record_from_manifests(out: Path, fingerprint: str | None) -> dict[str, Any]:
    """What the finished shards' manifest metadata says of the run that made them, in the run
    record's form: the first manifest of another run than ``fingerprint`` when there is one (so a
    refusal names what differs), else the first manifest's; {} when no manifest can be read."""
    import pyarrow.parquet as pq

    from mixgen.output.manifest import manifest_paths, metadata_of

    found: dict[str, Any] = {}
    for path in manifest_paths(out):
        try:
            meta = metadata_of(pq.read_schema(path))
        except Exception:  # noqa: BLE001 - an unreadable manifest is an unfinished shard, redone
            continue
        found = found or meta
        if meta.get("fingerprint") != fingerprint:
            found = meta
            break
    if not found:
        return {}
    return {
        "fingerprint": found.get("fingerprint") or "unknown",
        "mixgen_version": found.get("mixgen_version"),
        "config": found.get("config") or {},
        "backbone": found.get("backbone"),
        "environment": found.get("environment") or {},
        "source": {"digest": found.get("source_digest"), "classes": found.get("classes")},
    }


def look_at_out(cfg: RunConfig, index: SourceIndex) -> tuple[str, dict[str, Any] | None]:
    """What the run asked for would do with OUT, told from the run record alone, before any slow
    start-up and without writing: ``start`` (no run there), ``resume``, ``grow`` (same run, more
    --pairs) or ``overwrite``, with the record found. Refuses what ``prepare_out`` refuses that the
    record can tell (a file, a foreign folder, other settings, sources or version, a shrink); the
    backbone's identity and the device type are compared once the backbone is loaded."""
    out = cfg.out
    check_out_is_ours(out)
    record_paths = run_record_paths(out) if out.is_dir() else []
    if not record_paths:
        return "start", None
    from mixgen.output.rundiff import differences, grows

    previous, damaged = _previous_record(out, record_paths, None)
    if not previous:  # a damaged record and no finished shard: the run starts afresh
        return "start", None
    known = {
        "backbone": previous.get("backbone"),
        "device_type": previous.get("device_type") or (previous.get("environment") or {}).get("device_type"),
        "version": __version__,
    }
    if cfg.label_weights == "boxes":  # what the run record keeps of them (open_out's fingerprint extra)
        from mixgen.sources.boxes import boxes_file_digest

        known["boxes"] = boxes_file_digest(cfg.src)
    found = differences(out, previous, cfg.output_settings(), known, index)
    if grows(out, found, _pairs_of(previous), cfg.pairs, cfg.overwrite, *_grow_base(cfg, previous)):
        return "grow", previous
    if found and not cfg.overwrite:
        if stopped_before_writing(out, record_paths):
            return "restart", previous
        _refuse_different(out, found, damaged)
    return ("overwrite" if found else "resume"), previous


def environment(device_type: str) -> dict[str, str]:
    import PIL
    import pyarrow
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "pyarrow": pyarrow.__version__,
        "device_type": device_type,
    }


def new_record(
    cfg: RunConfig, index: SourceIndex, fingerprint: str, device, campass_record: dict[str, Any], resumed: bool
) -> dict[str, Any]:
    """The record of a run starting (status running, no progress yet)."""
    return {
        "mixgen_version": __version__,
        "fingerprint": fingerprint,
        "status": "running",
        "config": {
            **cfg.output_settings(),
            "device": str(device),
            "workers": cfg.workers,
            "batch_size": cfg.batch_size,
        },
        "source": {
            "root": str(cfg.src.resolve()),
            "layout": index.layout,
            "digest": index.digest,
            "images": len(index),
            "classes": index.classes,
            "warnings": index.warnings,
        },
        "backbone": campass_record.get("identity") or None,
        "device_type": device.type,
        "runtime": campass_record.get("runtime"),
        "resumed": resumed,
    }


def publish(cfg: RunConfig, record: dict[str, Any]) -> None:
    """Write the run record; with several workers, also this worker's own."""
    publish_record(cfg.out, record, cfg.shard_index, cfg.num_shards)


def worker_record_path(out: Path, index: int, count: int) -> Path:
    return Path(out) / WORKER_RECORD.format(index=index, count=count)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_entries(path)  # an empty folder at the lock's name becomes a lock file again
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish_record(out: Path, record: dict[str, Any], shard_index: int, num_shards: int) -> None:
    """Write this worker's state. A single worker owns OUT/mixgen.json. With several workers each
    writes its own mixgen.worker-<i>-of-<N>.json and then, under a lock, rebuilds mixgen.json from
    all N, so that the last writer always sees every worker's latest state."""
    out = Path(out)
    if num_shards == 1:
        write_json(out / RECORD_NAME, record)
        return
    mine = {**record, "worker": {"index": shard_index, "count": num_shards}}
    with _locked(out / CACHE_DIR / RECORDS_LOCK):
        write_json(worker_record_path(out, shard_index, num_shards), mine)
        write_json(out / RECORD_NAME, merge_records(out, mine, num_shards))


def merge_records(out: Path, mine: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """The run-level record of N workers: complete only when every worker is; failed or
    interrupted when any is; progress and counts summed."""
    workers = []
    for index in range(num_shards):
        record = mine if index == mine["worker"]["index"] else read_json(worker_record_path(out, index, num_shards))
        if record is None or record.get("fingerprint") != mine.get("fingerprint"):
            record = {"status": "not started"}
        workers.append(record)
    statuses = [w.get("status") for w in workers]
    if all(s == "complete" for s in statuses):
        status = "complete"
    elif "failed" in statuses:
        status = "failed"
    elif "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "running"
    merged = {k: v for k, v in mine.items() if k not in ("worker", "progress", "counts", "timings", "error")}
    merged["status"] = status
    merged["config"] = {k: v for k, v in mine["config"].items() if k not in WORKER_SETTINGS}
    merged["config"]["num_shards"] = num_shards
    merged["workers"] = [
        {
            "index": index,
            "status": w.get("status"),
            "device": (w.get("config") or {}).get("device"),
            "progress": w.get("progress"),
            **({"error": w["error"]} if w.get("error") else {}),
        }
        for index, w in enumerate(workers)
    ]
    progress = [w.get("progress") or {} for w in workers]
    merged["progress"] = {
        "shards_done": sum(p.get("shards_done", 0) for p in progress),
        "outputs_done": sum(p.get("outputs_done", 0) for p in progress),
    }
    if status == "complete":
        keys = ("written", "kept_from_previous_run", "shards", "slices_prepared", "backbone_sources")
        counts = dict(mine.get("counts") or {})
        counts.update({k: sum((w.get("counts") or {}).get(k, 0) for w in workers) for k in keys})
        merged["counts"] = counts
    return merged


def remove_worker_records(out: Path) -> None:
    """A single worker covers every shard: per-worker records of an earlier split are obsolete."""
    for path in Path(out).glob(WORKER_GLOB):
        with contextlib.suppress(OSError):
            path.unlink()
