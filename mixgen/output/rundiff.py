"""What differs between the run recorded in OUT and the one asked for now, in one short phrase:
the options that changed (old → new), or how many sources were added, removed or changed.

The sources of a run are kept as a compact table in ``OUT/.mixgen/sources.npy``: two 64-bit
hashes per source, of its path and of (path, label, byte size) — 16 bytes a source, 1.6 MB for
100,000, so that the run record itself stays small."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from mixgen.errors import MixgenError
from mixgen.layout import CACHE_DIR, SOURCES_NAME, STATS_NAME, digests_path
from mixgen.output.cache import clear_entries, load_checked_array, save_checked_array
from mixgen.sources.index import SourceIndex

# Settings of one worker process, not of the run: they stay out of the merged record's config.
WORKER_SETTINGS = ("device", "workers", "batch_size")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def source_table(index: SourceIndex) -> np.ndarray:
    """(n, 2) uint64: hash of each source's path, and of its path, label and byte size (what the
    source digest covers)."""
    table = np.empty((len(index), 2), dtype=np.uint64)
    for row, item in enumerate(index.items):
        try:
            size = (index.root / item.path).stat().st_size
        except OSError:
            size = -1
        table[row] = (_hash64(item.path), _hash64(f"{item.path}\t{item.label}\t{size}"))
    return table


def save_source_table(out: Path, index: SourceIndex) -> None:
    path = Path(out) / CACHE_DIR / SOURCES_NAME
    clear_entries(path, digests_path(path))
    save_checked_array(path, source_table(index))


def load_source_table(out: Path) -> np.ndarray | None:
    """The recorded run's source table, or None when it is missing or damaged."""
    table, _ = load_checked_array(Path(out) / CACHE_DIR / SOURCES_NAME)
    if table is not None and table.ndim == 2 and table.shape[1] == 2 and table.dtype == np.uint64:
        return table
    return None


def _content_hash(path: Path) -> int:
    """The first 64 bits of a file's sha256 (about 1 GB/s: one second for CUB's 11,788 photos once
    cached; 0 when it cannot be read)."""
    try:
        return int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little")
    except OSError:
        return 0


def _stat_rows(index: SourceIndex) -> list[tuple[int, int, int]]:
    """(path hash, byte size, mtime in ns) of each source file; (hash, 0, 0) for a source inside an
    index file (the source digest covers those bytes) or one that cannot be stat'ed."""
    rows = []
    for item in index.items:
        size = mtime = 0
        if item.row < 0:
            try:
                st = (index.base / item.path).stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                pass
        rows.append((_hash64(item.path), size, mtime))
    return rows


def save_source_stats(out: Path, index: SourceIndex) -> None:
    """Record each source's size, mtime and content hash (``STATS_NAME``), so that a source changed in
    place at the same byte size (an EXIF rotation, a re-save) is seen on resume or grow. Content is
    hashed only where the recorded mtime or size differ (a first run: every source, once)."""
    path = Path(out) / CACHE_DIR / STATS_NAME
    recorded = load_source_stats(out)
    known = _known_stats(recorded)
    table = np.zeros((len(index), 4), dtype=np.uint64)
    for row, (item, (name, size, mtime)) in enumerate(zip(index.items, _stat_rows(index), strict=True)):
        old = known.get(name)
        same = old is not None and old[:2] == (size, mtime)
        content = old[2] if same else (_content_hash(index.base / item.path) if mtime else 0)
        table[row] = (name, size, mtime, content)
    if recorded is not None and np.array_equal(recorded, table):
        return  # a resume with nothing changed: nothing to write (workers of one job share the file)
    clear_entries(path, digests_path(path))
    save_checked_array(path, table)


def _known_stats(table: np.ndarray | None) -> dict[int, tuple[int, int, int]]:
    return {} if table is None else {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in table}


def load_source_stats(out: Path) -> np.ndarray | None:
    """The recorded (path hash, size, mtime, content hash) table, or None (a run of mixgen 0.4.0
    has none: its sources are compared by path, label and size only, as that version did)."""
    table, _ = load_checked_array(Path(out) / CACHE_DIR / STATS_NAME)
    if table is not None and table.ndim == 2 and table.shape[1] == 4 and table.dtype == np.uint64:
        return table
    return None


def changed_in_place(out: Path, index: SourceIndex) -> list[str]:
    """The sources whose content changed since the recorded run though path, label and size did not:
    a new mtime alone (a copy) is checked against the recorded content hash, never refused."""
    old = load_source_stats(out)
    if old is None:
        return []
    known = _known_stats(old)
    changed = []
    for item, (name, size, mtime) in zip(index.items, _stat_rows(index), strict=True):
        recorded = known.get(name)
        if recorded is None or recorded[:2] == (size, mtime) or not mtime:
            continue
        if recorded[2] == 0 or _content_hash(index.base / item.path) != recorded[2]:
            changed.append(item.path)
    return changed


def source_changes(old: np.ndarray, new: np.ndarray) -> tuple[int, int, int]:
    """(added, removed, changed) between two source tables."""
    old_paths = dict(zip(old[:, 0].tolist(), old[:, 1].tolist(), strict=True))
    new_paths = dict(zip(new[:, 0].tolist(), new[:, 1].tolist(), strict=True))
    added = sum(1 for p in new_paths if p not in old_paths)
    removed = sum(1 for p in old_paths if p not in new_paths)
    changed = sum(1 for p, h in new_paths.items() if p in old_paths and old_paths[p] != h)
    return added, removed, changed


def describe_sources(out: Path, previous: dict[str, Any], index: SourceIndex) -> str | None:
    """'sources: 3 added, 1 removed' when SRC's content differs from the recorded run's, else None."""
    source = previous.get("source") or {}
    if source.get("digest") == index.digest:
        changed = changed_in_place(out, index)
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"sources: {len(changed)} changed ({changed[0]}{more}: same size, new content)" if changed else None
    old = load_source_table(out)
    if old is None:
        return f"sources differ ({source.get('images', '?')} recorded, {len(index)} now)"
    counts = zip(source_changes(old, source_table(index)), ("added", "removed", "changed"), strict=True)
    parts = [f"{count} {what}" for count, what in counts if count]
    if not parts:
        old_classes, new_classes = source.get("classes"), index.classes
        parts = ["class names or layout changed" if old_classes != new_classes else "same files, other order"]
    return "sources: " + ", ".join(parts)


def _short(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(
    out: Path, previous: dict[str, Any], settings: dict[str, Any], extra: dict[str, Any], index: SourceIndex
) -> dict[str, str]:
    """What differs between ``previous`` (a run record) and the run asked for, by what (a setting's
    name, ``backbone``, ``device_type``, ``version`` or ``sources``): its output settings and its
    fingerprint extras (backbone identity, device type, version)."""
    old = {k: v for k, v in (previous.get("config") or {}).items() if k not in (*WORKER_SETTINGS, "num_shards")}
    method_changed = old.get("method") != settings.get("method")
    found = {}
    for key in sorted(set(old) | set(settings), key=lambda k: (k != "method", k)):
        before, after = old.get(key), settings.get(key)
        if before == after or (method_changed and key != "method" and None in (before, after)):
            continue  # a setting only one of two methods has follows from the method
        name = "method" if key == "method" else f"--{key.replace('_', '-')}"
        found[key] = f"{name} {_short(before)} → {_short(after)}"
    old_backbone, new_backbone = previous.get("backbone") or {}, extra.get("backbone") or {}
    if old_backbone != new_backbone:
        changed = [
            f"{key} {_short(old_backbone.get(key))} → {_short(new_backbone.get(key))}"
            for key in ("library", "weights")
            if old_backbone.get(key) != new_backbone.get(key)
        ]
        found["backbone"] = "backbone or its weights differ" + (f" ({', '.join(changed)})" if changed else "")
    old_device = previous.get("device_type") or (previous.get("environment") or {}).get("device_type")
    if old_device and old_device != extra.get("device_type"):
        found["device_type"] = f"device type {old_device} → {extra.get('device_type')}"
    if previous.get("mixgen_version") not in (None, extra.get("version")):
        found["version"] = f"mixgen version {previous.get('mixgen_version')} → {extra.get('version')}"
    if previous.get("boxes_sha256", extra.get("boxes")) != extra.get("boxes"):
        found["boxes"] = "object boxes changed (bounding_boxes.txt)"
    old_head, new_head = (previous.get("teacher") or {}).get("head"), (extra.get("teacher") or {}).get("head")
    if "teacher" in extra and old_head is not None and old_head != new_head:
        found["teacher"] = f"the teacher's head changed ({_short(old_head)} → {_short(new_head)})"
    sources = describe_sources(out, previous, index)
    if sources:
        found["sources"] = sources
    return found


def describe_difference(
    out: Path, previous: dict[str, Any], settings: dict[str, Any], extra: dict[str, Any], index: SourceIndex
) -> str:
    """The differences of ``differences`` in one phrase."""
    return "; ".join(differences(out, previous, settings, extra, index).values()) or "settings differ"


def grows(
    out: Path,
    found: dict[str, str],
    old_pairs: Any,
    pairs: int,
    overwrite: bool,
    base: int | None = None,
    shard_size: int = 1,
) -> bool:
    """True when the run asked for is the recorded one grown (only --pairs differs, and it is larger):
    output i depends only on (seed, i), so the outputs written stay and only the new ones are made.
    Refuses a shrink, which would leave outputs no manifest promises, unless --overwrite. ``base``:
    the finished run a cut grow was growing (its outputs are all OUT holds for sure), which any
    --pairs from it up to the cut grow's may take up again."""
    if set(found) != {"pairs"} or not isinstance(old_pairs, int):
        return False
    if base is not None and base <= pairs < old_pairs and not _written_beyond(out, pairs, shard_size):
        return True
    if pairs < old_pairs and not overwrite:
        held = f"a run of {base} outputs (its grow to {old_pairs} was cut)" if base is not None else None
        raise MixgenError(
            f"OUT {out} holds {held or f'a run of {old_pairs} outputs'}; --pairs {pairs} would shrink it "
            "(a run only grows); "
            + (f"resume the grow with --pairs {old_pairs}, " if base is not None and pairs < base else "")
            + "choose a new OUT or pass --overwrite"
        )
    return pairs > old_pairs


def _written_beyond(out: Path, pairs: int, shard_size: int) -> bool:
    """Whether a cut grow left a shard past those of --pairs (a smaller --pairs would leave it
    there, listed by no run)."""
    from mixgen.output.manifest import shard_count, shards_on_disk

    return any(shard >= shard_count(pairs, shard_size) for shard in shards_on_disk(out))
