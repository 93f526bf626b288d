"""Preparation: every source decoded once into its S×S view and, when the method needs maps, the
one CAM pass (``mixgen.pipeline.campass``) over the views, both kept in OUT/.mixgen under keys of what
they depend on, with checksums, so a resumed or repeated run reuses them and a damaged cache is
rebuilt, never used.

The sources are prepared in slices (``slice_spans``: whole backbone calls, fixed by the source
count alone), which the workers of a job sharing OUT divide among themselves: each claims a free
slice (a flock per slice, ``mixgen.output.lock.hold``: a worker that dies leaves it to the next taker),
decodes its sources into the shared view file, runs the backbone over them, keeps the slice's
maps or probe features under OUT/.mixgen/slices-KEY and marks it done; then it takes the next
free one, or waits for those still held (and says so, naming the holder, after WAIT_NOTE_S). The
first worker to see every slice done seals the view cache, fits the probe on the pooled features
of all slices and writes the maps cache; the others load them; the last worker to leave the board
removes it. One worker alone does every slice, so any number of workers makes the same caches.

Why it is over 400 lines: the slice board (claims, members, markers, the shared view file) and the
caches' reuse checks are one protocol; kept in one module so its invariants can be read in one
place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixgen import layout
from mixgen.errors import DecodeError, MixgenError
from mixgen.files import allocate, read_json, temp_path, write_json
from mixgen.layout import (
    BOARD_MEMBERS,
    BOARD_SEALED,
    PREPARE_LOCK,
    digests_path,
    maps_meta,
    slice_file,
    slices_dir,
    views_path,
    views_status,
)
from mixgen.output.cache import RecordFile, clear_entries, load_checked_array, save_checked_array
from mixgen.output.lock import held, hold, holder_of, last_member, member
from mixgen.pipeline.campass import CamPass, MapExtractor
from mixgen.progress import Reporter
from mixgen.sources.index import SourceIndex

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
    work: dict[str, int] = field(default_factory=dict)  # slices and backbone sources done by this process
    head: Any = None  # the probe's fitted LinearHead (CPU), from the head cache beside the maps


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
    views: RecordFile | None  # None until _join_slices opens the file being written
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


SLICES_MAX = 256  # slices per job at most, so that claims and markers stay few for any source count
WAIT_NOTE_S = 120.0  # a wait this long for slices others hold is said, once, naming the holder


def slice_spans(n: int, unit: int) -> list[range]:
    """Sources [0, n) in slices of whole backbone calls (``unit`` sources), fixed by ``n`` and the
    call alone (not by the number of workers), so that whoever prepares a slice makes the same bytes."""
    length = unit * max(1, -(-n // (SLICES_MAX * unit)))
    return [range(start, min(start + length, n)) for start in range(0, n, length)]


def _whole_views(cfg: RunConfig, index: SourceIndex, pool: ThreadPoolExecutor) -> ViewCache | str | None:
    """The finished view cache when it is whole and its checksums match; else why not (None when
    there is none)."""
    n, size = len(index), cfg.size
    key = views_cache_key(index.digest, size, cfg.resize)
    path, status_path = views_path(cfg.cache, key), views_status(cfg.cache, key)
    if not (path.is_file() and status_path.is_file()):
        return None
    status = read_json(status_path)
    damage = f"{status_path.name} unreadable" if status is None else "wrong size"
    if status is not None and status.get("count") == n and path.stat().st_size == n * size * size * 3:
        views = RecordFile(path, n, (size, size, 3), np.uint8)
        if not (damage := views.damage(status_path, pool)):
            readable = np.ones(n, dtype=bool)
            readable[[s["position"] for s in status["skipped"]]] = False
            return ViewCache(key, path, status_path, views, readable, status["skipped"], False)
        views.close()
    return damage


def open_view_cache(
    cfg: RunConfig, index: SourceIndex, pool: ThreadPoolExecutor, reporter: Reporter, notes: list[str]
) -> ViewCache:
    """The finished view cache when it is whole and its checksums match, else a new one to be
    written (``decode_needed``; its file is opened by ``_join_slices``)."""
    cfg.cache.mkdir(parents=True, exist_ok=True)
    found = _whole_views(cfg, index, pool)
    if isinstance(found, ViewCache):
        return found
    key = views_cache_key(index.digest, cfg.size, cfg.resize)
    path, status_path = views_path(cfg.cache, key), views_status(cfg.cache, key)
    cleared = clear_entries(path, status_path, digests_path(path))
    _note_damage(notes, reporter, "views", found or cleared)
    n = len(index)
    return ViewCache(key, path, status_path, None, np.zeros(n, dtype=bool), [], True)


def decode_positions(
    cfg: RunConfig,
    index: SourceIndex,
    positions: list[int] | range,
    cache: ViewCache,
    extractor: MapExtractor | None,
    pool: ThreadPoolExecutor,
) -> None:
    """Prepare sources[positions]: decode each into the view cache (unless reused), mark it
    readable or skipped, and feed the readable views to the CAM pass. On CUDA the backbone runs
    while the thread pool decodes the next sources. On a CPU the two would fight over the same
    cores, and torch's OpenMP threads stall whenever a decoder preempts one of them (25% slower on
    2 cores), so there the backbone follows the decoding."""
    from mixgen.sources.views import load_source_view

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
    if extractor and batch:
        for start in range(0, len(batch), extractor.step):
            extractor.add(batch[start : start + extractor.step], views)


@dataclass
class SliceBoard:
    """OUT/.mixgen/slices-KEY: per slice a lock file (``k.lock``), and once it is done its kept
    rows (``k.npy``: maps, or pooled probe features), its feature maps (``k.f16``, probe) and,
    written last, its marker (``k.json``: skipped sources and the CRC-32 of each view written).
    Each worker at work on it holds a shared flock on ``members.lock``; the first to leave with
    every slice done seals the caches (and writes ``sealed``), the last to leave removes the
    folder, so that no worker still taking in slices sees it vanish (or re-makes it)."""

    folder: Path
    spans: list[range]

    def path(self, k: int, suffix: str) -> Path:
        return slice_file(self.folder, k, suffix)

    def marker(self, k: int) -> dict[str, Any] | None:
        return read_json(self.path(k, "json"))

    @property
    def members(self) -> Path:
        return self.folder / BOARD_MEMBERS

    @property
    def sealed(self) -> Path:
        return self.folder / BOARD_SEALED


def _leave_board(folder: Path, membership: int) -> None:
    """Leave a slice board (inside PREPARE_LOCK, where members join and leave): the last member
    to leave removes it."""
    try:
        if last_member(membership):
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(membership)


def _remove_unused_board(folder: Path) -> None:
    """Remove a slice board left by workers that died after the caches were sealed."""
    if folder.is_dir():
        _leave_board(folder, member(folder / BOARD_MEMBERS))


def _join_slices(cache_dir: Path, key: str, views: ViewCache, spans: list[range], size: int) -> SliceBoard:
    """Open the job's slice board (inside PREPARE_LOCK): join the one in progress, or start a new
    one together with the shared view file its markers describe (reserved before it is written)."""
    board = SliceBoard(slices_dir(cache_dir, key), spans)
    if views.decode_needed:
        part = views.path.with_name(views.path.name + ".part")
        expected = len(views.readable) * size * size * 3
        if not (board.folder.is_dir() and part.is_file() and part.stat().st_size == expected):
            shutil.rmtree(board.folder, ignore_errors=True)
            temp = temp_path(part)
            allocate(temp, expected)
            os.replace(temp, part)
        views.temp = part
        views.views = RecordFile(part, len(views.readable), (size, size, 3), np.uint8)
    board.folder.mkdir(exist_ok=True)
    return board


def _prepare_slice(
    cfg: RunConfig,
    index: SourceIndex,
    board: SliceBoard,
    k: int,
    views: ViewCache,
    extractor: MapExtractor | None,
    pool: ThreadPoolExecutor,
) -> None:
    """Decode slice k and run the backbone over it; keep what it made and mark it done."""
    span = board.spans[k]
    skipped_before = len(views.skipped)
    if extractor is not None:
        extractor.start_slice(span, board.path(k, "f16"))
    decode_positions(cfg, index, span, views, extractor, pool)
    marker: dict[str, Any] = {"skipped": views.skipped[skipped_before:], "features": None}
    if views.decode_needed:
        views.views.sync()
        marker["digests"] = [int(d) for d in views.views.digests[span.start : span.stop]]
    if extractor is not None:
        rows, marker["features"] = extractor.end_slice()
        if rows is not None:
            save_checked_array(board.path(k, "npy"), rows)
    write_json(board.path(k, "json"), marker)


def _take_slice(board: SliceBoard, k: int, views: ViewCache, extractor: MapExtractor | None) -> bool:
    """Take in slice k as done by another worker (or an earlier run); False if it is not done yet
    or what it kept is damaged (its marker is then removed, so that it is prepared again)."""
    marker = board.marker(k)
    if marker is None:
        return False
    span = board.spans[k]
    rows = None
    if extractor is not None and board.path(k, "npy").is_file():
        rows, _ = load_checked_array(board.path(k, "npy"), len(span))
        if rows is None:
            board.path(k, "json").unlink(missing_ok=True)
            return False
    if views.decode_needed:
        unreadable = {s["position"] for s in marker["skipped"]}
        views.readable[span.start : span.stop] = [p not in unreadable for p in span]
        views.skipped.extend(marker["skipped"])
        views.views.digests[span.start : span.stop] = marker["digests"]
    if rows is not None:
        extractor.load_slice(span, rows)
    return True


def _work_slices(
    cfg: RunConfig,
    index: SourceIndex,
    board: SliceBoard,
    views: ViewCache,
    extractor: MapExtractor | None,
    pool: ThreadPoolExecutor,
    advance,
    note=None,
) -> tuple[int, float]:
    """Prepare every free slice and take in the others' as they finish; returns the slices this
    process prepared and the seconds it waited for slices held by other workers. A wait of
    WAIT_NOTE_S is said once through ``note``, naming the holder: a hung sibling is then a line
    to act on, not a silent stall."""
    done: set[int] = set()
    mine, waited, quiet, noted = 0, 0.0, 0.0, False
    while len(done) < len(board.spans) and board.folder.is_dir():
        progressed = False
        for k, span in enumerate(board.spans):
            if k in done:
                continue
            if not _take_slice(board, k, views, extractor):
                fd = hold(board.path(k, "lock"))
                if fd is None:
                    continue
                try:
                    if not _take_slice(board, k, views, extractor):
                        _prepare_slice(cfg, index, board, k, views, extractor, pool)
                        mine += 1
                finally:
                    os.close(fd)
            done.add(k)
            progressed = True
            advance(len(span))
        if progressed:
            quiet, noted = 0.0, False
            continue
        began = time.perf_counter()
        time.sleep(0.05)
        waited += time.perf_counter() - began
        quiet += time.perf_counter() - began
        if note is not None and not noted and quiet >= WAIT_NOTE_S:
            noted = True
            k = min(set(range(len(board.spans))) - done)
            span = board.spans[k]
            note(
                f"waiting {quiet:.0f} s for sources {span.start}-{span.stop - 1}, held by "
                f"{holder_of(board.path(k, 'lock')).describe()}; if that process hangs, stop it "
                "and this one takes them over"
            )
    return mine, waited


def seal_views(cache: ViewCache, n: int) -> None:
    """Rename the finished view cache into place; its checksums, written last, mark it whole."""
    cache.skipped.sort(key=lambda s: s["position"])
    os.replace(cache.temp, cache.path)
    write_json(cache.status_path, {"skipped": cache.skipped, "count": n})
    cache.views.seal(cache.path, cache.status_path)


def save_head(cache: Path, maps_key: str, head: Any) -> None:
    """Keep the probe's fitted head beside its maps, sealed with the probe's record (written before)."""
    path = layout.head_path(cache, maps_key)
    clear_entries(path, digests_path(path))
    save_checked_array(path, head.to_array(), maps_meta(cache, maps_key))


def load_head(cache: Path, maps_key: str) -> tuple[Any, str | None]:
    """(the cached probe head, None), (None, None) when there is none, or (None, why) when damaged."""
    from mixgen.cam.cams import LinearHead

    path = layout.head_path(cache, maps_key)
    array, damage = load_checked_array(path, None, maps_meta(cache, maps_key))
    if array is None:
        return None, damage
    if array.ndim != 2 or array.shape[1] < 2 or array.dtype != np.float32:
        return None, "wrong shape"
    return LinearHead.from_array(array), None


def reused_caches(cfg, index, pool, reporter, maps_key: str | None, notes: list[str]) -> Prepared | ViewCache:
    """Both caches whole (Prepared), or the view cache to start from (whole or to be written). A
    probe's head is loaded with its maps; a teacher run (--label-weights teacher) needs it, so maps
    without it (a cache of an earlier mixgen, or a damaged head) are rebuilt with the head."""
    from mixgen.methods import TEACHER

    views = open_view_cache(cfg, index, pool, reporter, notes)
    if maps_key is None:
        return views if views.decode_needed else Prepared(views.views, views.readable, views.skipped, notes=notes)
    if views.decode_needed:
        return views
    cache = cfg.cache
    maps_path, probe_path = layout.maps_path(cache, maps_key), maps_meta(cache, maps_key)
    head_path = layout.head_path(cache, maps_key)
    damage = None
    if maps_path.is_file() or probe_path.is_file():
        probe = read_json(probe_path)
        maps, damage = load_checked_array(maps_path, len(index), probe_path) if probe is not None else (None, None)
        head = None
        if maps is not None and cfg.cam == "probe":
            head, head_damage = load_head(cache, maps_key)
            if head is None and cfg.label_weights == TEACHER:
                maps, damage = None, f"the teacher's {head_path.name} {head_damage or 'missing'}"
        if maps is not None:
            return Prepared(views.views, views.readable, views.skipped, maps, probe, notes=notes, head=head)
        missing = probe_path if probe is None else maps_path
        damage = damage or f"{missing.name} missing or unreadable"
    cleared = clear_entries(maps_path, probe_path, digests_path(maps_path), head_path, digests_path(head_path))
    _note_damage(notes, reporter, "CAM maps", damage or cleared)
    return views


def prepare_sources(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
    campass: CamPass | None,
) -> Prepared:
    """Decode every source once into the view cache (a record file) and, when the method needs maps,
    run the CAM pass over the views; reuse whatever the caches already hold whole, and share the
    work with the other workers of the job (see the module's docstring)."""
    n, notes = len(index), []
    cache = cfg.cache
    cache.mkdir(parents=True, exist_ok=True)
    views_key = views_cache_key(index.digest, cfg.size, cfg.resize)
    maps_key, extractor = None, None
    if cfg.needs_maps:
        maps_key = maps_cache_key(views_key, campass.identity, cfg.cam, cfg.cam_size, device.type)
        extractor = MapExtractor(cfg, index, campass)
    spans = slice_spans(n, extractor.call if extractor else cfg.batch_size)
    with held(cache / PREPARE_LOCK):
        found = reused_caches(cfg, index, pool, reporter, maps_key, notes)
        if isinstance(found, Prepared):
            _remove_unused_board(slices_dir(cache, maps_key or views_key))
            if found.maps is not None:
                reporter.info("views and CAMs reused from the cache")
            found.work = {"slices": len(spans), "slices_prepared": 0, "backbone_sources": 0}
            return found
        views = found
        board = _join_slices(cache, maps_key or views_key, views, spans, cfg.size)
        membership = member(board.members)
    try:
        started = time.perf_counter()
        with reporter.stage("decode + backbone" if extractor else "decode", n) as advance:
            mine, waited = _work_slices(cfg, index, board, views, extractor, pool, advance, reporter.info)
    except BaseException:
        os.close(membership)
        raise
    backbone_s = extractor.seconds if extractor else 0.0
    timings = {"decode_s": time.perf_counter() - started - waited - backbone_s}
    timings.update(backbone_s=backbone_s, slices_wait_s=waited)
    if extractor is not None:
        timings["decode_s"] -= extractor.turn_wait
        timings["backbone_turn_wait_s"] = extractor.turn_wait
    work = {"slices": len(spans), "slices_prepared": mine, "backbone_sources": extractor.sources if extractor else 0}
    probe_s = 0.0
    with held(cache / PREPARE_LOCK):
        try:
            if board.folder.is_dir() and not board.sealed.exists():  # every slice done, none sealed yet
                probe_s = _finish(cfg, cache, board, views, extractor, maps_key)
        except BaseException:  # the board stays for the next run, its slices done
            os.close(membership)
            raise
        _leave_board(board.folder, membership)
    found = reused_caches(cfg, index, pool, reporter, maps_key, [])
    if not isinstance(found, Prepared):
        raise MixgenError(f"the caches in {cache} were damaged while they were written; re-run the same command")
    timings["probe_s"] = probe_s
    return Prepared(
        found.views, found.readable, found.skipped, found.maps, found.probe, timings, notes, work, found.head
    )


def _finish(
    cfg: RunConfig, cache: Path, board: SliceBoard, views: ViewCache, extractor: MapExtractor | None, maps_key
) -> float:
    """Seal the view cache, fit the probe on all pooled features and write the maps cache (once,
    inside PREPARE_LOCK); then mark the slice board sealed. Returns the probe's seconds."""
    n = len(views.readable)
    if views.decode_needed:
        seal_views(views, n)
    probe_s = 0.0
    if extractor is not None:
        features = [
            (span, board.path(k, "f16"), board.marker(k)["features"])
            for k, span in enumerate(board.spans)
            if (board.marker(k) or {}).get("features")
        ]
        maps, probe = extractor.finish(views.readable, views.views, features)
        probe_s = probe.get("seconds", 0.0)
        write_json(maps_meta(cache, maps_key), probe)
        save_checked_array(layout.maps_path(cache, maps_key), maps, maps_meta(cache, maps_key))
        if cfg.cam == "probe":
            save_head(cache, maps_key, extractor.campass.head)
    views.views.close()
    board.sealed.touch()
    return probe_s
