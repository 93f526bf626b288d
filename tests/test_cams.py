"""Backbone loading and the CAM heads (docs/methods.md; mixgen.cam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgen.cam.backbones import embedded_weights_path, load_backbone
from mixgen.cam.cams import feature_maps, head_of, maps_for
from mixgen.cam.probe import fit_probe
from mixgen.sources.scan import scan
from mixgen.sources.views import load_view

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def sample_features(backbone, sample_src):
    index = scan(sample_src)
    views = torch.from_numpy(np.stack([load_view(sample_src / s.path, 128) for s in index.items]))
    labels = torch.tensor([s.label for s in index.items])
    return feature_maps(backbone, views, 128), labels


def test_embedded_weights_load_one_to_one(backbone):
    reference = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
    loaded = backbone.model.state_dict()
    assert len(loaded) == len(reference)
    for (_, ours), theirs in zip(loaded.items(), reference.values(), strict=True):
        assert torch.equal(ours, theirs)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)


def test_imagenet_head_recognises_the_cat(backbone, sample_src):
    view = torch.from_numpy(load_view(sample_src / "cat" / "cat_0.jpg", 224))[None]
    fmap = feature_maps(backbone, view, 224)
    logits = head_of(backbone).logits(fmap.mean(dim=(2, 3)))
    assert int(logits.argmax()) in IMAGENET_CATS
    full = backbone.model(((view.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.5)
    torch.testing.assert_close(logits, full, atol=1e-3, rtol=1e-3)


def test_probe_is_class_specific_and_accurate(sample_features):
    fmap, labels = sample_features
    result = fit_probe(fmap.mean(dim=(2, 3)), labels, 5)
    assert result.train_accuracy >= 0.9
    own = result.head.cams(fmap, labels)
    other = result.head.cams(fmap, (labels + 1) % 5)
    for a, b in zip(own, other, strict=True):
        assert not torch.allclose(a, b, atol=1e-3)
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] < 0.999
    # The CAM averaged over positions is the probe's logit: the head applies to F itself.
    logits = result.head.logits(fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(own.mean(dim=(1, 2)), logits[torch.arange(len(labels)), labels], atol=1e-3, rtol=1e-4)


def test_map_modes(backbone, sample_features):
    fmap, labels = sample_features
    torch.testing.assert_close(maps_for(fmap, "mean", None, labels), fmap.mean(dim=1))
    head = head_of(backbone)
    predicted = head.logits(fmap.mean(dim=(2, 3))).argmax(1)
    torch.testing.assert_close(maps_for(fmap, "imagenet", head, labels), head.cams(fmap, predicted))
    relu = maps_for(fmap, "imagenet", head, labels, norm="relu")
    torch.testing.assert_close(relu, head.cams(fmap, predicted).clamp(min=0))
    torch.testing.assert_close(maps_for(fmap, "mean", None, labels, norm="relu"), fmap.mean(dim=1))


def test_cam_norms():
    from mixgen.cam.cams import normalise_cams
    from mixgen.options import CAM_NORMS

    cams = torch.tensor([[[-2.0, 0.5], [3.0, -0.1]]])
    assert torch.equal(normalise_cams(cams, "raw"), cams)
    assert torch.equal(normalise_cams(cams, "relu"), torch.tensor([[[0.0, 0.5], [3.0, 0.0]]]))
    floor = normalise_cams(cams, "floor")  # 0.1 × the peak 3 comes off
    torch.testing.assert_close(floor, torch.tensor([[[0.0, 0.2], [2.7, 0.0]]]))
    negative = normalise_cams(-cams.abs() - 1, "floor")  # no positive evidence: constant, area fallback
    assert torch.equal(negative, torch.zeros_like(cams))
    assert all(normalise_cams(cams, norm).shape == cams.shape for norm in CAM_NORMS if norm != "colour")
    with pytest.raises(ValueError):
        normalise_cams(cams, "softmax")
    with pytest.raises(ValueError, match="needs the views"):
        normalise_cams(cams, "colour")
    views = torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)
    colour = normalise_cams(cams, "colour", views)
    assert colour.shape == (1, 8, 8)  # 4× the CAM's grid
    # One colour in the whole view: P is one constant, so the map is the upsampled floor map, scaled.
    up = torch.nn.functional.interpolate(floor[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    ratio = colour[up > 0] / up[up > 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def _two_colour_views(batch: int = 1) -> torch.Tensor:
    """8 × 8 views: red left half (the object), green right half (the background)."""
    views = torch.zeros((batch, 8, 8, 3), dtype=torch.uint8)
    views[:, :, :4, 0] = 200
    views[:, :, 4:, 1] = 200
    return views


def test_colour_posterior_formula_on_a_hand_made_view():
    from mixgen.cam.cams import colour_posterior

    # A map of 1 on the left half of a 2 × 2 grid, 0 on the right: upsampled 4× it is 1 on the red
    # half's 4 × 8 positions and 0 on the green half's, except the bilinear seam (columns 3, 4).
    maps = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    views = _two_colour_views()
    refined = colour_posterior(maps, views)
    up = torch.nn.functional.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    red, green = up[0, :, :4], up[0, :, 4:]
    # P = (Σ U + ½) / (count + 1) per colour, U scaled to peak 1 (it is 1 already).
    p_red = (red.sum() + 0.5) / (red.numel() + 1)
    p_green = (green.sum() + 0.5) / (green.numel() + 1)
    torch.testing.assert_close(refined[0, :, :4], red * p_red)
    torch.testing.assert_close(refined[0, :, 4:], green * p_green)
    assert p_red > 0.8 > 0.2 > p_green


def test_colour_posterior_moves_mass_onto_the_object_colour_only():
    from mixgen.cam.cams import colour_posterior, spm

    # A CAM smeared from the red object into the green background: the refined map keeps its
    # support, and more of its mass lies on the red pixels.
    maps = torch.tensor([[[1.0, 0.6], [1.0, 0.6]]])
    views = _two_colour_views()
    refined = colour_posterior(maps, views)
    up = torch.nn.functional.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(refined > 0, up > 0) and (refined >= 0).all()
    share = lambda m: (m[0, :, :4].sum() / m.sum()).item()  # noqa: E731
    assert share(refined) > share(up) + 0.05
    # What SnapMix takes its masses from improves the same way.
    assert share(spm(refined, 8)[0]) > share(spm(up, 8)[0])
    # An empty map stays empty (SnapMix then falls back to area weights).
    assert torch.equal(colour_posterior(torch.zeros(1, 2, 2), views), torch.zeros(1, 8, 8))


def test_colour_posterior_is_per_image():
    """Each image's colour model is its own: a batch gives each source what it gets alone."""
    from mixgen.cam.cams import colour_posterior

    generator = torch.Generator().manual_seed(0)
    maps = torch.rand((3, 4, 4), generator=generator)
    views = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=generator)
    together = colour_posterior(maps, views)
    alone = torch.cat([colour_posterior(maps[i : i + 1], views[i : i + 1]) for i in range(3)])
    assert torch.equal(together, alone)


@pytest.mark.slow
def test_folded_batchnorm_keeps_feature_maps(backbone):
    from mixgen.cam.backbones import fast_inference_copy

    folded = fast_inference_copy(backbone)
    assert folded is not backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    views = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch.testing.assert_close(feature_maps(folded, views, 64), feature_maps(backbone, views, 64), atol=1e-3, rtol=1e-3)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.model.modules())


def test_cpu_backbone_calls_stay_within_the_pixel_budget():
    from mixgen.cam.cams import CPU_CALL_PIXELS, micro_batch

    cpu = torch.device("cpu")
    assert [micro_batch(cpu, side) for side in (112, 224, 256, 448, 1024)] == [16, 4, 2, 1, 1]
    for side in range(32, 1100, 7):
        size = micro_batch(cpu, side)
        assert size == 1 or size * side * side <= CPU_CALL_PIXELS < 2 * size * side * side
    assert micro_batch(torch.device("cuda"), 448) == 64


@pytest.mark.slow
def test_feature_maps_do_not_depend_on_how_sources_are_grouped(backbone):
    from mixgen.cam.cams import invariant_feature_maps

    views = torch.randint(0, 256, (7, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = invariant_feature_maps(backbone, views, 64)
    parts = torch.cat(
        [invariant_feature_maps(backbone, views[:3], 64), invariant_feature_maps(backbone, views[3:], 64)]
    )
    assert torch.equal(whole, parts)


@pytest.mark.slow
def test_cam_norm_changes_the_weights_not_the_pixels(tmp_path):
    """--cam-norm only reshapes the maps SnapMix weighs with: the same boxes and images, other
    weights; the run records which normalisation it used."""
    import json

    import pyarrow.dataset as ds

    from tests.conftest import SAMPLE, run_cli

    tables = {}
    for norm in ("floor", "raw"):
        out = tmp_path / norm
        run_cli("snapmix", SAMPLE, out, "--size", "64", "--pairs", "12", "--device", "cpu", "--cam-norm", norm)
        tables[norm] = ds.dataset(out / "data", format="parquet").to_table().sort_by("index").to_pylist()
        assert json.loads((out / "mixgen.json").read_text())["config"]["cam_norm"] == norm
    floor, raw = tables["floor"], tables["raw"]
    assert [r["sha256"] for r in floor] == [r["sha256"] for r in raw]
    assert [r["box_a"] for r in floor] == [r["box_a"] for r in raw]
    assert [(r["weight_a"], r["weight_b"]) for r in floor] != [(r["weight_a"], r["weight_b"]) for r in raw]


def test_a_run_recorded_before_cam_norm_recomputes_with_the_raw_cam(tmp_path):
    from mixgen.config import RunConfig

    old = {"method": "snapmix", "src": str(tmp_path), "out": str(tmp_path / "o"), "cam": "probe", "cam_size": 96}
    assert RunConfig.from_settings(old).cam_norm == "raw"
    assert RunConfig.from_settings({**old, "cam_norm": "floor"}).cam_norm == "floor"
    assert RunConfig.from_settings({**old, "cam": None}).cam_norm is None
