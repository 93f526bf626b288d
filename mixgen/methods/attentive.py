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


def cell_edges(grid: int, size: int) -> list[int]:
    """Pixel boundaries of the grid: cell r spans rows [⌊rS/G⌋, ⌊(r+1)S/G⌋)."""
    return [g * size // grid for g in range(grid + 1)]


def mix(canvas: torch.Tensor, donor: torch.Tensor, attention_b: torch.Tensor, k: int) -> MixResult:
    """Copy the donor's top-k cells into a clone of the canvas: k slice copies per output move
    only the pasted pixels (a full-image masked select costs several times more on a CPU)."""
    batch, _, size, _ = canvas.shape
    grid = attention_b.shape[-1]
    cells = top_cells(attention_b, k)
    edges = cell_edges(grid, size)
    images = canvas.clone()
    for i, chosen in enumerate(cells.tolist()):
        for cell in chosen:
            row, col = divmod(cell, grid)
            rows, cols = slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])
            images[i, :, rows, cols] = donor[i, :, rows, cols]
    sides = torch.tensor(edges, device=canvas.device).diff()
    cell_area = (sides[:, None] * sides[None, :]).flatten()
    share = torch.full((batch,), k / grid**2, dtype=torch.float32, device=canvas.device)
    return MixResult(
        images=images,
        weight_a=1 - share,
        weight_b=share,
        area_ratio=cell_area[cells].sum(dim=1).float() / size**2,
        cells=cells,
    )
