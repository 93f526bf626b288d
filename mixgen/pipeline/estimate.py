"""A dry run's rough estimate of the disk and time a run takes. Where OUT holds an earlier run of
the same settings, its own recorded mixing rate is used; otherwise the rates of the 50,000-output
SnapMix run on the 2-core CPU in benchmarks/README.md (at 448 px: decoding about 400 sources/s,
the backbone about 50 sources/s, mixing, encoding and writing about 500 outputs/s), scaled by
pixels and cores. A teacher run (--label-weights teacher) adds one backbone pass per output at the
CAM size, on the mixed image. A GPU is several times faster and real photos decode at their own
speed: the figures are orders of magnitude, not promises."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mixgen.methods import TEACHER

if TYPE_CHECKING:
    from mixgen.config import RunConfig
    from mixgen.sources.index import SourceIndex

# Bytes per pixel of a photo's 448 px view as each format stores it at quality 95 (the mean of 20
# photos of birds: JPEG 0.36, WebP 0.29, PNG 1.43).
BYTES_PER_PIXEL = {"jpg": 0.36, "webp": 0.29, "png": 1.43}
MANIFEST_ROW_BYTES = 200
REFERENCE_SIDE, REFERENCE_CORES = 448, 2
DECODE_PER_S, BACKBONE_PER_S, MIX_PER_S = 400.0, 50.0, 500.0  # at the reference side and cores
STARTUP_S = 5.0  # importing torch, loading the backbone (benchmarks/README.md: 1.3 s and more)


def estimate(
    cfg: RunConfig, index: SourceIndex, to_write: int, previous: dict[str, Any] | None, prepare: bool
) -> dict[str, Any]:
    """Bytes and seconds of writing ``to_write`` outputs (and preparing every source when
    ``prepare``), with where the rates come from."""
    side, cores = cfg.size, max(1, os.cpu_count() or 1) / REFERENCE_CORES
    output_bytes = side * side * BYTES_PER_PIXEL.get(cfg.format, 1.0) * (0.5 + cfg.quality / 190)
    disk = to_write * (output_bytes + MANIFEST_ROW_BYTES)
    # The view cache: one S×S RGB view per source found (a listed photo that is missing has none).
    cache = len(index) * side * side * 3 if prepare else 0
    disk += cache
    mix_rate = MIX_PER_S * (REFERENCE_SIDE / side) ** 2 * cores
    basis = "2-core CPU rates of benchmarks/README.md, scaled"
    counts, timings = (previous or {}).get("counts") or {}, (previous or {}).get("timings") or {}
    if counts.get("written") and timings.get("mix_stage_s"):
        mix_rate, basis = counts["written"] / timings["mix_stage_s"], "the earlier run's own rate"
    seconds = to_write / max(mix_rate, 1e-9) + (STARTUP_S if to_write or prepare else 0.0)
    if prepare:
        seconds += len(index) / (DECODE_PER_S * cores)
    backbone_rate = BACKBONE_PER_S * (REFERENCE_SIDE / (cfg.cam_size or side)) ** 2 * cores
    if prepare and cfg.needs_maps:
        seconds += len(index) / backbone_rate
    found = {"disk_bytes": int(disk), "cache_bytes": int(cache), "seconds": round(seconds, 1), "basis": basis}
    if cfg.label_weights == TEACHER:
        # One more backbone pass per output, at the CAM size, on the mixed image. An earlier run's
        # own mixing rate already includes it; its own teacher rate says what part.
        teacher_rate, teacher_basis = backbone_rate, "2-core CPU backbone rate of benchmarks/README.md, scaled"
        if counts.get("written") and timings.get("teacher_s"):
            teacher_rate, teacher_basis = counts["written"] / timings["teacher_s"], "the earlier run's own rate"
        teacher_s = to_write / max(teacher_rate, 1e-9)
        if basis != "the earlier run's own rate":
            found["seconds"] = round(seconds + teacher_s, 1)
        found["teacher"] = {
            "backbone_passes": to_write,
            "cam_size": cfg.cam_size,
            "seconds": round(teacher_s, 1),
            "basis": teacher_basis,
        }
    return found
