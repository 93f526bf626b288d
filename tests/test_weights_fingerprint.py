"""Pretrained timm/torchvision weights are part of the run's fingerprint and of the maps cache's key:
the loaded weights are digested and the library's version recorded, so a resume after an upgrade
is refused rather than mixing two networks' maps (issue 24 item 11). No test downloads weights:
the pretrained download is replaced by seeded weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mixgen.cam.backbones import load_backbone, weights_digest
from tests.conftest import SAMPLE, run_cli

ARGS = ["--device", "cpu", "--size", "64", "--pairs", "6", "--cam", "mean", "--runtime", "torch"]


@pytest.fixture
def hub(monkeypatch):
    """timm's and torchvision's pretrained loads give seeded weights: ``hub.seed`` picks them."""
    import timm
    import torchvision

    create_model, get_model = timm.create_model, torchvision.models.get_model
    state = SimpleNamespace(seed=0)

    def timm_model(name, pretrained=False, **kwargs):
        assert pretrained, "mixgen asks for timm's pretrained weights"
        torch.manual_seed(state.seed)
        return create_model(name, pretrained=False, **kwargs)

    def torchvision_model(name, weights=None, **kwargs):
        assert weights == "DEFAULT", "mixgen asks for torchvision's pretrained weights"
        torch.manual_seed(state.seed)
        return get_model(name, weights=None, **kwargs)

    monkeypatch.setattr(timm, "create_model", timm_model)
    monkeypatch.setattr(torchvision.models, "get_model", torchvision_model)
    return state


@pytest.mark.parametrize(("backbone", "library"), [("timm:resnet18", "timm"), ("torchvision:resnet18", "torchvision")])
def test_pretrained_weights_are_digested_and_the_library_recorded(hub, backbone, library):
    first = load_backbone(backbone)
    assert len(first.weights_digest) == 64 and first.weights_digest == weights_digest(first.model)
    assert first.library == f"{library} {__import__(library).__version__}"
    assert load_backbone(backbone).weights_digest == first.weights_digest
    hub.seed = 1
    assert load_backbone(backbone).weights_digest != first.weights_digest


def test_a_resume_with_other_weights_or_library_is_refused_and_the_maps_rebuilt(hub, tmp_path, monkeypatch):
    import timm

    out = tmp_path / "out"
    command = ("snapmix", SAMPLE, out, *ARGS, "--backbone", "timm:resnet18")
    run_cli(*command)
    record = json.loads((out / "mixgen.json").read_text())
    digest = weights_digest(load_backbone("timm:resnet18").model)
    assert record["backbone"]["weights"] == digest and record["backbone"]["library"] == f"timm {timm.__version__}"
    maps_before = {p.name for p in (out / ".mixgen").glob("maps-*")}
    assert maps_before

    hub.seed = 1  # the same model name, other pretrained weights (a new timm release's)
    refused = run_cli(*command, expect=1)
    assert "holds a different mixgen run (backbone or its weights differ (weights " in refused.output
    assert "Traceback" not in refused.output
    run_cli(*command, "--overwrite")
    maps_after = {p.name for p in (out / ".mixgen").glob("maps-*")}
    assert maps_after and not maps_after & maps_before

    monkeypatch.setattr(timm, "__version__", "0.0.1")  # same weights, other library code
    refused = run_cli(*command, expect=1)
    assert "backbone or its weights differ (library timm" in refused.output and "→ timm 0.0.1" in refused.output
