"""Attentive CutMix (Walawalkar et al., ICASSP 2020): paste the donor's k most attended grid cells
onto the canvas at the same positions; the donor's label weight is the pasted share k/G²."""

from __future__ import annotations

import numpy as np
import torch

from mixgen.methods import MixResult

NEEDS_MAPS = True


def draw(rng: np.random.Generator, size: int) -> dict:
    """Nothing beyond the donor is random."""
    return {}


def top_cells(grid: torch.Tensor, k: int) -> torch.Tensor:
    """(B, G, G) attention -> (B, k) row-major cell ids of the k largest, ties to the lower id."""
    order = torch.sort(grid.flatten(1), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def cell_masks(cells: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(B, k) cells -> (B, S, S) pixel masks; cell r spans rows [⌊rS/G⌋, ⌊(r+1)S/G⌋)."""
    pixel_cell = torch.arange(size, device=cells.device) * grid // size
    chosen = torch.zeros(cells.shape[0], grid * grid, dtype=torch.bool, device=cells.device)
    chosen.scatter_(1, cells, True)
    return chosen.view(-1, grid, grid).index_select(1, pixel_cell).index_select(2, pixel_cell)


def mix(canvas: torch.Tensor, donor: torch.Tensor, attention_b: torch.Tensor, k: int) -> MixResult:
    batch, _, size, _ = canvas.shape
    grid = attention_b.shape[-1]
    cells = top_cells(attention_b, k)
    mask = cell_masks(cells, grid, size)
    # The mask is laid out like the views (channels last) so the select runs in memory order.
    images = torch.where(mask[..., None].permute(0, 3, 1, 2), donor, canvas)
    share = torch.full((batch,), k / grid**2, dtype=torch.float32, device=canvas.device)
    return MixResult(
        images=images,
        weight_a=1 - share,
        weight_b=share,
        area_ratio=mask.sum(dim=(1, 2)).float() / size**2,
        cells=cells,
    )
