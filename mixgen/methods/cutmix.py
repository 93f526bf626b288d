"""CutMix baseline (Yun et al., 2019): one box at the same coordinates in canvas and donor, label
weights equal to the pasted area after clipping."""

from __future__ import annotations

import numpy as np
import torch

from mixgen.methods import MixResult, box_areas, random_box

NEEDS_MAPS = False


def draw(rng: np.random.Generator, size: int, beta: float) -> dict:
    lam = float(rng.beta(beta, beta))
    return {"lam": lam, "box_a": random_box(rng, size, lam)}


def mix(canvas: torch.Tensor, donor: torch.Tensor, box: torch.Tensor) -> MixResult:
    size = canvas.shape[-1]
    share = box_areas(box).float() / float(size * size)
    images = canvas.clone()
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        images[i, :, y0:y1, x0:x1] = donor[i, :, y0:y1, x0:x1]
    has_box = share > 0
    return MixResult(
        images=images,
        weight_a=(1 - share).float(),
        weight_b=share.float(),
        area_ratio=share.float(),
        box_a=box,
        box_b=box,
        has_box=has_box,
    )
