"""MixUp baseline (Zhang et al., 2018): a pixel blend λ·a + (1−λ)·b with label weights λ, 1−λ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import UNUSED_MAPS_PREVIEW, Method, MixResult, beta_option, torch


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    beta = options["beta"]
    return {"lam": float(rng.beta(beta, beta))}


def mix(canvas: Any, donor: Any, lam: Any) -> MixResult:
    lam = lam.float()
    blend = lam[:, None, None, None] * canvas.float() + (1 - lam)[:, None, None, None] * donor.float()
    return MixResult(
        images=blend.round().clamp(0, 255).to(torch.uint8),
        weight_a=lam,
        weight_b=1 - lam,
        area_ratio=1 - lam,
        blend=True,
    )


METHOD = Method(
    name="mixup",
    help="MixUp baseline: pixel blend with λ ~ Beta(β, β); weights λ and 1−λ (Zhang et al. 2018).",
    paper="Zhang, Cisse, Dauphin, Lopez-Paz: mixup, ICLR 2018",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, batch.param("lam")),
    options=(beta_option(1.0),),
    semantic_uses_maps=False,
    preview=UNUSED_MAPS_PREVIEW,
)
