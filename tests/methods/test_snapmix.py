"""SnapMix: boxes of two independent sizes, the donor box resized into the canvas box, weights
from the CAM's semantic mass in each box (and the CAM maths it rests on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixgen.cam.cams import spm
from mixgen.methods import (
    cutmix,
    snapmix,
)
from tests.methods.helpers import S, images, uniform_spm


def snap(a, b, spm_a, spm_b, box_a, box_b, same=None):
    batch = a.shape[0]
    valid_a = spm_a[1] if isinstance(spm_a, tuple) else torch.ones(batch, dtype=torch.bool)
    valid_b = spm_b[1] if isinstance(spm_b, tuple) else torch.ones(batch, dtype=torch.bool)
    spm_a = spm_a[0] if isinstance(spm_a, tuple) else spm_a
    spm_b = spm_b[0] if isinstance(spm_b, tuple) else spm_b
    same = torch.zeros(batch, dtype=torch.bool) if same is None else same
    box_a, box_b = torch.tensor(box_a), torch.tensor(box_b)
    mass_a, mass_b = snapmix.spm_mass(spm_a, valid_a, box_a), snapmix.spm_mass(spm_b, valid_b, box_b)
    return snapmix.mix(a, b, mass_a, mass_b, box_a, box_b, same)


def test_uniform_spm_with_equal_boxes_gives_cutmix_area_weights():
    a, b = images()
    boxes = [[4, 6, 20, 14], [0, 0, 10, 30]]
    result = snap(a, b, uniform_spm(2), uniform_spm(2), boxes, boxes)
    area = torch.tensor([16 * 8, 10 * 30]) / S**2
    reference = cutmix.mix(a, b, torch.tensor(boxes))
    torch.testing.assert_close(result.weight_b, area.float())
    torch.testing.assert_close(result.weight_a, 1 - area.float())
    torch.testing.assert_close(result.weight_b, reference.weight_b)
    # Equal boxes paste the same pixels as CutMix does.
    assert torch.equal(result.images, reference.images)


def test_whole_image_boxes_give_zero_one():
    a, b = images()
    spm_a, _ = spm(torch.rand(2, 4, 4), S)
    spm_b, _ = spm(torch.rand(2, 4, 4), S)
    whole = [[0, 0, S, S]] * 2
    result = snap(a, b, spm_a, spm_b, whole, whole)
    torch.testing.assert_close(result.weight_a, torch.zeros(2))
    torch.testing.assert_close(result.weight_b, torch.ones(2))
    assert torch.equal(result.images, b)


def test_zero_area_box_gives_one_zero_and_unchanged_canvas():
    a, b = images()
    result = snap(a, b, uniform_spm(2), uniform_spm(2), [[5, 5, 5, 20], [0, 0, 10, 10]], [[0, 0, 8, 8], [3, 3, 3, 3]])
    torch.testing.assert_close(result.weight_a, torch.ones(2))
    torch.testing.assert_close(result.weight_b, torch.zeros(2))
    assert torch.equal(result.images, a)
    assert not result.has_box.any()
    assert torch.all(result.area_ratio == 0)


def test_same_label_pairs_get_the_sum_on_both():
    a, b = images()
    spm_a, _ = spm(torch.rand(2, 4, 4), S)
    spm_b, _ = spm(torch.rand(2, 4, 4), S)
    box_a, box_b = [[2, 3, 18, 22]] * 2, [[10, 1, 30, 15]] * 2
    different = snap(a, b, spm_a, spm_b, box_a, box_b)
    same = snap(a, b, spm_a, spm_b, box_a, box_b, same=torch.tensor([True, False]))
    total = different.weight_a[0] + different.weight_b[0]
    torch.testing.assert_close(same.weight_a[0], total)
    torch.testing.assert_close(same.weight_b[0], total)
    torch.testing.assert_close(same.weight_a[1], different.weight_a[1])
    torch.testing.assert_close(same.weight_b[1], different.weight_b[1])


def test_weights_are_spm_mass_in_boxes():
    a, b = images(1)
    cam_a, cam_b = torch.rand(1, 7, 7), torch.rand(1, 7, 7)
    spm_a, valid_a = spm(cam_a, S)
    spm_b, valid_b = spm(cam_b, S)
    result = snap(a, b, (spm_a, valid_a), (spm_b, valid_b), [[3, 4, 20, 25]], [[0, 10, 12, 30]])
    torch.testing.assert_close(result.weight_a[0], 1 - spm_a[0, 4:25, 3:20].sum())
    torch.testing.assert_close(result.weight_b[0], spm_b[0, 10:30, 0:12].sum())


def test_constant_cam_falls_back_to_area_weights():
    a, b = images()
    spm_const, valid = spm(torch.full((2, 7, 7), 3.0), S)
    assert not valid.any()
    box_a, box_b = [[0, 0, 16, 16]] * 2, [[8, 8, 24, 30]] * 2
    result = snap(a, b, (spm_const, valid), (spm_const, valid), box_a, box_b)
    torch.testing.assert_close(result.weight_a, torch.full((2,), 1 - 256 / S**2))
    torch.testing.assert_close(result.weight_b, torch.full((2,), 256 / S**2))
    # Only the constant side falls back; the other keeps its semantic weight.
    spm_ok, valid_ok = spm(torch.rand(2, 7, 7), S)
    mixed = snap(a, b, (spm_ok, valid_ok), (spm_const, valid), box_a, box_b)
    torch.testing.assert_close(mixed.weight_a, 1 - spm_ok[:, 0:16, 0:16].sum(dim=(1, 2)))
    torch.testing.assert_close(mixed.weight_b, torch.full((2,), 256 / S**2))


def test_pixels_outside_box_a_are_the_canvas_and_inside_the_resized_donor_box():
    a, b = images(1, seed=3)
    box_a, box_b = [[5, 2, 25, 12]], [[0, 10, 31, 31]]
    result = snap(a, b, uniform_spm(1), uniform_spm(1), box_a, box_b)
    outside = torch.ones(S, S, dtype=torch.bool)
    outside[2:12, 5:25] = False
    assert torch.equal(result.images[0][:, outside], a[0][:, outside])
    crop = b[:, :, 10:31, 0:31].float()
    expected = F.interpolate(crop, size=(10, 20), mode="bilinear", align_corners=True).round().to(torch.uint8)
    assert torch.equal(result.images[0, :, 2:12, 5:25], expected[0])


def test_snapmix_ratios_need_not_sum_to_one():
    a, b = images(1)
    cam = torch.zeros(1, 8, 8)
    cam[0, 0, 0] = 1.0
    spm_peaked, valid = spm(cam, S)
    result = snap(a, b, (spm_peaked, valid), (spm_peaked, valid), [[16, 16, 32, 32]], [[0, 0, 16, 16]])
    assert abs(float(result.weight_a[0] + result.weight_b[0]) - 1.0) > 0.3


def test_spm_is_min_subtracted_and_sums_to_one():
    maps = torch.randn(3, 5, 5)
    out, valid = spm(maps, 40)
    assert out.shape == (3, 40, 40) and valid.all()
    torch.testing.assert_close(out.sum(dim=(1, 2)), torch.ones(3))
    assert torch.all(out.amin(dim=(1, 2)) == 0)


def test_snapmix_draw_is_two_independent_boxes():
    rng = np.random.default_rng(7)
    params = snapmix.draw(rng, 64, {"beta": 5.0})
    assert set(params) == {"lam", "box_a", "box_b"}
    assert 0 < params["lam"] < 1


@pytest.mark.parametrize(("low", "size"), [(7, 224), (14, 448), (4, 32), (3, 100)])
def test_separable_box_mass_equals_the_dense_spm_sum(low, size):
    from mixgen.cam.cams import spm_box_mass

    g = torch.Generator().manual_seed(low)
    cams = torch.randn(12, low, low, generator=g) * 3 + 1
    starts = torch.randint(0, size, (12, 2), generator=g)
    ends = (starts + torch.randint(0, size, (12, 2), generator=g)).clamp(max=size)
    boxes = torch.cat([starts, ends], dim=1)
    dense, valid = spm(cams, size)
    torch.testing.assert_close(
        spm_box_mass(cams, boxes, size), snapmix.spm_mass(dense, valid, boxes), atol=2e-6, rtol=1e-5
    )
    constant = spm_box_mass(torch.full((2, low, low), 3.0), boxes[:2], size)
    assert torch.isnan(constant).all()
