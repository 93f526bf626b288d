"""Attentive CutMix (Walawalkar et al., ICASSP 2020): paste the donor's k most attended grid cells
onto the canvas at the same positions; the donor's label weight is the pasted share k/G²."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import (
    Method,
    MixResult,
    Option,
    Preview,
    SourceData,
    SourceInput,
    cell_edges,
    cells_area,
    paste_cells,
    torch,
)

__all__ = ["cell_edges", "top_cells", "mix", "METHOD"]


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    """Nothing beyond the donor is random."""
    return {}


def top_cells(grid: Any, k: int) -> Any:
    """(B, G, G) attention -> (B, k) row-major cell ids of the k largest, ties to the lower id."""
    order = torch.sort(grid.flatten(1), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def mix(canvas: Any, donor: Any, attention_b: Any, k: int) -> MixResult:
    """Copy the donor's top-k cells into a clone of the canvas."""
    batch, _, size, _ = canvas.shape
    grid = attention_b.shape[-1]
    cells = top_cells(attention_b, k)
    images = paste_cells(canvas, donor, cells.tolist(), grid)
    share = torch.full((batch,), k / grid**2, dtype=torch.float32, device=canvas.device)
    return MixResult(
        images=images,
        weight_a=1 - share,
        weight_b=share,
        area_ratio=cells_area(cells, grid, size),
        cells=cells,
        grid=grid,
    )


def attention_grids(sources: SourceData, options: Mapping[str, Any]) -> np.ndarray:
    """Each source's map average-pooled to G×G, once per source (not per pair)."""
    from mixgen.cam.cams import attention_grid

    return attention_grid(torch.from_numpy(sources.maps), options["grid"]).numpy()


def _validate(options: Mapping[str, Any], size: int) -> str | None:
    grid, top_k = options["grid"], options["top_k"]
    if not 1 <= top_k <= grid**2:
        return f"--top-k must be in 1..{grid**2} (grid {grid}x{grid}), got {top_k}"
    if size < grid:
        return f"--size {size} is too small for --grid {grid}: use a size >= {grid}"
    return None


METHOD = Method(
    name="attentive",
    help="Attentive CutMix: paste the donor's top-k attended grid cells in place (Walawalkar et al. 2020).",
    paper="Walawalkar, Shen, Liu, Savvides: Attentive CutMix, ICASSP 2020",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, batch.inputs_b["grid"], batch.options["top_k"]),
    options=(
        Option("top_k", int, 6, "Number of donor grid cells pasted (1..G²)."),
        Option("grid", int, 7, "Attention grid side G (G×G cells).", minimum=1),
    ),
    maps=lambda options: True,
    inputs={"grid": SourceInput(attention_grids, uses_maps=lambda options: True)},
    default_cam="mean",
    validate=_validate,
    preview=Preview(titles=("attention a", "attention b, top-k"), heat="grid"),
)
