"""CutMix: one box at the same place in both images, weighed by the pasted area."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgen.methods import (
    cutmix,
    random_box,
)
from tests.methods.helpers import S, images


def test_cutmix_weights_are_pasted_area_after_clipping():
    a, b = images(1)
    result = cutmix.mix(a, b, torch.tensor([[20, 25, 32, 32]]))
    torch.testing.assert_close(result.weight_b, torch.tensor([12 * 7 / S**2]))
    assert torch.equal(result.images[0, :, 25:, 20:], b[0, :, 25:, 20:])


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.999, 1.0])
def test_random_box_side_and_clipping(lam):
    rng = np.random.default_rng(1)
    for _ in range(50):
        x0, y0, x1, y1 = random_box(rng, 100, lam)
        side = int(100 * np.sqrt(1 - lam))
        assert 0 <= x0 <= x1 <= 100 and 0 <= y0 <= y1 <= 100
        assert x1 - x0 <= side and y1 - y0 <= side
