"""GridMix: each cell of a G×G grid from the donor with probability λ."""

from __future__ import annotations

import numpy as np
import torch

from mixgen.methods import (
    cell_edges,
    gridmix,
)
from tests.methods.helpers import S, donor_pixels, images


def test_gridmix_draw_takes_each_cell_with_probability_lambda():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    params = gridmix.draw(rng_a, S, {"grid": 4, "beta": 1.0})
    lam = rng_b.beta(1.0, 1.0)
    assert params["lam"] == lam
    assert params["cells"] == np.flatnonzero(rng_b.random(16) < lam).tolist()
    counts = [len(gridmix.draw(np.random.default_rng(i), S, {"grid": 4, "beta": 1.0})["cells"]) for i in range(300)]
    assert 0 in counts and 16 in counts  # λ ~ U(0, 1) reaches both ends


def test_gridmix_pastes_exactly_the_listed_cells():
    a, b = images(3)
    cells = [[0, 5, 15], [], list(range(9))]
    result = gridmix.mix(a, b, cells, 4)
    pasted = donor_pixels(result)
    for i, chosen in enumerate(cells):
        edges = cell_edges(4, S)
        expected = torch.zeros(S, S, dtype=torch.bool)
        for cell in chosen:
            r, c = divmod(cell, 4)
            expected[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = True
        assert torch.equal(pasted[i], expected)
        assert torch.equal(result.images[i][:, expected], b[i][:, expected])
        assert torch.equal(result.images[i][:, ~expected], a[i][:, ~expected])
    torch.testing.assert_close(result.weight_b, torch.tensor([3 / 16, 0.0, 9 / 16]))
