"""GridMix (after Baek, Bang, Shim, Pattern Recognition 2021): the view split into a G×G grid,
each cell independently taken from the donor at the same place with probability λ ~ Beta(β, β);
label weights are the shares of cells."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mixgen.methods import UNUSED_MAPS_PREVIEW, Method, MixResult, Option, beta_option, cells_area, paste_cells, torch


def draw(rng: np.random.Generator, size: int, options: Mapping[str, Any]) -> dict:
    beta, grid = options["beta"], options["grid"]
    lam = float(rng.beta(beta, beta))
    cells = np.flatnonzero(rng.random(grid * grid) < lam)
    return {"lam": lam, "cells": [int(c) for c in cells]}


def mix(canvas: Any, donor: Any, cells: list[list[int]], grid: int) -> MixResult:
    """Copy the listed cells from the donor; weight_b = cells / G², weight_a = 1 − weight_b."""
    size = canvas.shape[-1]
    width = max(1, max(len(c) for c in cells))
    padded = torch.tensor([c + [-1] * (width - len(c)) for c in cells], dtype=torch.int64, device=canvas.device)
    share = torch.tensor([len(c) / grid**2 for c in cells], dtype=torch.float32, device=canvas.device)
    return MixResult(
        images=paste_cells(canvas, donor, cells, grid),
        weight_a=1 - share,
        weight_b=share,
        area_ratio=cells_area(padded, grid, size),
        cells=padded,
        grid=grid,
    )


def _validate(options: Mapping[str, Any], size: int) -> str | None:
    if size < options["grid"]:
        return f"--size {size} is too small for --grid {options['grid']}: use a size >= {options['grid']}"
    return None


METHOD = Method(
    name="gridmix",
    help="GridMix: each cell of a G×G grid comes from the donor with probability λ; weights = share of cells "
    "(Baek et al. 2021).",
    paper="Baek, Bang, Shim: GridMix: Strong regularization through local context mapping, Pattern Recognition 2021",
    draw=draw,
    mix=lambda batch: mix(batch.canvas, batch.donor, [p["cells"] for p in batch.params], batch.options["grid"]),
    options=(
        Option("grid", int, 4, "Grid side G (G×G cells).", minimum=1, maximum=64),
        beta_option(1.0, "β of the Beta(β, β) draw of λ, each cell's probability of coming from the donor."),
    ),
    validate=_validate,
    preview=UNUSED_MAPS_PREVIEW,
)
