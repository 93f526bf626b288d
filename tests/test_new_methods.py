"""Formula tests for ResizeMix, SaliencyMix, FMix and GridMix (SPEC §4), and for semantic label
weights on every mask method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixgen.methods import (
    Batch,
    SourceData,
    cell_edges,
    fmix,
    get_method,
    gridmix,
    mask_from_runs,
    mask_runs,
    method_names,
    resizemix,
    saliencymix,
)
from mixgen.methods.labels import mix_with_label_weights, semantic_weights

S = 32
REPO = Path(__file__).resolve().parents[1]


def images(batch: int = 3, seed: int = 0, size: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    return a, b


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


# ---------------------------------------------------------------------------------------------
# ResizeMix


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


# ---------------------------------------------------------------------------------------------
# SaliencyMix


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

    paths = sorted((REPO / "sample_data").rglob("*.jpg"))
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


# ---------------------------------------------------------------------------------------------
# FMix


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


# ---------------------------------------------------------------------------------------------
# GridMix


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


# ---------------------------------------------------------------------------------------------
# Semantic label weights on every mask method

MASK_METHODS = ["cutmix", "resizemix", "saliencymix", "fmix", "gridmix", "attentive"]


def _with_grid(batch: Batch, name: str) -> Batch:
    if name == "attentive":
        batch.inputs_b = {"grid": torch.rand(len(batch.params), 4, 4)}
        batch.options = {**batch.options, "grid": 4, "top_k": 5}
    return batch


@pytest.mark.parametrize("name", MASK_METHODS)
def test_semantic_equals_area_for_a_uniform_spm(name):
    constant = torch.ones(6, 4, 4)  # a constant CAM: the uniform SPM (SnapMix's area fallback)
    batch = _with_grid(planned_batch(name, maps=(constant, constant)), name)
    area = get_method(name).mix(batch)
    semantic = mix_with_label_weights(get_method(name), batch, "semantic")
    mixed = area.area_ratio > 0
    torch.testing.assert_close(semantic.weight_b[mixed], area.area_ratio[mixed])
    torch.testing.assert_close(semantic.weight_a[mixed], 1 - area.area_ratio[mixed])
    if name != "attentive":  # attentive's own rule is k/G², the pixel share only when G divides S
        torch.testing.assert_close(semantic.weight_b, area.weight_b)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_semantic_weights_of_a_one_hot_spm(name):
    """An S×S CAM that is 0 but for one pixel is a one-hot SPM: ρ_b is 1 exactly when the
    donor's hot pixel arrives, ρ_a is 0 exactly when the canvas's hot pixel is covered."""
    rng = np.random.default_rng(1)
    batch_size = 12
    hot_a, hot_b = rng.integers(S, size=(batch_size, 2)), rng.integers(S, size=(batch_size, 2))
    maps_a, maps_b = torch.zeros(batch_size, S, S), torch.zeros(batch_size, S, S)
    maps_a[torch.arange(batch_size), hot_a[:, 0], hot_a[:, 1]] = 1.0
    maps_b[torch.arange(batch_size), hot_b[:, 0], hot_b[:, 1]] = 1.0
    batch = _with_grid(planned_batch(name, seed=3, batch=batch_size, maps=(maps_a, maps_b)), name)
    result = get_method(name).mix(batch)
    rho_a, rho_b = semantic_weights(result, batch)
    covered = donor_pixels(result)
    for i in range(batch_size):
        if result.area_ratio[i] == 0:
            assert (rho_a[i], rho_b[i]) == (1.0, 0.0)
            continue
        a_covered = bool(covered[i, hot_a[i, 0], hot_a[i, 1]])
        # ResizeMix pastes the whole donor: its hot pixel always arrives.
        b_arrives = name == "resizemix" or bool(covered[i, hot_b[i, 0], hot_b[i, 1]])
        assert rho_a[i].item() == pytest.approx(0.0 if a_covered else 1.0, abs=1e-5)
        assert rho_b[i].item() == pytest.approx(1.0 if b_arrives else 0.0, abs=1e-5)


def test_semantic_same_label_rows_get_the_sum_and_mixup_keeps_lambda():
    same = torch.tensor([True, False] * 3)
    maps = (torch.rand(6, 4, 4), torch.rand(6, 4, 4))
    batch = planned_batch("cutmix", maps=maps, same=same)
    plain = planned_batch("cutmix", maps=maps)
    together = mix_with_label_weights(get_method("cutmix"), batch, "semantic")
    apart = mix_with_label_weights(get_method("cutmix"), plain, "semantic")
    mixed = together.area_ratio > 0
    total = apart.weight_a + apart.weight_b
    torch.testing.assert_close(together.weight_a[same & mixed], total[same & mixed])
    torch.testing.assert_close(together.weight_b[same & mixed], total[same & mixed])
    mix = planned_batch("mixup")
    blended = mix_with_label_weights(get_method("mixup"), mix, "semantic")
    torch.testing.assert_close(blended.weight_a, mix.param("lam"))
    assert not get_method("mixup").needs_maps(get_method("mixup").defaults(), "semantic")


def test_every_builtin_method_is_declared():
    names = method_names()
    assert names[:8] == ["snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix"]
    for name in names:
        method = get_method(name)
        assert method.help and method.paper and method.preview.titles
        assert method.label_weights in (("semantic",), ("area", "semantic"))


@pytest.mark.parametrize(("grid", "size"), [(4, 64), (8, 224)])
def test_semantic_weights_stay_in_0_1_when_every_cell_is_the_donors(grid, size):
    """The per-cell SPM masses, each rounded to float32, summed to 1.0000001 over the whole grid:
    weight_a was written as -1.19e-07. Masses are shares of one map: never outside [0, 1]."""
    batch_size = 64
    canvas = torch.randint(
        0, 255, (batch_size, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    maps = torch.rand((batch_size, 7, 7), generator=torch.Generator().manual_seed(0))
    params = [{"lam": 1.0, "cells": list(range(grid * grid))} for _ in range(batch_size)]
    same = torch.zeros(batch_size, dtype=torch.bool)
    batch = Batch(canvas, canvas.flip(0), params, {"grid": grid, "beta": 1.0}, same, maps, maps.flip(0))
    result = mix_with_label_weights(get_method("gridmix"), batch, "semantic")
    assert torch.equal(result.weight_a, torch.zeros(batch_size)) and torch.equal(
        result.weight_b, torch.ones(batch_size)
    )
