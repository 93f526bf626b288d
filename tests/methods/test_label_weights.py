"""Semantic label weights for every method (``--label-weights semantic``: SnapMix's rule on any
mix's geometry), and the registry of built-in methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgen.methods import (
    Batch,
    get_method,
    method_names,
)
from mixgen.methods.labels import mix_with_label_weights, semantic_weights
from tests.methods.helpers import S, donor_pixels, planned_batch

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
        assert method.label_weights in (("semantic", "boxes", "teacher"), ("area", "semantic", "boxes", "teacher"))


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
