"""Preparation: every source decoded once into its S×S view and, when the method needs maps, the
one CAM pass (``mixgen.campass``) over the views, both kept in OUT/.mixgen under keys of what
they depend on, with checksums, so a resumed or repeated run reuses them and a damaged cache is
rebuilt, never used.

The stage's work on a set of positions (``decode_positions``: sources[positions] -> their views
in the view cache, and their features or maps in the extractor) is one function, so that the
sources can later be prepared in slices; ``prepare_sources`` opens the caches, runs it over every
source and seals what it made."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixgen.cache import RecordFile, clear_entries, digests_path, load_checked_array, save_checked_array
from mixgen.campass import CamPass, MapExtractor
from mixgen.errors import DecodeError, MixgenError
from mixgen.outdir import CACHE_DIR, allocate, read_json, temp_path, write_json
from mixgen.progress import Reporter
from mixgen.source_index import SourceIndex

if TYPE_CHECKING:
    from mixgen.config import RunConfig


@dataclass
class Prepared:
    """Per-source state computed once per run: views, readable mask and low-resolution maps."""

    views: RecordFile  # n records of (S, S, 3) uint8
    readable: np.ndarray  # (n,) bool
    skipped: list[dict[str, str]]
    maps: np.ndarray | None = None  # (n, h, w) float32
    probe: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # damaged caches that were rebuilt


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def views_cache_key(source_digest: str, size: int, resize: str) -> str:
    """Names OUT/.mixgen/views-<key>.u8: what the views depend on."""
    return _key(source_digest, size, resize)


def maps_cache_key(views_key: str, backbone: dict[str, Any] | None, cam: str, cam_size: int, device_type: str) -> str:
    """Names OUT/.mixgen/maps-<key>.npy, which the run writes and ``mixgen preview`` reads."""
    return _key(views_key, backbone, cam, cam_size, device_type)


@dataclass
class ViewCache:
    """The view cache of one run: reused whole (``decode_needed`` False) or being written."""

    key: str
    path: Path
    status_path: Path
    views: RecordFile
    readable: np.ndarray
    skipped: list[dict[str, str]]
    decode_needed: bool
    temp: Path | None = None


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
    """pool.map with at most ``window`` results in flight, so memory stays bounded."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _note_damage(notes: list[str], reporter: Reporter, what: str, damage: str | None) -> None:
    """Say that a damaged cache is rebuilt: at once, in the summary and in the run record."""
    if damage:
        notes.append(f"{what} cache damaged ({damage}): rebuilt")
        reporter.info(notes[-1])


def open_view_cache(
    cfg: RunConfig, index: SourceIndex, pool: ThreadPoolExecutor, reporter: Reporter, notes: list[str]
) -> ViewCache:
    """The finished view cache when it is whole and its checksums match, else a new one reserved
    under a name of this process's own (renamed into place when whole: workers sharing OUT never
    write through one file, and the space is reserved before mapping)."""
    cache = cfg.out / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    n, size = len(index), cfg.size
    key = views_cache_key(index.digest, size, cfg.resize)
    path, status_path = cache / f"views-{key}.u8", cache / f"views-{key}.json"
    status = read_json(status_path)
    expected_bytes = n * size * size * 3
    damage = None
    if path.is_file() and status_path.is_file():
        damage = f"{status_path.name} unreadable" if status is None else "wrong size"
        if status is not None and status.get("count") == n and path.stat().st_size == expected_bytes:
            views = RecordFile(path, n, (size, size, 3), np.uint8)
            if not (damage := views.damage(status_path, pool)):
                readable = np.ones(n, dtype=bool)
                readable[[s["position"] for s in status["skipped"]]] = False
                return ViewCache(key, path, status_path, views, readable, status["skipped"], False)
            views.close()
    cleared = clear_entries(path, status_path, digests_path(path))
    _note_damage(notes, reporter, "views", damage or cleared)
    temp = temp_path(path)
    allocate(temp, expected_bytes)
    views = RecordFile(temp, n, (size, size, 3), np.uint8)
    return ViewCache(key, path, status_path, views, np.zeros(n, dtype=bool), [], True, temp)


def decode_positions(
    cfg: RunConfig,
    index: SourceIndex,
    positions: list[int],
    cache: ViewCache,
    extractor: MapExtractor | None,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
) -> None:
    """Prepare sources[positions]: decode each into the view cache (unless reused), mark it
    readable or skipped, and feed the readable views to the CAM pass. On CUDA the backbone runs
    while the thread pool decodes the next sources. On a CPU the two would fight over the same
    cores, and torch's OpenMP threads stall whenever a decoder preempts one of them (25% slower on
    2 cores), so there the backbone follows the decoding."""
    from mixgen.views import load_source_view

    views, readable = cache.views, cache.readable

    def decode_one(position: int) -> tuple[int, str | None]:
        if not cache.decode_needed:
            return position, None if readable[position] else "skipped"
        try:
            views.write(position, load_source_view(index, index.items[position], cfg.size, cfg.resize))
            return position, None
        except DecodeError as exc:
            return position, str(exc)

    overlap = extractor is not None and extractor.device.type == "cuda"
    batch: list[int] = []
    with reporter.stage("decode + backbone" if overlap else "decode", len(positions)) as advance:
        for position, error in _bounded_map(pool, decode_one, list(positions), window=4 * cfg.batch_size):
            if error is None:
                readable[position] = True
                batch.append(position)
            elif cache.decode_needed:
                cache.skipped.append({"position": position, "path": index.items[position].path, "reason": error})
                if cfg.strict:
                    raise MixgenError(f"unreadable image {error} (--strict); fix or remove it")
            if overlap and len(batch) >= extractor.step:
                extractor.add(batch, views)
                batch = []
            advance(1)
    if extractor and batch:
        with reporter.stage("backbone", len(batch)) as advance:
            for start in range(0, len(batch), extractor.step):
                extractor.add(batch[start : start + extractor.step], views)
                advance(len(batch[start : start + extractor.step]))


def _seal_views(cache: ViewCache, n: int) -> None:
    """Rename the finished view cache into place; its checksums, written last, mark it whole."""
    os.replace(cache.temp, cache.path)
    write_json(cache.status_path, {"skipped": cache.skipped, "count": n})
    cache.views.seal(cache.path, cache.status_path)


def prepare_sources(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
    campass: CamPass | None,
) -> Prepared:
    """Decode every source once into the view cache (a record file) and, when the method needs maps,
    run the CAM pass over the views; reuse whatever the caches already hold whole."""
    n, notes = len(index), []
    views = open_view_cache(cfg, index, pool, reporter, notes)
    maps_key = None
    if cfg.needs_maps:
        cache = cfg.out / CACHE_DIR
        maps_key = maps_cache_key(views.key, campass.identity, cfg.cam, cfg.cam_size, device.type)
        maps_path, probe_path = cache / f"maps-{maps_key}.npy", cache / f"maps-{maps_key}.json"
        damage = None
        if not views.decode_needed and (maps_path.is_file() or probe_path.is_file()):
            probe = read_json(probe_path)
            maps, damage = load_checked_array(maps_path, n, probe_path) if probe is not None else (None, None)
            if maps is not None:
                reporter.info("views and CAMs reused from the cache")
                return Prepared(views.views, views.readable, views.skipped, maps, probe, notes=notes)
            missing = probe_path if probe is None else maps_path
            damage = damage or f"{missing.name} missing or unreadable"
        cleared = clear_entries(maps_path, probe_path, digests_path(maps_path))
        _note_damage(notes, reporter, "CAM maps", damage or cleared)
    elif not views.decode_needed:
        return Prepared(views.views, views.readable, views.skipped, notes=notes)

    extractor = MapExtractor(cfg, index, campass) if cfg.needs_maps else None
    started = time.perf_counter()
    decode_positions(cfg, index, list(range(n)), views, extractor, pool, reporter)
    views.views.sync()
    timings = {"decode_s": time.perf_counter() - started - (extractor.seconds if extractor else 0.0)}
    timings["backbone_s"] = 0.0
    if views.decode_needed:
        _seal_views(views, n)
    if extractor is None:
        return Prepared(views.views, views.readable, views.skipped, timings=timings, notes=notes)
    maps, probe = extractor.finish(views.readable, views.views)
    timings["backbone_s"] = extractor.seconds
    timings["probe_s"] = probe.get("seconds", 0.0)
    cache = cfg.out / CACHE_DIR
    write_json(cache / f"maps-{maps_key}.json", probe)
    save_checked_array(cache / f"maps-{maps_key}.npy", maps, cache / f"maps-{maps_key}.json")
    return Prepared(views.views, views.readable, views.skipped, maps, probe, timings, notes)
