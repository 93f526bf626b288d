"""ResizeMix: the whole donor shrunk into a square inside the canvas."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixgen.methods import (
    get_method,
    resizemix,
)
from mixgen.methods.labels import mix_with_label_weights
from tests.methods.helpers import S, images, planned_batch


def test_resizemix_draw_is_a_scaled_square_fully_inside():
    for i in range(200):
        params = resizemix.draw(np.random.default_rng(i), 100, {"scale_min": 0.1, "scale_max": 0.8})
        tau, (x0, y0, x1, y1) = params["lam"], params["box_a"]
        assert 0.1 <= tau <= 0.8
        assert x1 - x0 == y1 - y0 == int(tau * 100)
        assert x0 >= 0 and x1 <= 100 and y0 >= 0 and y1 <= 100


def test_resizemix_pastes_the_whole_donor_resized_and_weighs_its_area():
    a, b = images(2)
    box = torch.tensor([[3, 5, 19, 21], [10, 0, 30, 20]])
    result = resizemix.mix(a, b, box)
    for i, (x0, y0, x1, y1) in enumerate(box.tolist()):
        expected = F.interpolate(b[i : i + 1].float(), size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True)
        assert torch.equal(result.images[i, :, y0:y1, x0:x1], expected[0].round().clamp(0, 255).to(torch.uint8))
        outside = torch.ones(S, S, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(result.images[i][:, outside], a[i][:, outside])
    share = torch.tensor([16 * 16, 20 * 20]) / S**2
    torch.testing.assert_close(result.weight_b, share.float())
    torch.testing.assert_close(result.weight_a, 1 - share.float())
    assert result.box_b.tolist() == [[0, 0, S, S]] * 2


def test_resizemix_semantic_donor_weight_is_one():
    batch = planned_batch("resizemix")
    result = mix_with_label_weights(get_method("resizemix"), batch, "semantic")
    mixed = result.area_ratio > 0
    torch.testing.assert_close(result.weight_b[mixed], torch.ones(int(mixed.sum())))
