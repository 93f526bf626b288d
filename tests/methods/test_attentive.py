"""Attentive CutMix: the donor's top-k attended grid cells pasted in place."""

from __future__ import annotations

import torch

from mixgen.cam.cams import attention_grid
from mixgen.methods import (
    attentive,
)
from tests.methods.helpers import S, images


def test_attentive_pastes_exactly_the_top_k_donor_cells_in_place():
    a, b = images(1)
    grid = torch.zeros(1, 4, 4)
    top = [1, 6, 11, 15]
    grid.view(-1)[top] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    result = attentive.mix(a, b, grid, k=3)
    assert result.cells.tolist() == [[1, 6, 11]]
    torch.testing.assert_close(result.weight_b, torch.tensor([3 / 16]))
    torch.testing.assert_close(result.weight_a, torch.tensor([13 / 16]))
    cell = S // 4
    for index in range(16):
        r, c = divmod(index, 4)
        region = (slice(None), slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
        source = b if index in (1, 6, 11) else a
        assert torch.equal(result.images[0][region], source[0][region]), index


def test_attention_grid_is_average_pooled_map():
    maps = torch.arange(16.0).view(1, 4, 4)
    grid = attention_grid(maps, 2)
    torch.testing.assert_close(grid, torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))


def test_attentive_cells_cover_uneven_sizes():
    a, b = images(1)
    result = attentive.mix(a[:, :, :30, :30].contiguous(), b[:, :, :30, :30].contiguous(), torch.rand(1, 7, 7), k=49)
    assert torch.equal(result.images, b[:, :, :30, :30])
    assert float(result.area_ratio[0]) == 1.0
