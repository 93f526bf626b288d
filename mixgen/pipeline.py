"""The pipeline: scan → views (decoded once per source, cached) → backbone pass and CAMs (once per
source) → pairing plan → batched mixing → encoding in a thread pool → shards with atomic
manifests → run record. It reports progress through a ``Reporter`` and never prints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mixgen import __version__
from mixgen.cache import RecordFile, load_checked_array, save_checked_array
from mixgen.config import RunConfig
from mixgen.errors import DecodeError, MixgenError
from mixgen.lock import Door, claim, refuse_if_taken
from mixgen.outdir import (
    CACHE_DIR,
    RECORD_NAME,
    WORKER_GLOB,
    allocate,
    check_out_is_ours,
    check_out_outside_src,
    fault_error,
    publish_record,
    read_json,
    remove_stale_temps,
    remove_worker_records,
    sigterm_as_interrupt,
    temp_path,
    torch_threads,
    write_json,
)
from mixgen.sources import SourceIndex
from mixgen.writers import Shard, make_writer

# The backbone's CPU kernels and the probe's reductions round differently with the thread count:
# one count per machine, whatever OMP_NUM_THREADS a launcher (torchrun sets 1) gives each worker,
# so every CAM is the same in any worker layout.
BACKBONE_THREADS = PROBE_THREADS = os.cpu_count() or 1
# The mixing kernels are small; with the encoder pool busy on every core, torch's OpenMP threads
# would mostly wait for one another (spm_box_mass: 0.45 ms alone, 16 ms beside the encoders).
MIX_THREADS = 1


class Reporter:
    """Progress and messages; the CLI plugs in rich, the library default stays silent."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def info(self, message: str) -> None:
        pass


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
    """Names OUT/.mixgen/maps-<key>.npy, which the pipeline writes and ``mixgen preview`` reads."""
    return _key(views_key, backbone, cam, cam_size, device_type)


def resolve_device(requested: str):
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MixgenError(f"--device {requested}: CUDA is not available here; use --device cpu or auto")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MixgenError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


# ---------------------------------------------------------------------------------------------
# OUT folder and run record


def prepare_out(
    cfg: RunConfig, fingerprint: str, index: SourceIndex | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Make OUT ready. Returns the previous record when this is a resume of the same run (also when
    only a sibling worker's record exists yet); refuses a different run, naming what differs,
    unless --overwrite, which removes only mixgen's own files, and never touches a folder that
    holds no mixgen run. Called inside the OUT lock's door (see mixgen.lock)."""
    out = cfg.out
    check_out_is_ours(out)
    if not out.is_dir():
        return None
    record_paths = [p for p in (out / RECORD_NAME, *sorted(out.glob(WORKER_GLOB))) if p.is_file()]
    if record_paths:
        previous = read_json(record_paths[0]) or {}
        if previous.get("fingerprint") == fingerprint:
            return previous
        if not cfg.overwrite:
            from mixgen.rundiff import describe_difference

            what = "settings differ"
            if index is not None:
                what = describe_difference(out, previous, cfg.output_settings(), extra or {}, index)
            raise MixgenError(f"OUT {out} holds a different mixgen run ({what}); choose a new OUT or pass --overwrite")
        for name in ("data", CACHE_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for path in record_paths:
            path.unlink(missing_ok=True)
    return None


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


# ---------------------------------------------------------------------------------------------
# Views and maps, once per source


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
    """pool.map with at most ``window`` results in flight, so memory stays bounded."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def prepare_sources(
    cfg: RunConfig,
    index: SourceIndex,
    device,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
    backbone_cache: dict[str, Any],
) -> Prepared:
    """Decode every source once into the view cache (a record file) and, when the method needs maps,
    run the backbone over the views (during decoding on CUDA, after it on a CPU)."""
    from mixgen.views import load_source_view

    cache = cfg.out / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    n, size = len(index), cfg.size
    views_key = views_cache_key(index.digest, size, cfg.resize)
    views_path, status_path = cache / f"views-{views_key}.u8", cache / f"views-{views_key}.json"
    status = read_json(status_path)
    expected_bytes = n * size * size * 3
    notes: list[str] = []  # caches found damaged and rebuilt
    views = None
    if views_path.is_file() and status_path.is_file():
        damage = f"{status_path.name} unreadable" if status is None else "wrong size"
        if status is not None and status.get("count") == n and views_path.stat().st_size == expected_bytes:
            views = RecordFile(views_path, n, (size, size, 3), np.uint8)
            if damage := views.damage(status_path, pool):
                views.close()
                views = None
        _note_damage(notes, reporter, "views", damage)
    if views is not None:
        readable = np.ones(n, dtype=bool)
        readable[[s["position"] for s in status["skipped"]]] = False
        skipped = status["skipped"]
        decode_needed = False
    else:
        # Decoded under a name of this process's own, renamed into place when whole: workers
        # sharing OUT never write through one file, and the space is reserved before mapping.
        views_temp = temp_path(views_path)
        allocate(views_temp, expected_bytes)
        views = RecordFile(views_temp, n, (size, size, 3), np.uint8)
        readable = np.zeros(n, dtype=bool)
        skipped = []
        decode_needed = True

    maps_key = None
    if cfg.needs_maps:
        maps_key = maps_cache_key(views_key, backbone_cache["identity"], cfg.cam, cfg.cam_size, device.type)
        maps_path, probe_path = cache / f"maps-{maps_key}.npy", cache / f"maps-{maps_key}.json"
        if not decode_needed and (maps_path.is_file() or probe_path.is_file()):
            probe = read_json(probe_path)
            maps, damage = load_checked_array(maps_path, n, probe_path) if probe is not None else (None, None)
            if maps is not None:
                reporter.info("views and CAMs reused from the cache")
                return Prepared(views, readable, skipped, maps, probe, notes=notes)
            missing = probe_path if probe is None else maps_path
            _note_damage(notes, reporter, "CAM maps", damage or f"{missing.name} missing or unreadable")
    elif not decode_needed:
        return Prepared(views, readable, skipped, notes=notes)

    timings = {"decode_s": 0.0, "backbone_s": 0.0}

    def decode_one(position: int) -> tuple[int, str | None]:
        if not decode_needed:
            return position, None if readable[position] else "skipped"
        try:
            views.write(position, load_source_view(index, index.items[position], size, cfg.resize))
            return position, None
        except DecodeError as exc:
            return position, str(exc)

    extractor = _MapExtractor(cfg, index, device, backbone_cache) if cfg.needs_maps else None
    # On CUDA the backbone runs while the thread pool decodes the next sources. On a CPU the two
    # would fight over the same cores, and torch's OpenMP threads stall whenever a decoder
    # preempts one of them (25% slower on 2 cores), so there the backbone follows the decoding.
    overlap = extractor is not None and device.type == "cuda"
    batch: list[int] = []
    started = time.perf_counter()
    with reporter.stage("decode + backbone" if overlap else "decode", n) as advance:
        for position, error in _bounded_map(pool, decode_one, list(range(n)), window=4 * cfg.batch_size):
            if error is None:
                readable[position] = True
                batch.append(position)
            elif decode_needed:
                skipped.append({"position": position, "path": index.items[position].path, "reason": error})
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
    views.sync()
    timings["decode_s"] = time.perf_counter() - started - (extractor.seconds if extractor else 0.0)
    if decode_needed:
        os.replace(views_temp, views_path)
        write_json(status_path, {"skipped": skipped, "count": n})
        views.seal(views_path, status_path)  # last: the checksums mark the cache finished
    if extractor is None:
        return Prepared(views, readable, skipped, timings=timings, notes=notes)
    maps, probe = extractor.finish(readable, views)
    timings["backbone_s"] = extractor.seconds
    timings["probe_s"] = probe.get("seconds", 0.0)
    write_json(cache / f"maps-{maps_key}.json", probe)
    save_checked_array(cache / f"maps-{maps_key}.npy", maps, cache / f"maps-{maps_key}.json")
    return Prepared(views, readable, skipped, maps, probe, timings, notes)


def _note_damage(notes: list[str], reporter: Reporter, what: str, damage: str | None) -> None:
    """Say that a damaged cache is rebuilt: at once, in the summary and in the run record."""
    if damage:
        notes.append(f"{what} cache damaged ({damage}): rebuilt")
        reporter.info(notes[-1])


class _MapExtractor:
    """Runs the backbone batch by batch. For ``probe`` the feature maps are kept (fp16) until the
    probe is fitted on the pooled features; other modes reduce each batch to its map at once."""

    def __init__(self, cfg: RunConfig, index: SourceIndex, device, backbone_cache: dict[str, Any]):
        import torch

        from mixgen.cams import fixed_head, micro_batch

        self.torch = torch
        self.cfg, self.device = cfg, device
        self.backbone = backbone_cache["backbone"]
        # Sources per add(): --batch-size rounded up to whole backbone calls, so that only the
        # last call is padded (on CUDA a call is 64 images, more than the default --batch-size).
        call = micro_batch(device, cfg.cam_size, self.backbone)
        self.step = -(-cfg.batch_size // call) * call
        self.labels = torch.tensor([s.label for s in index.items], dtype=torch.long)
        self.n = len(index)
        self.seconds = 0.0
        self.maps: np.ndarray | None = None  # (n, h, w); --cam-norm colour makes its grid finer than F's
        self.pooled: torch.Tensor | None = None
        self.features = None
        self.head = fixed_head(self.backbone, cfg.cam)

    def _store_maps(self, positions, maps) -> None:
        if self.maps is None:
            self.maps = np.zeros((self.n, *maps.shape[1:]), dtype=np.float32)
        self.maps[positions] = maps.cpu().numpy()

    def _allocate_features(self, fmap) -> None:
        torch = self.torch
        _, channels, h, w = fmap.shape
        if self.cfg.cam == "probe":
            self.pooled = torch.zeros(self.n, channels)
            nbytes = self.n * channels * h * w * 2
            if self.device.type == "cuda" and nbytes < torch.cuda.mem_get_info(self.device)[0] // 4:
                self.features = torch.zeros(self.n, channels, h, w, dtype=torch.float16, device=self.device)
            else:
                path = temp_path(self.cfg.out / CACHE_DIR / "features.f16")  # per process
                allocate(path, nbytes)
                self.features = RecordFile(path, self.n, (channels, h, w), np.float16)

    def add(self, positions: list[int], views: RecordFile) -> None:
        from mixgen.cams import invariant_feature_maps, maps_for

        torch = self.torch
        started = time.perf_counter()
        batch = torch.from_numpy(views.read(positions)).to(self.device)
        with torch_threads(BACKBONE_THREADS):
            fmap = invariant_feature_maps(self.backbone, batch, self.cfg.cam_size)
        if self.cfg.cam == "probe":
            if self.features is None:
                self._allocate_features(fmap)
            self.pooled[positions] = fmap.mean(dim=(2, 3)).cpu()
            if isinstance(self.features, RecordFile):
                for position, record in zip(positions, fmap.half().cpu().numpy(), strict=True):
                    self.features.write(position, record)
            else:
                self.features[positions] = fmap.half()
        else:
            labels = self.labels[positions].to(self.device)
            maps = maps_for(fmap, self.cfg.cam, self.head, labels, norm=self.cfg.cam_norm, views=batch)
            self._store_maps(positions, maps)
        self.seconds += time.perf_counter() - started

    def finish(self, readable: np.ndarray, views: RecordFile) -> tuple[np.ndarray, dict[str, Any]]:
        if self.maps is None and self.features is None:
            raise MixgenError("no source image could be read; nothing to mix")
        if self.cfg.cam != "probe":
            return self.maps, {}
        from mixgen.cams import normalise_cams
        from mixgen.probe import fit_probe

        torch = self.torch
        started = time.perf_counter()
        keep = torch.from_numpy(np.flatnonzero(readable))
        labels = self.labels[keep]
        classes = len(torch.unique(labels))
        if classes < 2:
            raise MixgenError("--cam probe needs images of at least 2 classes in SRC; use --cam mean or imagenet")
        num_classes = int(self.labels.max()) + 1
        with torch_threads(PROBE_THREADS):
            result = fit_probe(self.pooled[keep].to(self.device), labels.to(self.device), num_classes)
        for start in range(0, len(keep), self.cfg.batch_size):
            chunk = keep[start : start + self.cfg.batch_size]
            if isinstance(self.features, RecordFile):
                fmap = torch.from_numpy(self.features.read(chunk.numpy())).to(self.device)
            else:
                fmap = self.features[chunk.to(self.device)]
            cams = result.head.cams(fmap.float(), self.labels[chunk].to(self.device))
            chunk_views = None
            if self.cfg.cam_norm == "colour":
                chunk_views = torch.from_numpy(views.read(chunk.numpy())).to(self.device)
            self._store_maps(chunk.numpy(), normalise_cams(cams, self.cfg.cam_norm, chunk_views))
        if isinstance(self.features, RecordFile):
            self.features.close()
            self.features.path.unlink(missing_ok=True)
        self.features = None
        seconds = time.perf_counter() - started
        return self.maps, {
            "cam": "probe",
            **result.accuracies(),
            "seconds": round(seconds, 3),
        }


# ---------------------------------------------------------------------------------------------
# Mixing and writing


@dataclass
class MixContext:
    cfg: RunConfig
    index: SourceIndex
    positions: np.ndarray  # readable source positions; plan indices point into this
    prepared: Prepared
    device: Any
    labels: np.ndarray = field(init=False)
    source_inputs: dict[str, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        from mixgen.methods import SourceData

        self.labels = np.array([s.label for s in self.index.items], dtype=np.int64)
        sources = SourceData(
            self.prepared.views, self.prepared.maps, self.prepared.readable, self.cfg.size, self.device
        )
        # Once per source, not per pair.
        for name, source_input in self.cfg.declaration.inputs.items():
            self.source_inputs[name] = source_input.compute(sources, self.cfg.options)


def _as_box(row: np.ndarray) -> dict[str, int]:
    return dict(zip(("x0", "y0", "x1", "y1"), (int(v) for v in row), strict=True))


def mix_batch(ctx: MixContext, planned: list) -> tuple[Any, list[dict[str, Any]]]:
    """Mix one batch of planned outputs; returns the (B, 3, S, S) uint8 images, still on the
    device, and their manifest rows (without sha256)."""
    import torch

    from mixgen.manifest import image_name, soft_targets
    from mixgen.methods import Batch, mask_runs
    from mixgen.methods.labels import mix_with_label_weights

    cfg, device = ctx.cfg, ctx.device
    canvas_pos = ctx.positions[[p.canvas for p in planned]]
    donor_pos = ctx.positions[[p.donor for p in planned]]
    views = ctx.prepared.views

    def load(pos: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(views.read(pos)).to(device).permute(0, 3, 1, 2)

    def per_source(array: np.ndarray | None, pos: np.ndarray) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array[pos]).to(device)

    label_a, label_b = ctx.labels[canvas_pos], ctx.labels[donor_pos]
    maps = ctx.prepared.maps
    batch = Batch(
        canvas=load(canvas_pos),
        donor=load(donor_pos),
        params=[p.params for p in planned],
        options=cfg.options,
        same_label=torch.from_numpy(label_a == label_b).to(device),
        maps_a=per_source(maps, canvas_pos),
        maps_b=per_source(maps, donor_pos),
        inputs_a={name: per_source(array, canvas_pos) for name, array in ctx.source_inputs.items()},
        inputs_b={name: per_source(array, donor_pos) for name, array in ctx.source_inputs.items()},
    )
    result = mix_with_label_weights(cfg.declaration, batch, cfg.label_weights)

    weight_a, weight_b = result.weight_a.cpu().numpy(), result.weight_b.cpu().numpy()
    area = result.area_ratio.cpu().numpy()
    has_box = result.has_box.cpu().numpy() if result.has_box is not None else np.zeros(len(planned), bool)
    box_a = result.box_a.cpu().numpy() if result.box_a is not None else None
    box_b = result.box_b.cpu().numpy() if result.box_b is not None else None
    cells = result.cells.cpu().numpy() if result.cells is not None else None
    masks = result.mask.cpu().numpy() if result.mask is not None else None
    lam = result.lam.cpu().numpy() if result.lam is not None else None

    rows = []
    for j, p in enumerate(planned):
        a, b = ctx.index.items[canvas_pos[j]], ctx.index.items[donor_pos[j]]
        rows.append(
            {
                "file_name": image_name(p.index, cfg.format),
                "index": p.index,
                "method": cfg.method,
                "source_a": a.path,
                "source_b": b.path,
                "label_a": a.label,
                "label_b": b.label,
                "class_a": ctx.index.classes[a.label],
                "class_b": ctx.index.classes[b.label],
                "weight_a": float(weight_a[j]),
                "weight_b": float(weight_b[j]),
                "targets": soft_targets(a.label, b.label, weight_a[j], weight_b[j]),
                "box_a": _as_box(box_a[j]) if has_box[j] else None,
                "box_b": _as_box(box_b[j]) if has_box[j] else None,
                "cells": [int(c) for c in cells[j] if c >= 0] if cells is not None else None,
                "mask": mask_runs(masks[j]) if masks is not None else None,
                "label_weights": cfg.label_weights,
                "lam": float(lam[j]) if lam is not None else p.params.get("lam"),
                "area_ratio": float(area[j]),
                "seed": p.seed,
                "width": cfg.size,
                "height": cfg.size,
            }
        )
    return result.images, rows


def _to_encode(images, cfg: RunConfig) -> list[bytes] | np.ndarray:
    """JPEG bytes from nvJPEG, called here on the one main thread (torchvision's CUDA codec is not
    thread-safe), or H×W×3 arrays for the CPU encoder threads."""
    if cfg.codec == "cuda":
        from mixgen.views import encode_jpeg_cuda

        return encode_jpeg_cuda(images, cfg.quality)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def mixes_on_pool(device) -> bool:
    """A CPU mixes each batch on a pool thread, beside the encoders of other batches (torch
    releases the GIL), so mixing and encoding share every core. A GPU mixes on the main thread and
    the pool only encodes and writes: nvJPEG must stay on one thread anyway."""
    return device.type == "cpu"


def _mix(ctx: MixContext, planned: list) -> tuple[list[bytes] | np.ndarray, list[dict[str, Any]], float]:
    """Mix a batch and bring it into the encoders' form; also returns the seconds it took."""
    began = time.perf_counter()
    images, rows = mix_batch(ctx, planned)
    return _to_encode(images, ctx.cfg), rows, time.perf_counter() - began


def _finish_batch(
    ctx: MixContext, planned: list, shard: Shard, mixed: tuple | None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Mix the batch (unless the device already has), encode and write its images; returns its
    manifest rows with their sha256 and the seconds spent in each step."""
    encoded, rows, mix_s = mixed if mixed is not None else _mix(ctx, planned)
    spent = {"mix_s": mix_s, "encode_s": 0.0, "write_s": 0.0}
    for image, row in zip(encoded, rows, strict=True):
        row["sha256"], encode_s, write_s = _write_image(shard, row, image, ctx.cfg.format, ctx.cfg.quality)
        spent["encode_s"] += encode_s
        spent["write_s"] += write_s
    return rows, spent


def _warm_up_pyarrow() -> None:
    """pyarrow's first Python-to-Arrow conversion imports pandas (about 0.5 s): pay it on a pool
    thread while sources decode, not on the main thread when the first manifest is written."""
    import pyarrow as pa

    pa.array([0])


def _write_image(
    shard: Shard, row: dict[str, Any], image: np.ndarray | bytes, fmt: str, quality: int
) -> tuple[str, float, float]:
    """Encode (unless already encoded) and hand one output to its shard; returns its sha256 and the
    seconds spent encoding and writing, for the run record."""
    from mixgen.views import encode

    started = time.perf_counter()
    data = image if isinstance(image, bytes) else encode(image, fmt, quality)
    encoded = time.perf_counter()
    row["sha256"] = hashlib.sha256(data).hexdigest()
    shard.add(row, data)
    return row["sha256"], encoded - started, time.perf_counter() - encoded


# ---------------------------------------------------------------------------------------------
# The whole run


def _publish(cfg: RunConfig, record: dict[str, Any]) -> None:
    """Write the run record; with several workers, also this worker's own (see mixgen.outdir)."""
    publish_record(cfg.out, record, cfg.shard_index, cfg.num_shards)


def _discard_unfinished(cfg: RunConfig, my_shards: list[int]) -> None:
    """Remove this worker's shards that hold no manifest: their images were never committed."""
    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    for shard in my_shards:
        writer.discard_unfinished(shard)


def load_backbone_cache(cfg: RunConfig, index: SourceIndex, device) -> dict[str, Any]:
    """The backbone's inference copy on ``device`` and its identity (empty when no maps needed)."""
    if not cfg.needs_maps:
        return {}
    from mixgen.backbones import fast_inference_copy, load_backbone
    from mixgen.onnx_runtime import cam_pass_backbone

    loaded = load_backbone(cfg.backbone, cfg.weights, cfg.checkpoint, len(index.classes))
    backbone = fast_inference_copy(loaded).to(device)
    backbone, runtime = cam_pass_backbone(backbone, cfg.runtime, device, cfg.cam_size, BACKBONE_THREADS)
    return {
        "backbone": backbone,
        # The runtime rounds differently: its maps (and so the weights written) are its own.
        "identity": {"name": backbone.name, "weights": backbone.weights_digest, "runtime": runtime.name},
        "runtime": runtime.as_record(),
    }


def run(cfg: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one mixgen job end to end and return its summary (also written to OUT/mixgen.json).
    Holds this worker's lock on OUT (mixgen.lock) from before OUT is looked at to the end."""
    with contextlib.ExitStack() as held:
        return _run(cfg, reporter, held)


def _run(cfg: RunConfig, reporter: Reporter | None, held: contextlib.ExitStack) -> dict[str, Any]:
    reporter = reporter or Reporter()
    started = time.perf_counter()
    cfg.resolve()
    check_out_outside_src(cfg.src, cfg.out)
    index = cfg.scan_sources()
    scan_s = time.perf_counter() - started
    if cfg.strict and index.rejected:
        first = index.rejected[0]["reason"]
        raise MixgenError(f"unusable index row {first} (--strict; {len(index.rejected)} in all); fix the index")
    if cfg.needs_maps and cfg.cam == "probe" and len(index.classes) < 2:
        raise MixgenError(f"SRC {cfg.src} has one class only; --cam probe needs 2+ (use --cam mean or imagenet)")
    from mixgen.pairing import one_class_warning

    if note := one_class_warning(cfg.src, index.classes, (item.label for item in index.items), cfg.pairing):
        index.warnings.append(note)
    from mixgen.manifest import shard_count

    num_output_shards = shard_count(cfg.pairs, cfg.shard_size)
    my_shards = [s for s in range(num_output_shards) if s % cfg.num_shards == cfg.shard_index]
    if cfg.dry_run:
        return {
            "dry_run": True,
            "sources": len(index),
            "classes": len(index.classes),
            "outputs": cfg.pairs,
            "shards": len(my_shards),
            "config": cfg.output_settings(),
            "warnings": index.warnings,
            "skipped": index.rejected,
        }

    refuse_if_taken(cfg.out, cfg.shard_index)  # before the slow start-up; claim() below decides
    import torch

    device = resolve_device(cfg.device)
    if cfg.codec == "cuda" and device.type != "cuda":
        raise MixgenError("--codec cuda needs CUDA, which is not available here; use --codec cpu")
    began = time.perf_counter()
    backbone_cache = load_backbone_cache(cfg, index, device)
    load_s = time.perf_counter() - began
    if backbone_cache.get("runtime", {}).get("note"):
        reporter.info(backbone_cache["runtime"]["note"])
    identity = backbone_cache.get("identity", {})
    extra = {"sources": index.digest, "backbone": identity, "device_type": device.type, "version": __version__}
    fingerprint = cfg.fingerprint(extra)
    check_out_is_ours(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    door = held.enter_context(Door(cfg.out))  # until the first record is out: see mixgen.lock
    held.callback(claim(cfg.out, fingerprint, cfg.shard_index, cfg.num_shards).release)
    held.callback(door.close)  # before the release, which passes the door again
    previous = prepare_out(cfg, fingerprint, index, extra)
    from mixgen.rundiff import load_source_table, save_source_table

    if previous is None or load_source_table(cfg.out) is None:  # what a later refusal compares with
        (cfg.out / CACHE_DIR).mkdir(exist_ok=True)
        save_source_table(cfg.out, index)
    record: dict[str, Any] = {
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
        "backbone": identity or None,
        "device_type": device.type,
        "runtime": backbone_cache.get("runtime"),
        "resumed": previous is not None,
    }
    record["progress"] = {"shards_done": 0, "shards": len(my_shards), "outputs_done": 0}
    remove_stale_temps(cfg.out, cfg.out / CACHE_DIR)
    if cfg.num_shards == 1:
        remove_worker_records(cfg.out)
    _publish(cfg, record)
    door.close()
    torch.manual_seed(cfg.seed)
    with sigterm_as_interrupt():
        try:
            with ThreadPoolExecutor(cfg.workers) as pool:
                pool.submit(_warm_up_pyarrow)
                prepared = prepare_sources(cfg, index, device, pool, reporter, backbone_cache)
                record["skipped"] = index.rejected + [
                    {"path": s["path"], "reason": s["reason"]} for s in prepared.skipped
                ]
                record["cache_rebuilt"] = prepared.notes
                if cfg.strict and record["skipped"]:  # also when the views came from an earlier run's cache
                    first = record["skipped"][0]
                    raise MixgenError(
                        f"unreadable image {first['reason']} (--strict; "
                        f"{len(record['skipped'])} unreadable in all); fix or remove it"
                    )
                summary = _mix_all(cfg, index, prepared, device, pool, reporter, my_shards, record)
        except BaseException as exc:
            # The pool has finished every queued write by now: drop the unfinished shard (no
            # manifest means it was never complete) and this process's temps, then record why.
            error = fault_error(exc, cfg.out) if isinstance(exc, OSError) else exc
            record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            record["error"] = str(error) or type(exc).__name__
            with contextlib.suppress(OSError):
                _discard_unfinished(cfg, my_shards)
                remove_stale_temps(cfg.out, cfg.out / CACHE_DIR, include_own=True)
            with contextlib.suppress(OSError):
                _publish(cfg, record)
            if error is not exc:
                raise error from None
            raise
    timings = {"scan_s": scan_s, "load_s": load_s, **prepared.timings, **summary.pop("timings")}
    timings["total_s"] = time.perf_counter() - started
    record.update(
        status="complete",
        probe=prepared.probe or None,
        counts=summary["counts"],
        timings={k: round(v, 3) for k, v in timings.items()},
        environment=summary["environment"],
    )
    record.pop("error", None)
    _publish(cfg, record)
    return {**record, "throughput": summary["counts"]["written"] / max(timings["total_s"], 1e-9)}


def mix_batch_size(cfg: RunConfig) -> int:
    """Outputs mixed together, in batches aligned to each shard's start. Fixed, not --batch-size:
    every output's floats then come from the same batch shapes (``mixgen verify --recompute``
    redoes whole batches for that reason)."""
    return 64 if cfg.size <= 256 else 32


def plan_outputs(cfg: RunConfig, pairing, start: int, stop: int) -> list:
    """The plan of outputs [start, stop): pairing.plan_range with the method's draw and options
    (the one place both the run and ``verify --recompute`` take them from)."""
    from mixgen.pairing import plan_range

    return plan_range(start, stop, cfg.seed, pairing, cfg.declaration.draw, cfg.size, cfg.options)


def _mix_all(
    cfg: RunConfig,
    index: SourceIndex,
    prepared: Prepared,
    device,
    pool: ThreadPoolExecutor,
    reporter: Reporter,
    my_shards: list[int],
    record: dict[str, Any],
) -> dict[str, Any]:
    from mixgen.manifest import SCHEMA_VERSION, schema, shard_span
    from mixgen.pairing import Pairing

    positions = np.flatnonzero(prepared.readable)
    if len(positions) < 2:
        raise MixgenError(f"SRC {cfg.src}: fewer than 2 readable images; nothing to mix")
    labels = np.array([index.items[p].label for p in positions])
    pairing = Pairing(labels, cfg.pairing)
    began = time.perf_counter()
    ctx = MixContext(cfg, index, positions, prepared, device)
    inputs_s = time.perf_counter() - began  # the method's per-source inputs (grids, saliency peaks)
    run_metadata = {
        "schema_version": SCHEMA_VERSION,
        "mixgen_version": __version__,
        "config": cfg.output_settings(),
        "classes": index.classes,
        "backbone": record["backbone"],
        "cam": cfg.cam,
        "seed": cfg.seed,
        "source_digest": index.digest,
        "label_weights": cfg.label_weights,
        "same_label_weights": "sum" if cfg.label_weights == "semantic" else None,
        "environment": environment(device.type),
    }
    table_schema = schema(run_metadata, index.classes)
    batch_size = mix_batch_size(cfg)
    writer = make_writer(cfg.writer, cfg.out, cfg.format)
    todo = []
    kept = 0
    for shard in my_shards:
        span = shard_span(shard, cfg.pairs, cfg.shard_size)
        if writer.is_complete(shard, span):
            kept += len(span)
        else:
            todo.append((shard, span))
    if kept:
        reporter.info(f"resuming: {kept} outputs in complete shards kept")
    written = 0
    stage_started = time.perf_counter()
    seconds = dict.fromkeys(("plan_s", "mix_s", "encode_s", "write_s", "wait_s", "manifest_s"), 0.0)
    mix_on_pool = mixes_on_pool(device)

    def collect(future: Future) -> None:
        batch_rows, spent = future.result()
        for key, value in spent.items():
            seconds[key] += value
        rows.extend(batch_rows)
        advance(len(batch_rows))

    with reporter.stage("mix + encode", sum(len(s) for _, s in todo)) as advance, torch_threads(MIX_THREADS):
        for shards_done, (shard, span) in enumerate(todo, start=len(my_shards) - len(todo) + 1):
            shard_out = writer.open(shard, span, table_schema)
            rows: list[dict[str, Any]] = []
            futures: deque[Future] = deque()
            for start in range(span.start, span.stop, batch_size):
                began = time.perf_counter()
                planned = plan_outputs(cfg, pairing, start, min(start + batch_size, span.stop))
                seconds["plan_s"] += time.perf_counter() - began
                mixed = None if mix_on_pool else _mix(ctx, planned)
                futures.append(pool.submit(_finish_batch, ctx, planned, shard_out, mixed))
                began = time.perf_counter()
                while len(futures) > cfg.workers:  # every worker busy, one batch queued
                    collect(futures.popleft())
                seconds["wait_s"] += time.perf_counter() - began
            began = time.perf_counter()
            while futures:
                collect(futures.popleft())
            seconds["wait_s"] += time.perf_counter() - began
            began = time.perf_counter()
            shard_out.commit(rows)
            seconds["manifest_s"] += time.perf_counter() - began
            written += len(rows)
            record["progress"] = {
                "shards_done": shards_done,
                "shards": len(my_shards),
                "outputs_done": kept + written,
            }
            _publish(cfg, record)
    return {
        "counts": {
            "outputs": cfg.pairs,
            "written": written,
            "kept_from_previous_run": kept,
            "sources": len(index),
            "readable_sources": int(len(positions)),
            "skipped_sources": len(prepared.skipped) + len(index.rejected),
            "shards": len(my_shards),
        },
        "timings": {**seconds, "inputs_s": inputs_s, "mix_stage_s": time.perf_counter() - stage_started},
        "environment": run_metadata["environment"],
    }
