"""What the method tests share: random views, a uniform SPM, a planned batch of any method and the
donor's pixels of a result, all at side ``S``."""

from __future__ import annotations

import numpy as np
import torch

from mixgen.methods import Batch, cell_edges, get_method

S = 32


def images(batch: int = 2, seed: int = 0, size: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    return a, b


def uniform_spm(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((batch, S, S), 1.0 / S**2), torch.ones(batch, dtype=torch.bool)


def planned_batch(name: str, seed: int = 0, batch: int = 6, maps=None, same=None, **options) -> Batch:
    """A batch of ``batch`` outputs of method ``name`` with its draws, on random views."""
    method = get_method(name)
    opts = {**method.defaults(), **options}
    params = [method.draw(np.random.default_rng([seed, i]), S, opts) for i in range(batch)]
    a, b = images(batch, seed)
    maps_a, maps_b = maps if maps is not None else (torch.rand(batch, 4, 4), torch.rand(batch, 4, 4))
    inputs = {}
    if name == "saliencymix":
        inputs = {"peak": torch.tensor([[5, 20]] * batch)}
    return Batch(
        canvas=a,
        donor=b,
        params=params,
        options=opts,
        same_label=torch.zeros(batch, dtype=torch.bool) if same is None else same,
        maps_a=maps_a,
        maps_b=maps_b,
        inputs_a=inputs,
        inputs_b=inputs,
    )


def donor_pixels(result) -> torch.Tensor:
    """(B, S, S) bool: pixels of each output whose region comes from the donor, from its geometry."""
    batch = result.images.shape[0]
    if result.mask is not None:
        return result.mask.clone()
    out = torch.zeros(batch, S, S, dtype=torch.bool)
    if result.cells is not None:
        edges = cell_edges(result.grid, S)
        for i, row in enumerate(result.cells.tolist()):
            for cell in (c for c in row if c >= 0):
                r, c = divmod(cell, result.grid)
                out[i, edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = True
        return out
    for i, (x0, y0, x1, y1) in enumerate(result.box_a.tolist()):
        out[i, y0:y1, x0:x1] = True
    return out
