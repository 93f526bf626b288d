"""``mixgen cam``: each source's view with its CAM / SPM overlaid, plus the SPM as ``.npy``, so a user
can check that the maps sit on the object before mixing. The map code here (views → backbone →
head → CAM) is shared with ``mixgen preview``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from mixgen.config import DEFAULT_CAM_NORM, RunConfig
from mixgen.errors import DecodeError, MixgenError, UsageError
from mixgen.outdir import RECORD_NAME, check_out_outside_src, torch_threads
from mixgen.pipeline import BACKBONE_THREADS, PROBE_THREADS, Reporter, resolve_device
from mixgen.sources import SourceIndex
from mixgen.views import load_source_view

INDEX_NAME = "cams.json"
MAP_DOC = (
    "S×S float32 semantic percentage map of the view (S = --size): (CAM − min) / Σ(CAM − min) with the "
    "CAM (as --cam-norm leaves it) bilinearly upsampled (align_corners=False) to S×S first, so it sums to 1; "
    "uniform (1/S²) where "
    "the CAM is constant, which is exactly SnapMix's area-weight fallback. Row-major, [y, x]."
)

# Anchors of a perceptually ordered blue → cyan → yellow → red map (close to matplotlib's turbo).
_ANCHORS = np.array(
    [[48, 18, 59], [65, 105, 225], [30, 190, 220], [70, 245, 120], [200, 240, 50], [250, 150, 30], [122, 4, 3]],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) map of any scale -> (H, W, 3) uint8 colours, min to max stretched over the colormap."""
    heat = np.asarray(heat, dtype=np.float64)
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    return _LUT[np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)]


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The view blended with the colorized map; the map is resized to the view first."""
    height, width = view.shape[:2]
    colors = colorize(heat)
    if colors.shape[:2] != (height, width):
        colors = np.asarray(Image.fromarray(colors).resize((width, height), Image.Resampling.BILINEAR))
    blended = (1 - alpha) * view.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def spm_maps(cams: np.ndarray, size: int) -> np.ndarray:
    """(B, h, w) CAMs -> (B, S, S) float32 SPMs summing to 1 (uniform where a CAM is constant)."""
    import torch

    from mixgen.cams import spm

    maps, valid = spm(torch.from_numpy(np.array(cams, dtype=np.float32)), size)
    maps = maps.numpy()
    maps[~valid.numpy()] = 1.0 / (size * size)
    return maps.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Maps for any subset of sources


@dataclass
class MapSettings:
    """What determines a source's map: the view and the backbone/head that looks at it."""

    size: int
    resize: str = "crop"
    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    checkpoint: Path | None = None
    cam: str = "mean"
    cam_size: int | None = None
    cam_norm: str = DEFAULT_CAM_NORM
    device: str = "auto"
    runtime: str = "auto"
    batch_size: int = 32
    workers: int = 0


@dataclass
class MapSource:
    """One source's view, low-resolution CAM (h, w) and the class whose CAM it is (None for mean)."""

    position: int
    view: np.ndarray
    cam: np.ndarray
    cam_class: int | None


@dataclass
class MapMaker:
    """Loads the backbone once and yields the maps of requested sources; for ``probe`` it first fits
    the linear head on the pooled features of *all* readable sources, as the pipeline does."""

    index: SourceIndex
    settings: MapSettings
    reporter: Reporter = field(default_factory=Reporter)
    skipped: list[dict[str, str]] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        from mixgen.backbones import fast_inference_copy, load_backbone
        from mixgen.cams import fixed_head

        s = self.settings
        self.torch = torch
        self.cam_size = s.cam_size or s.size
        self.device = resolve_device(s.device)
        # The same inference copy, call sizes and threads as a run: the maps are the ones it mixes with.
        loaded = load_backbone(s.backbone, s.weights, s.checkpoint, len(self.index.classes))
        self.backbone = fast_inference_copy(loaded).to(self.device)
        from mixgen.onnx_runtime import cam_pass_backbone

        self.backbone, self.runtime = cam_pass_backbone(
            self.backbone, s.runtime, self.device, self.cam_size, BACKBONE_THREADS
        )
        if self.runtime.note:
            self.reporter.info(self.runtime.note)
        self.labels = np.array([item.label for item in self.index.items], dtype=np.int64)
        self.pool = ThreadPoolExecutor(s.workers if s.workers > 0 else (os.cpu_count() or 1))
        self._failed: set[int] = set()
        try:
            self.head = fixed_head(self.backbone, s.cam)
            if s.cam == "probe":
                self._fit_probe()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.pool.shutdown()

    def _views(self, positions: list[int], stage: str) -> Iterator[tuple[list[int], np.ndarray]]:
        """Decoded views in batches of readable positions; unreadable ones are recorded once in ``skipped``."""
        s = self.settings

        def load(position: int) -> np.ndarray | str:
            try:
                return load_source_view(self.index, self.index.items[position], s.size, s.resize)
            except DecodeError as exc:
                return str(exc)

        with self.reporter.stage(stage, len(positions)) as advance:
            for start in range(0, len(positions), s.batch_size):
                chunk = positions[start : start + s.batch_size]
                ok, views = [], []
                for position, result in zip(chunk, self.pool.map(load, chunk), strict=True):
                    if isinstance(result, str):
                        if position not in self._failed:
                            self._failed.add(position)
                            self.skipped.append({"path": self.index.items[position].path, "reason": result})
                    else:
                        ok.append(position)
                        views.append(result)
                advance(len(chunk))
                if ok:
                    yield ok, np.stack(views)

    def _features(self, views: np.ndarray):
        from mixgen.cams import invariant_feature_maps

        batch = self.torch.from_numpy(views).to(self.device)
        try:
            with torch_threads(BACKBONE_THREADS):
                return invariant_feature_maps(self.backbone, batch, self.cam_size)
        except ValueError as exc:
            raise MixgenError(f"{exc}; choose a CNN backbone such as resnet50") from None

    def _fit_probe(self) -> None:
        from mixgen.probe import fit_probe

        torch = self.torch
        if len(self.index.classes) < 2:
            raise MixgenError("--cam probe needs images of at least 2 classes in SRC; use --cam mean or imagenet")
        started = time.perf_counter()
        pooled, positions = [], []
        for ok, views in self._views(list(range(len(self.index))), "probe: backbone on every source"):
            pooled.append(self._features(views).mean(dim=(2, 3)).cpu())
            positions.extend(ok)
        if not positions:
            raise MixgenError("no source image could be read; nothing to fit the probe on")
        labels = torch.from_numpy(self.labels[positions])
        if len(torch.unique(labels)) < 2:
            raise MixgenError("--cam probe needs readable images of at least 2 classes; use --cam mean or imagenet")
        with torch_threads(PROBE_THREADS):  # as the pipeline does, so the fit is the run's
            result = fit_probe(torch.cat(pooled).to(self.device), labels.to(self.device), int(self.labels.max()) + 1)
        self.head = result.head
        self.probe = {
            **result.accuracies(),
            "sources": len(positions),
            "seconds": round(time.perf_counter() - started, 3),
        }

    def maps(self, positions: list[int], stage: str = "maps") -> Iterator[MapSource]:
        """View and CAM of each readable source among ``positions``, in order."""
        from mixgen.cams import maps_for

        torch = self.torch
        for ok, views in self._views(positions, stage):
            fmap = self._features(views)
            labels = torch.from_numpy(self.labels[ok]).to(self.device)
            pixels = torch.from_numpy(views).to(self.device)
            norm = self.settings.cam_norm
            cams = maps_for(fmap, self.settings.cam, self.head, labels, norm=norm, views=pixels).cpu().numpy()
            if self.settings.cam == "imagenet":
                classes = self.head.logits(fmap.mean(dim=(2, 3))).argmax(dim=1).tolist()
            elif self.settings.cam == "mean":
                classes = [None] * len(ok)
            else:
                classes = labels.tolist()
            for j, position in enumerate(ok):
                yield MapSource(position, views[j], cams[j], classes[j])


# ---------------------------------------------------------------------------------------------
# mixgen cam


def write_cams(cfg: RunConfig, limit: int | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Write ``OUT/<source path>.png`` (view with its SPM overlaid) and ``OUT/<source path>.npy``
    (the SPM, see ``MAP_DOC``) for the first ``limit`` sources (all when None), plus ``OUT/cams.json``.
    ``cfg`` is a snapmix RunConfig, so view, backbone and CAM options get the same defaults and
    checks as a snapmix run."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    cfg.resolve()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    out = cfg.out
    if (out / RECORD_NAME).is_file() or (out / "data").is_dir():
        raise UsageError(f"OUT {out} holds a mixgen run; write the CAM images to another folder")
    if out.exists() and not out.is_dir():
        raise MixgenError(f"OUT {out} is a file; choose a folder")
    check_out_outside_src(cfg.src, out)  # its PNGs would be scanned as sources next time
    index = cfg.scan_sources()
    settings = MapSettings(
        size=cfg.size,
        resize=cfg.resize,
        backbone=cfg.backbone,
        weights=cfg.weights,
        checkpoint=cfg.checkpoint,
        cam=cfg.cam,
        cam_size=cfg.cam_size,
        cam_norm=cfg.cam_norm,
        device=cfg.device,
        runtime=cfg.runtime,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
    )
    maker = MapMaker(index, settings, reporter)
    wanted = list(range(len(index) if limit is None else min(limit, len(index))))
    items = []
    try:
        for source in maker.maps(wanted, "cams"):
            item = index.items[source.position]
            spm = spm_maps(source.cam[None], cfg.size)[0]
            # The source's own suffix stays in the name, so a.jpg and a.png never collide.
            # Inside OUT even for an index file's absolute or ../ paths.
            name = "/".join(part for part in PurePosixPath(item.path).parts if part not in ("/", "..", "."))
            png, npy = out / f"{name}.png", out / f"{name}.npy"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(overlay(source.view, spm)).save(png, compress_level=3)
            np.save(npy, spm)
            peak = np.unravel_index(int(np.argmax(spm)), spm.shape)
            items.append(
                {
                    "source": item.path,
                    "label": item.label,
                    "class": index.classes[item.label],
                    "cam_class": source.cam_class,
                    "overlay": f"{name}.png",
                    "map": f"{name}.npy",
                    "peak_yx": [int(peak[0]), int(peak[1])],
                }
            )
    finally:
        maker.close()
    summary = {
        "src": str(cfg.src),
        "out": str(out),
        "sources": len(index),
        "written": len(items),
        "skipped": index.rejected + maker.skipped,  # index rows refused, then unreadable images
        "settings": {
            "size": cfg.size,
            "resize": cfg.resize,
            "backbone": maker.backbone.name,
            "weights_digest": maker.backbone.weights_digest,
            "cam": cfg.cam,
            "cam_norm": cfg.cam_norm,
            "cam_size": cfg.cam_size,
            "runtime": maker.runtime.name,
        },
        "runtime_note": maker.runtime.note,
        "probe": maker.probe or None,
        "classes": index.classes,
        "map_format": MAP_DOC,
        "items": items,
        "seconds": round(time.perf_counter() - started, 3),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).write_text(json.dumps(summary, indent=2))
    return summary
