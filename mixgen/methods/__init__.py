"""Mixing methods. Each module holds pure, batched, device-agnostic tensor functions:

- ``draw(rng, size, options) -> dict`` draws one output's random parameters from that output's
  own generator (so output i never depends on the batch it lands in);
- ``mix(canvas, donor, ...) -> MixResult`` mixes a batch of views (B, 3, S, S) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass
class MixResult:
    """One batch of mixed outputs. Rows where ``has_box`` is False have no box (null in the manifest)."""

    images: torch.Tensor  # (B, 3, S, S) uint8
    weight_a: torch.Tensor  # (B,) float32
    weight_b: torch.Tensor  # (B,) float32
    area_ratio: torch.Tensor  # (B,) float32: fraction of output pixels taken from the donor
    box_a: torch.Tensor | None = None  # (B, 4) int64 x0, y0, x1, y1 (half-open)
    box_b: torch.Tensor | None = None
    has_box: torch.Tensor | None = None  # (B,) bool
    cells: torch.Tensor | None = None  # (B, k) int64 row-major grid cells


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_axis_masks(boxes: torch.Tensor, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) row and column indicators of each box: box b covers rows[b]ᵀ · cols[b], so sums
    over boxes are matrix products and no (B, S, S) mask is built."""
    coords = torch.arange(size, device=boxes.device)
    rows = ((coords >= boxes[:, 1:2]) & (coords < boxes[:, 3:4])).to(dtype)
    cols = ((coords >= boxes[:, 0:1]) & (coords < boxes[:, 2:3])).to(dtype)
    return rows, cols


def random_box(rng, size: int, lam: float) -> tuple[int, int, int, int]:
    """Side int(S·sqrt(1−λ)), centre uniform over the pixels, clipped to the image."""
    side = int(size * (1.0 - lam) ** 0.5)
    cx, cy = int(rng.integers(size)), int(rng.integers(size))
    x0, y0 = cx - side // 2, cy - side // 2
    clip = lambda v: min(max(v, 0), size)  # noqa: E731
    return clip(x0), clip(y0), clip(x0 + side), clip(y0 + side)


def get_method(name: str) -> ModuleType:
    from mixgen.methods import attentive, cutmix, mixup, snapmix

    return {"snapmix": snapmix, "attentive": attentive, "cutmix": cutmix, "mixup": mixup}[name]
