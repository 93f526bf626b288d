"""The embedded EfficientNet-Lite0 (mixgen/cam/lite0.py) against timm's tf_efficientnet_lite0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixgen.cam.backbones import embedded_weights_path, fast_inference_copy, load_backbone, load_state_dict
from mixgen.cam.lite0 import SameConv2d, _tf_same_padding


@pytest.fixture(scope="module")
def both():
    import timm

    ours = load_backbone("efficientnet_lite0").model
    reference = timm.create_model("tf_efficientnet_lite0").eval()
    weights = load_state_dict(embedded_weights_path(), "weights")
    reference.load_state_dict(dict(zip(reference.state_dict(), weights.values(), strict=True)))
    return ours, reference


# Even sides take the grown-kernel path at every stride-2 layer, odd ones the F.pad fallback,
# and 100 → 50 → 25 mixes both within one network.
@pytest.mark.parametrize("side", [*(pytest.param(side, marks=pytest.mark.slow) for side in (224, 160, 100, 97)), 33])
def test_same_features_and_logits_as_timm(both, side):
    ours, reference = both
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    with torch.inference_mode():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_same_in_channels_last_and_folded(both):
    ours, reference = both
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    folded = fast_inference_copy(load_backbone("efficientnet_lite0"))
    folded.model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference.forward_features(x)
        got = folded.features(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (7, 3, 2, (1, 1)), (14, 5, 1, (2, 2))],
)
def test_tf_same_padding(size, kernel, stride, expected):
    assert _tf_same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("side", [16, 17])
def test_same_conv_equals_explicit_tf_padding(kernel, side):
    conv = SameConv2d(4, 4, kernel, 2, groups=4)
    x = torch.randn(2, 4, side, side)
    before, after = _tf_same_padding(side, kernel, 2)
    expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, None, 2, 0, 1, 4)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_features_as_timm_on_cuda(both):
    ours, reference = both
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)).cuda()
    try:
        ours.cuda(), reference.cuda()
        with torch.inference_mode():
            expected = reference.forward_features(x)
            torch.testing.assert_close(ours.forward_features(x), expected, atol=1e-3, rtol=1e-3)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                half = ours.forward_features(x.contiguous(memory_format=torch.channels_last)).float()
            assert (half - expected).abs().max() < 0.1 * expected.abs().max()
    finally:
        ours.cpu(), reference.cpu()
