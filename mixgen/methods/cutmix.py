"""CutMix baseline (Yun et al., 2019): one box at the same coordinates in canvas and donor, label
weights equal to the pasted area after clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import UNUSED_MAPS_PREVIEW, Method, MixResult, beta_option, box_areas, random_box


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    beta = options["beta"]
    lam = float(rng.beta(beta, beta))
    return {"lam": lam, "box_a": random_box(rng, size, lam)}


def paste_box(canvas: Any, donor: Any, box: Any) -> Any:
    """A clone of the canvas with each row's box copied in place from the donor."""
    images = canvas.clone()
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        images[i, :, y0:y1, x0:x1] = donor[i, :, y0:y1, x0:x1]
    return images


def mix(canvas: Any, donor: Any, box: Any) -> MixResult:
    size = canvas.shape[-1]
    share = box_areas(box).float() / float(size * size)
    return MixResult(
        images=paste_box(canvas, donor, box),
        weight_a=(1 - share).float(),
        weight_b=share.float(),
        area_ratio=share.float(),
        box_a=box,
        box_b=box,
        has_box=share > 0,
    )


METHOD = Method(
    name="cutmix",
    help="CutMix baseline: one box at the same place in both images; weights = pasted area (Yun et al. 2019).",
    paper="Yun, Han, Oh, Chun, Choe, Yoo: CutMix, ICCV 2019",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, batch.param("box_a")),
    options=(beta_option(1.0),),
    preview=UNUSED_MAPS_PREVIEW,
)
