"""MixUp baseline (Zhang et al., 2018): a pixel blend λ·a + (1−λ)·b with label weights λ, 1−λ."""

from __future__ import annotations

import numpy as np
import torch

from mixgen.methods import MixResult

NEEDS_MAPS = False


def draw(rng: np.random.Generator, size: int, beta: float) -> dict:
    return {"lam": float(rng.beta(beta, beta))}


def mix(canvas: torch.Tensor, donor: torch.Tensor, lam: torch.Tensor) -> MixResult:
    lam = lam.float()
    blend = lam[:, None, None, None] * canvas.float() + (1 - lam)[:, None, None, None] * donor.float()
    return MixResult(
        images=blend.round().clamp(0, 255).to(torch.uint8),
        weight_a=lam,
        weight_b=1 - lam,
        area_ratio=1 - lam,
    )
