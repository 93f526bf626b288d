"""``mixgen cam``: each source's view with its CAM / SPM overlaid, plus the SPM as ``.npy``, so a user
can check that the maps sit on the object before mixing. The maps come from the run's own CAM
pass (``mixgen.pipeline.campass``)."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from mixgen.cam.heatmaps import overlay, spm_maps
from mixgen.config import RunConfig
from mixgen.errors import MixgenError, UsageError
from mixgen.files import read_json
from mixgen.layout import CAMS_INDEX, DATA_DIR, RECORD_NAME, cam_names
from mixgen.output.checks import check_out_outside_src
from mixgen.pipeline.campass import MapMaker
from mixgen.progress import Reporter

MAP_DOC = (
    "S×S float32 semantic percentage map of the view (S = --size): (CAM − min) / Σ(CAM − min) with the "
    "CAM (as --cam-norm leaves it) bilinearly upsampled (align_corners=False) to S×S first, so it sums to 1; "
    "uniform (1/S²) where "
    "the CAM is constant, which is exactly SnapMix's area-weight fallback. Row-major, [y, x]."
)

# ---------------------------------------------------------------------------------------------
# mixgen cam


def overlay_names(paths: list[str]) -> list[str]:
    """Each source's name under OUT (``<name>.png``, ``<name>.npy``), one per source: its path with
    the source's own suffix kept (a.jpg and a.png never collide), inside OUT even for an index
    file's absolute or ../ paths. Where sources would share a name (``a/x.jpg`` and ``../a/x.jpg``,
    a path listed twice, names that differ only in case, which one folder holds once on macOS and
    Windows), each of them gets ``~<its position in the index>`` added, so no overlay replaces another."""
    names = ["/".join(part for part in PurePosixPath(path).parts if part not in ("/", "..", ".")) for path in paths]
    while True:
        claims = Counter(name.casefold() for name in names)
        if len(claims) == len(names):
            return names
        names = [name if claims[name.casefold()] == 1 else f"{name}~{i}" for i, name in enumerate(names)]


def spread_over_classes(labels: list[int], limit: int | None) -> list[int]:
    """Positions of ``limit`` sources taken in turn from each class (in SRC's order within one), so
    a few maps show every class rather than the first class's files; all when None."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    turns = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    return sorted([position for turn in turns for position in turn if position is not None][:limit])


def _clear_earlier_cams(out: Path) -> None:
    """OUT may be new, empty, or hold an earlier ``mixgen cam`` output, whose files (those its
    cams.json lists) are removed so that the folder holds this run's only. Any other non-empty
    folder is refused: the images written would replace files that are not mixgen's."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    listed = read_json(out / CAMS_INDEX)
    if not isinstance(listed, dict) or not isinstance(listed.get("items"), list):
        raise MixgenError(
            f"OUT {out} is not empty and holds no CAM images of mixgen (no {CAMS_INDEX}); choose an empty or new folder"
        )
    for item in listed["items"]:
        if not isinstance(item, dict):
            continue
        for key in ("overlay", "map"):
            name = PurePosixPath(str(item.get(key) or ""))
            if name.parts and not name.is_absolute() and ".." not in name.parts:  # only inside OUT
                (out / name).unlink(missing_ok=True)
    (out / CAMS_INDEX).unlink()


def write_cams(cfg: RunConfig, limit: int | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Write ``OUT/<source path>.png`` (view with its SPM overlaid) and ``OUT/<source path>.npy``
    (the SPM, see ``MAP_DOC``) for ``limit`` sources spread over the classes (all when None), plus
    ``OUT/cams.json``.
    ``cfg`` is a snapmix RunConfig, so view, backbone and CAM options get the same defaults and
    checks as a snapmix run."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    cfg.resolve()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    out = cfg.out
    if (out / RECORD_NAME).is_file() or (out / DATA_DIR).is_dir():
        raise MixgenError(f"OUT {out} holds a mixgen run; write the CAM images to another folder")
    if out.exists() and not out.is_dir():
        raise MixgenError(f"OUT {out} is a file; choose a folder")
    check_out_outside_src(cfg.src, out)  # its PNGs would be scanned as sources next time
    _clear_earlier_cams(out)
    index = cfg.scan_sources()
    maker = MapMaker(index, cfg, reporter)
    wanted = spread_over_classes([item.label for item in index.items], limit)
    names = overlay_names([item.path for item in index.items])
    items = []
    try:
        for source in maker.maps(wanted, "cams"):
            item = index.items[source.position]
            spm = spm_maps(source.cam[None], cfg.size)[0]
            name = names[source.position]
            png_name, npy_name = cam_names(name)
            png, npy = out / png_name, out / npy_name
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
                    "overlay": png_name,
                    "map": npy_name,
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
            "library": maker.backbone.library or None,
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
    (out / CAMS_INDEX).write_text(json.dumps(summary, indent=2))
    return summary
