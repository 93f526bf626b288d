"""ResizeMix (Qin et al. 2020, arXiv:2012.11101): the whole donor view, shrunk to τS × τS with
τ ~ U(0.1, 0.8), pasted at a uniformly random position fully inside the canvas; the donor's label
weight is the pasted area share, so every donor object arrives whole."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import UNUSED_MAPS_PREVIEW, F, Method, MixResult, Option, box_areas, torch


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    """τ ~ U(scale_min, scale_max), side int(τS), top-left corner uniform over the positions that
    keep the paste inside the canvas."""
    tau = float(rng.uniform(options["scale_min"], options["scale_max"]))
    side = int(tau * size)
    x0, y0 = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
    return {"lam": tau, "box_a": (x0, y0, x0 + side, y0 + side)}


def paste_whole(canvas: Any, donor: Any, box_a: Any) -> Any:
    """A clone of the canvas with each donor view resized (bilinear, antialiased: a downscale)
    into its box_a."""
    images = canvas.clone()
    for i, (x0, y0, x1, y1) in enumerate(box_a.tolist()):
        if x1 <= x0 or y1 <= y0:
            continue
        small = F.interpolate(
            donor[i : i + 1].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False, antialias=True
        )
        images[i, :, y0:y1, x0:x1] = small[0].round_().clamp_(0, 255).to(torch.uint8)
    return images


def mix(canvas: Any, donor: Any, box_a: Any) -> MixResult:
    """weight_b = pasted area / S², weight_a = 1 − weight_b (the paper's rule)."""
    size = canvas.shape[-1]
    area = box_areas(box_a).float() / float(size * size)
    mixed = area > 0
    whole = torch.tensor([0, 0, size, size], device=box_a.device).expand_as(box_a)
    return MixResult(
        images=paste_whole(canvas, donor, box_a),
        weight_a=1 - area,
        weight_b=area,
        area_ratio=area,
        box_a=box_a,
        box_b=whole,
        has_box=mixed,
        mixed=mixed,
    )


def _validate(options: Mapping[str, Any], size: int) -> str | None:
    if options["scale_min"] > options["scale_max"]:
        return f"--scale-min {options['scale_min']} must not exceed --scale-max {options['scale_max']}"
    return None


METHOD = Method(
    name="resizemix",
    help="ResizeMix: paste the whole donor, shrunk to τS × τS, inside the canvas; weights = pasted area "
    "(Qin et al. 2020).",
    paper="Qin, Fang, Zhao, Wei, Wang: ResizeMix: Mixing Data with Preserved Object Information and True Labels, "
    "arXiv:2012.11101",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, batch.param("box_a")),
    options=(
        Option(
            "scale_min", float, 0.1, "Smallest scale τ of the pasted donor (side int(τS)).", minimum=0.0, maximum=1.0
        ),
        Option("scale_max", float, 0.8, "Largest scale τ of the pasted donor.", minimum=0.0, maximum=1.0),
    ),
    validate=_validate,
    preview=UNUSED_MAPS_PREVIEW,
)
