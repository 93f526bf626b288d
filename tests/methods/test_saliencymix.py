"""SaliencyMix: a CutMix box centred on the donor's saliency peak (spectral residual or CAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgen.methods import (
    SourceData,
    saliencymix,
)
from tests.conftest import SAMPLE
from tests.methods.helpers import S, donor_pixels, images


def test_saliency_peak_of_a_synthetic_map():
    maps = np.zeros((2, 40, 40), dtype=np.float32)
    maps[0, 7, 31] = 1.0
    maps[1] = np.exp(-((np.arange(40)[:, None] - 25) ** 2 + (np.arange(40)[None] - 12) ** 2) / 30.0)
    assert saliencymix.peaks(maps).tolist() == [[7, 31], [25, 12]]


def test_saliencymix_box_is_centred_on_the_donor_peak_and_pasted_in_place():
    a, b = images(3)
    lam = torch.tensor([0.75, 0.36, 0.0])
    peak = torch.tensor([[16, 16], [2, 29], [10, 10]])  # (y, x)
    result = saliencymix.mix(a, b, lam, peak)
    # side int(S·sqrt(1−λ)): 16, 25, 32; centre at the peak, clipped to the view.
    assert result.box_a.tolist() == [[8, 8, 24, 24], [17, 0, 32, 15], [0, 0, 26, 26]]
    assert torch.equal(result.box_a, result.box_b)
    pasted = donor_pixels(result)
    assert torch.equal(result.images.permute(1, 0, 2, 3)[:, pasted], b.permute(1, 0, 2, 3)[:, pasted])
    assert torch.equal(result.images.permute(1, 0, 2, 3)[:, ~pasted], a.permute(1, 0, 2, 3)[:, ~pasted])
    torch.testing.assert_close(result.weight_b, pasted.flatten(1).float().mean(1))


def test_cam_saliency_peak_is_the_spm_maximum():
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[0, 0, 3] = 5.0  # top-right cell
    maps[1, 2, 1] = 5.0
    views = type("Views", (), {"read": lambda self, p: np.zeros((len(p), S, S, 3), np.uint8)})()
    sources = SourceData(views, maps, np.array([True, True, True]), S, "cpu")
    found = saliencymix.saliency_peaks(sources, {"saliency": "cam"})
    assert 0 <= found[0, 0] < 8 and 24 <= found[0, 1] < 32
    assert 16 <= found[1, 0] < 24 and 8 <= found[1, 1] < 16
    assert found[2].tolist() == [S // 2, S // 2]  # a constant CAM has no peak: the centre


def test_spectral_residual_matches_opencv():
    """Our NumPy spectral residual against OpenCV's StaticSaliencySpectralResidual on the sample
    photos: maps within 0.05 everywhere (OpenCV resizes in fixed point), and our map at OpenCV's
    peak within 0.05 of our maximum (a different peak is a near-tie only)."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "saliency"):
        pytest.skip("OpenCV without the contrib saliency module")
    from mixgen.sources.views import load_view

    paths = sorted(SAMPLE.rglob("*.jpg"))
    for size in (64, 96):
        views = np.stack([load_view(p, size, "crop") for p in paths])
        ours = saliencymix.spectral_residual(views)
        for view, mine in zip(views, ours, strict=True):
            _, reference = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(
                cv2.cvtColor(view, cv2.COLOR_RGB2BGR)
            )
            assert np.abs(reference - mine).max() < 0.05
            y, x = saliencymix.peaks(reference[None])[0]
            assert mine[y, x] >= mine.max() - 0.05
