"""MixUp: a pixel blend with weights λ and 1 − λ."""

from __future__ import annotations

import torch

from mixgen.methods import (
    mixup,
)
from tests.methods.helpers import images


def test_mixup_blends_pixels():
    a, b = images(1)
    result = mixup.mix(a, b, torch.tensor([0.25]))
    expected = (0.25 * a.float() + 0.75 * b.float()).round().to(torch.uint8)
    assert torch.equal(result.images, expected)
    torch.testing.assert_close(result.weight_a, torch.tensor([0.25]))
