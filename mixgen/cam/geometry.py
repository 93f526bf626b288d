"""Box geometry on tensors that both the mixing methods and the CAM code need (kept here so that
``mixgen.cam.cams`` and ``mixgen.methods`` do not import each other)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def box_axis_masks(boxes: torch.Tensor, size: int, dtype: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) row and column indicators of each box: box b covers rows[b]ᵀ · cols[b], so sums
    over boxes are matrix products and no (B, S, S) mask is built."""
    import torch

    coords = torch.arange(size, device=boxes.device)
    rows = ((coords >= boxes[:, 1:2]) & (coords < boxes[:, 3:4])).to(dtype)
    cols = ((coords >= boxes[:, 0:1]) & (coords < boxes[:, 2:3])).to(dtype)
    return rows, cols
