"""FMix: a low-frequency Fourier mask, and the run-length form the manifest keeps it in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgen.methods import (
    fmix,
    get_method,
    mask_from_runs,
    mask_runs,
)
from tests.methods.helpers import S, planned_batch


@pytest.mark.parametrize("lam", [0.0, 0.013, 0.5, 0.9999, 1.0])
def test_fmix_mask_keeps_exactly_floor_lambda_canvas_pixels(lam):
    grey = fmix.low_frequency_image(S, 3.0, noise_seed=11)
    mask = fmix.donor_mask(grey, lam)
    keep = int(np.floor(lam * S * S))
    assert (~mask).sum() == keep
    if 0 < keep < S * S:
        assert grey[~mask].min() >= grey[mask].max()  # the brightest pixels keep the canvas


def test_fmix_masks_are_low_frequency():
    grey = fmix.low_frequency_image(64, 3.0, noise_seed=3)
    power = np.abs(np.fft.fft2(grey)) ** 2
    freqs = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.fftfreq(64)[None] ** 2)
    assert power[(freqs > 0) & (freqs < 0.1)].mean() > 100 * power[freqs > 0.3].mean()


def test_fmix_mix_takes_masked_pixels_from_the_donor_and_weighs_pixel_shares():
    batch = planned_batch("fmix")
    result = get_method("fmix").mix(batch)
    mask = result.mask
    expected = torch.where(mask[:, None], batch.donor, batch.canvas)
    assert torch.equal(result.images, expected)
    torch.testing.assert_close(result.weight_b, mask.flatten(1).float().mean(1))
    torch.testing.assert_close(result.weight_a + result.weight_b, torch.ones(len(mask)))
    for params, row in zip(batch.params, mask, strict=True):
        assert int((~row).sum()) == int(np.floor(params["lam"] * S * S))


def test_mask_runs_round_trip_and_start_with_a_canvas_run():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.ones((4, 4), bool), np.zeros((3, 5), bool)):
        runs = mask_runs(mask)
        assert sum(runs) == mask.size
        assert np.array_equal(mask_from_runs(runs, *mask.shape), mask)
    assert mask_runs(np.array([[True, False]]))[0] == 0
    with pytest.raises(ValueError):
        mask_from_runs([3, 2], 2, 2)
