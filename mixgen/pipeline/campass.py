"""The one CAM pass: the backbone on its device (PyTorch or ONNX Runtime), the linear head the
CAMs come from (fixed, or the probe fitted on the sources' pooled features) and the maps of a
batch of views. The run (``mixgen.pipeline.prepare``), ``mixgen cam``, ``preview`` and ``verify
--recompute`` all make their maps here, with the same calls, threads and head, so a map is the
same whichever command made it.

``MapExtractor`` is the run's pass over every source (maps or, for ``probe``, features kept until
the fit); ``MapMaker`` gives the views and maps of any subset of sources (``cam``, ``preview``)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixgen.device import BACKBONE_THREADS, PROBE_THREADS, resolve_device, torch_threads
from mixgen.errors import DecodeError, MixgenError
from mixgen.files import allocate, temp_path
from mixgen.layout import backbone_lock
from mixgen.output.cache import RecordFile
from mixgen.output.lock import held
from mixgen.progress import Reporter
from mixgen.sources.index import SourceIndex

if TYPE_CHECKING:
    from mixgen.config import RunConfig


def check_probe_classes(classes: int, src: Any, readable: bool = False) -> None:
    """--cam probe fits a classifier: it needs sources of two classes at least (the one check)."""
    if classes < 2:
        what = "readable images of one class only" if readable else "one class only"
        raise MixgenError(f"SRC {src} has {what}; --cam probe needs 2+ (use --cam mean or imagenet)")


class CamPass:
    """The backbone's inference copy on ``device`` with the runtime chosen for it, and the head of
    ``cfg.cam`` (None until fitted for probe, always None for mean)."""

    def __init__(self, cfg: RunConfig, num_classes: int, device) -> None:
        import torch

        from mixgen.cam.backbones import fast_inference_copy, load_backbone
        from mixgen.cam.cams import fixed_head
        from mixgen.cam.onnx_runtime import cam_pass_backbone

        self.torch, self.device = torch, device
        self.cam, self.cam_norm, self.src = cfg.cam, cfg.cam_norm, cfg.src
        self.listed_classes = num_classes  # the index's classes, with or without a readable source
        self.cam_size = cfg.cam_size or cfg.size
        loaded = load_backbone(cfg.backbone, cfg.weights, cfg.checkpoint, num_classes)
        backbone = fast_inference_copy(loaded).to(device)
        self.backbone, self.runtime = cam_pass_backbone(backbone, cfg.runtime, device, self.cam_size, BACKBONE_THREADS)
        self.head = fixed_head(self.backbone, self.cam)
        self.teacher_seconds = 0.0  # --label-weights teacher: the seconds its passes took

    @property
    def identity(self) -> dict[str, Any]:
        """What the maps depend on besides the views; the runtime rounds differently, so its maps
        (and the weights written) are its own."""
        identity = {"name": self.backbone.name, "weights": self.backbone.weights_digest, "runtime": self.runtime.name}
        return {**identity, "library": self.backbone.library} if self.backbone.library else identity

    def features(self, views) -> Any:
        """(B, S, S, 3) uint8 views (array or tensor on the device) -> (B, C, h, w) feature maps."""
        from mixgen.cam.cams import invariant_feature_maps

        batch = self.torch.from_numpy(views).to(self.device) if isinstance(views, np.ndarray) else views
        try:
            with torch_threads(BACKBONE_THREADS):
                return invariant_feature_maps(self.backbone, batch, self.cam_size)
        except ValueError as exc:
            raise MixgenError(f"{exc}; choose a CNN backbone such as resnet50") from None

    def posterior(self, images) -> Any:
        """(B, 3, S, S) uint8 images on the device -> (B, K) float32 softmax posterior of the head
        over the run's classes: the teacher's look at each mixed image (--label-weights teacher).
        The images go through ``features`` as the views do (NHWC, resized to the CAM size, fixed-size
        backbone calls), and each row is pooled and classified alone, with the backbone's thread
        count: every row's floats are the same whichever rows share its batch (a rerun, a resume
        from mid-shard and ``verify --recompute`` give the same bytes)."""
        torch = self.torch
        if self.head is None:
            raise MixgenError("the teacher has no head: the probe was not fitted or loaded; re-run the same command")
        started = time.perf_counter()
        fmap = self.features(images.permute(0, 2, 3, 1).contiguous())
        with torch_threads(BACKBONE_THREADS), torch.inference_mode():
            rows = [
                torch.softmax(self.head.logits(fmap[i : i + 1].mean(dim=(2, 3))).float(), dim=1)
                for i in range(len(fmap))
            ]
        posterior = torch.cat(rows) if rows else fmap.new_zeros((0, len(self.head.bias)))
        self.teacher_seconds += time.perf_counter() - started
        return posterior

    def fit_probe(self, pooled, labels, num_classes: int) -> dict[str, Any]:
        """Fit the probe head on pooled features of the readable sources (``num_classes``: one past
        the largest class id of all sources, readable or not); returns its record."""
        from mixgen.cam.probe import fit_probe

        torch = self.torch
        check_probe_classes(len(torch.unique(labels)), self.src, readable=True)
        started = time.perf_counter()
        with torch_threads(PROBE_THREADS):
            result = fit_probe(pooled.to(self.device), labels.to(self.device), num_classes)
        self.head = result.head
        empty = max(0, self.listed_classes - result.classes)  # said beside the held-out accuracy
        return {**result.accuracies(), "classes_empty": empty, "seconds": round(time.perf_counter() - started, 3)}

    def maps(self, fmap, labels, views) -> Any:
        """(B, h, w) maps of a batch: its labels' CAMs (probe, checkpoint), the predicted class's
        (imagenet) or the channel mean (mean), normalised by --cam-norm (colour reads ``views``)."""
        from mixgen.cam.cams import maps_for

        return maps_for(fmap, self.cam, self.head, labels.to(self.device), norm=self.cam_norm, views=views)


def load_campass(cfg: RunConfig, index: SourceIndex, device) -> CamPass | None:
    """The CAM pass of a run that needs maps (None otherwise)."""
    return CamPass(cfg, len(index.classes), device) if cfg.needs_maps else None


def campass_record(campass: CamPass | None) -> dict[str, Any]:
    """What the record and fingerprint say of the CAM pass (empty when no maps are needed)."""
    if campass is None:
        return {}
    return {"identity": campass.identity, "runtime": campass.runtime.as_record()}


def teacher_identity(cfg: RunConfig, campass: CamPass | None) -> dict[str, Any] | None:
    """What a teacher run's fingerprint says of its teacher before the probe is fitted (None for
    other label rules): the backbone, the side it sees the mixed images at, and the head: the probe
    (fitted on the sources: the same sources, backbone and CAM settings give the same head) or the
    digest of the checkpoint's own classifier."""
    from mixgen.methods import TEACHER

    if cfg.label_weights != TEACHER or campass is None:
        return None
    head = "probe fitted on the sources" if cfg.cam == "probe" else campass.head.digest()
    return {"backbone": campass.identity, "cam_size": campass.cam_size, "head": head}


def teacher_record(cfg: RunConfig, campass: CamPass | None) -> dict[str, Any] | None:
    """What the run record and the manifests say the teacher was, once its head is there: its
    identity, the head's SHA-256 and the classes it scores (None for other label rules)."""
    identity = teacher_identity(cfg, campass)
    if identity is None:
        return None
    if campass.head is None:
        raise MixgenError("the teacher's head was neither fitted nor loaded from the cache; re-run the same command")
    return {**identity, "head_sha256": campass.head.digest(), "classes": int(campass.head.bias.shape[0])}


def changed_head(recorded: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """The head digest a run recorded (``teacher`` of its record or manifests) when the teacher's
    head now (``teacher_record``) is another: the rows it weighed and the rows weighed now differ."""
    before = (recorded or {}).get("head_sha256")
    return before if before is not None and before != now["head_sha256"] else None


def use_cached_head(campass: CamPass | None, head: Any) -> None:
    """Give the CAM pass the probe's head the source stage kept (fitted here, by another worker or
    rank, or by an earlier run): every worker's teacher then scores with the same floats."""
    if campass is not None and head is not None:
        campass.head = type(head)(head.weight.to(campass.device), head.bias.to(campass.device))


class MapExtractor:
    """The run's pass, slice by slice (see ``mixgen.pipeline.prepare``). For ``probe`` each slice's feature
    maps are kept (fp16, in the slice's own record file under OUT/.mixgen) until the probe is
    fitted on the pooled features of every slice; other modes reduce each batch to its map at once."""

    def __init__(self, cfg: RunConfig, index: SourceIndex, campass: CamPass) -> None:
        import torch

        from mixgen.cam.cams import micro_batch

        self.torch, self.cfg, self.campass, self.device = torch, cfg, campass, campass.device
        # Sources per add(): --batch-size rounded up to whole backbone calls, so that only the
        # last call is padded (on CUDA a call is 64 images, more than the default --batch-size).
        self.call = call = micro_batch(self.device, cfg.cam_size, campass.backbone)
        self.step = -(-cfg.batch_size // call) * call
        self.labels = torch.tensor([s.label for s in index.items], dtype=torch.long)
        self.n = len(index)
        self.seconds = 0.0
        self.turn_wait = 0.0  # waiting for the other workers' backbone calls on this machine
        self.sources = 0  # sources this process ran the backbone over
        self.maps: np.ndarray | None = None  # (n, h, w); --cam-norm colour makes its grid finer than F's
        self.pooled: np.ndarray | None = None  # (n, C) float32, probe only
        self.span = range(0)
        self.features_path: Path | None = None
        self.features: RecordFile | None = None  # the current slice's feature maps (probe)
        self.turn_lock: Path | None = None  # where this machine's workers take turns (default: the cache folder)

    def _store(self, name: str, positions, rows: np.ndarray) -> None:
        if getattr(self, name) is None:
            setattr(self, name, np.zeros((self.n, *rows.shape[1:]), dtype=np.float32))
        getattr(self, name)[positions] = rows

    def _machine_turn(self):
        """On a CPU the backbone already runs on every core (BACKBONE_THREADS): workers of a job
        on one machine take turns at it, one call at a time, instead of oversubscribing the cores
        (one worker decodes while another's backbone runs). Each GPU is its own."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        return held(self.turn_lock or backbone_lock(self.cfg.cache, socket.gethostname()))

    def start_slice(self, span: range, features_path: Path) -> None:
        """The next ``add`` calls are sources of ``span``; probe features go to ``features_path``."""
        self.span, self.features_path, self.features = span, features_path, None

    def add(self, positions: list[int], views: RecordFile) -> None:
        started = time.perf_counter()
        batch = self.torch.from_numpy(views.read(positions)).to(self.device)
        asked = time.perf_counter()
        with self._machine_turn():
            waited = time.perf_counter() - asked
            fmap = self.campass.features(batch)
        self.turn_wait += waited
        if self.cfg.cam == "probe":
            if self.features is None:
                _, channels, h, w = fmap.shape
                temp = temp_path(self.features_path)  # per process, renamed into place by end_slice
                allocate(temp, len(self.span) * channels * h * w * 2)
                self.features = RecordFile(temp, len(self.span), (channels, h, w), np.float16)
            self._store("pooled", positions, fmap.mean(dim=(2, 3)).cpu().numpy())
            for position, record in zip(positions, fmap.half().cpu().numpy(), strict=True):
                self.features.write(position - self.span.start, record)
        else:
            self._store("maps", positions, self.campass.maps(fmap, self.labels[positions], batch).cpu().numpy())
        self.sources += len(positions)
        self.seconds += time.perf_counter() - started - waited

    def end_slice(self) -> tuple[np.ndarray | None, list[int] | None]:
        """Seal the slice's feature file into place; returns the slice's rows to keep (pooled
        features for probe, else maps; None when no source of it was readable) and the shape of
        one source's feature maps in its file (None when there is no file)."""
        shape = None
        if self.features is not None:
            shape = list(self.features.shape)
            os.replace(self.features.path, self.features_path)
            self.features.seal(self.features_path)
            self.features.close()
            self.features = None
        rows = self.pooled if self.cfg.cam == "probe" else self.maps
        return (None if rows is None else rows[self.span.start : self.span.stop]), shape

    def load_slice(self, span: range, rows: np.ndarray) -> None:
        """Take the rows another worker (or an earlier run) kept for ``span``."""
        self._store("pooled" if self.cfg.cam == "probe" else "maps", slice(span.start, span.stop), rows)

    def load_maps(self, span: range, rows: np.ndarray) -> None:
        """Take the maps another rank made for ``span``."""
        self._store("maps", slice(span.start, span.stop), rows)

    def finish(
        self, readable: np.ndarray, views: RecordFile, features: list[tuple[range, Path, list[int]]]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The maps of every source: as kept (fixed heads, mean), or for probe from each slice's
        ``features`` file once the probe is fitted on the pooled features of all slices."""
        if self.maps is None and self.pooled is None:
            raise MixgenError("no source image could be read; nothing to mix")
        if self.cfg.cam != "probe":
            return self.maps, {}
        started = time.perf_counter()
        probe = self.fit(readable)
        probe.pop("seconds")
        self.maps_from_features(readable, views, features)
        return self.maps, {"cam": "probe", **probe, "seconds": round(time.perf_counter() - started, 3)}

    def fit(self, readable: np.ndarray) -> dict[str, Any]:
        """Fit the probe on the pooled features of every readable source; returns its record."""
        keep = self.torch.from_numpy(np.flatnonzero(readable))
        pooled = self.torch.from_numpy(self.pooled)
        return self.campass.fit_probe(pooled[keep], self.labels[keep], int(self.labels.max()) + 1)

    def maps_from_features(
        self, readable: np.ndarray, views: RecordFile, features: list[tuple[range, Path, list[int]]]
    ) -> None:
        """The maps of the readable sources of each slice's ``features`` file, from the fitted head."""
        torch = self.torch
        for span, path, shape in features:
            kept = np.flatnonzero(readable[span.start : span.stop]) + span.start
            if not len(kept):
                continue
            records = RecordFile(path, len(span), tuple(shape), np.float16)
            if damage := records.damage():
                raise MixgenError(f"CAM features of sources {span.start}-{span.stop - 1} damaged ({damage}); re-run")
            for start in range(0, len(kept), self.cfg.batch_size):
                chunk = kept[start : start + self.cfg.batch_size]
                fmap = torch.from_numpy(records.read(chunk - span.start)).to(self.device)
                chunk_views = None
                if self.cfg.cam_norm == "colour":
                    chunk_views = torch.from_numpy(views.read(chunk)).to(self.device)
                maps = self.campass.maps(fmap.float(), self.labels[chunk], chunk_views)
                self._store("maps", chunk, maps.cpu().numpy())
            records.close()


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
    the linear head on the pooled features of *all* readable sources, as the run does. ``cfg``
    gives the view, backbone and CAM settings (a run's, recorded or given on the command line)."""

    index: SourceIndex
    cfg: RunConfig
    reporter: Reporter = field(default_factory=Reporter)
    skipped: list[dict[str, str]] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.cfg.device)
        self.campass = CamPass(self.cfg, len(self.index.classes), self.device)
        self.backbone, self.runtime = self.campass.backbone, self.campass.runtime
        if self.runtime.note:
            self.reporter.info(self.runtime.note)
        self.labels = np.array([item.label for item in self.index.items], dtype=np.int64)
        self.pool = ThreadPoolExecutor(self.cfg.workers if self.cfg.workers > 0 else (os.cpu_count() or 1))
        self._failed: set[int] = set()
        try:
            if self.cfg.cam == "probe":
                self._fit_probe()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.pool.shutdown()

    def _views(self, positions: list[int], stage: str) -> Iterator[tuple[list[int], np.ndarray]]:
        """Decoded views in batches of readable positions; unreadable ones are recorded once in ``skipped``."""
        from mixgen.sources.views import load_source_view

        cfg = self.cfg

        def load(position: int) -> np.ndarray | str:
            try:
                return load_source_view(self.index, self.index.items[position], cfg.size, cfg.resize)
            except DecodeError as exc:
                return str(exc)

        with self.reporter.stage(stage, len(positions)) as advance:
            for start in range(0, len(positions), cfg.batch_size):
                chunk = positions[start : start + cfg.batch_size]
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

    def _fit_probe(self) -> None:
        torch = self.torch = self.campass.torch
        check_probe_classes(len(self.index.classes), self.cfg.src)
        started = time.perf_counter()
        pooled, positions = [], []
        for ok, views in self._views(list(range(len(self.index))), "probe: backbone on every source"):
            pooled.append(self.campass.features(views).mean(dim=(2, 3)).cpu())
            positions.extend(ok)
        if not positions:
            raise MixgenError("no source image could be read; nothing to fit the probe on")
        labels = torch.from_numpy(self.labels[positions])
        probe = self.campass.fit_probe(torch.cat(pooled), labels, int(self.labels.max()) + 1)
        probe.pop("seconds")
        self.probe = {**probe, "sources": len(positions), "seconds": round(time.perf_counter() - started, 3)}

    def maps(self, positions: list[int], stage: str = "maps") -> Iterator[MapSource]:
        """View and CAM of each readable source among ``positions``, in order."""
        torch = self.campass.torch
        for ok, views in self._views(positions, stage):
            fmap = self.campass.features(views)
            labels = torch.from_numpy(self.labels[ok]).to(self.device)
            pixels = torch.from_numpy(views).to(self.device)
            cams = self.campass.maps(fmap, labels, pixels).cpu().numpy()
            if self.cfg.cam == "imagenet":
                classes = self.campass.head.logits(fmap.mean(dim=(2, 3))).argmax(dim=1).tolist()
            elif self.cfg.cam == "mean":
                classes = [None] * len(ok)
            else:
                classes = labels.tolist()
            for j, position in enumerate(ok):
                yield MapSource(position, views[j], cams[j], classes[j])
