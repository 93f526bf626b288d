"""The probe's solver (mixgen/cam/probe.py) against autograd and torch.optim.LBFGS."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mixgen.cam.probe import fit_probe, fit_softmax, lbfgs, softmax_objective


def _problem(samples: int, classes: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 64, generator=generator)
    labels = torch.arange(samples) % classes
    return (centres[labels] + noise * torch.randn(samples, 64, generator=generator)).relu(), labels


def _objective(features, labels, weight, bias, l2=1e-3) -> float:
    """The standardised problem's loss, from a head folded back onto raw features."""
    mu, sigma = features.mean(0), features.std(0, unbiased=False).clamp(min=1e-6)
    w = weight * sigma
    b = bias + w @ (mu / sigma)
    return (F.cross_entropy(((features - mu) / sigma) @ w.T + b, labels) + l2 * w.pow(2).sum()).item()


def test_lbfgs_minimises_a_quadratic():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=generator, dtype=torch.float64)
    hessian = a @ a.T + 0.1 * torch.eye(20, dtype=torch.float64)
    target = torch.randn(20, generator=generator, dtype=torch.float64)

    def loss_and_grad(x):
        return (0.5 * x @ hessian @ x - target @ x).item(), hessian @ x - target

    x = lbfgs(loss_and_grad, torch.zeros(20, dtype=torch.float64), grad_tolerance=1e-10, change_tolerance=0)
    torch.testing.assert_close(x, torch.linalg.solve(hessian, target), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("samples", "classes", "noise"), [(100, 5, 1.0), (300, 10, 4.0), (120, 3, 0.1)])
def test_softmax_probe_reaches_torch_lbfgs_optimum(samples, classes, noise):
    features, labels = _problem(samples, classes, noise)
    mu, sigma = features.mean(0), features.std(0, unbiased=False).clamp(min=1e-6)
    weight = torch.zeros(classes, 64, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    reference = torch.optim.LBFGS([weight, bias], max_iter=500, history_size=20, line_search_fn="strong_wolfe")
    z = (features - mu) / sigma

    def closure():
        reference.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    reference.step(closure)
    expected = (F.cross_entropy(z @ weight.T + bias, labels) + 1e-3 * weight.pow(2).sum()).item()
    head = fit_softmax(features, labels, classes)
    assert _objective(features, labels, head.weight, head.bias) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Folded back onto raw features, the head predicts what the standardised model does.
    standardised = (z @ weight.detach().T + bias.detach()).argmax(1)
    assert torch.equal(head.logits(features).argmax(1), standardised)


@pytest.mark.slow
def test_probe_moves_only_as_much_as_its_features():
    """Features that differ by float rounding (another CAM runtime) give the same head to within
    a few times that rounding: the float64 fit stops at the optimum, not where float32 rounding
    happens to stall it."""
    features, labels = _problem(200, 10, 2.0)
    nudged = features * (1 + 1e-6 * torch.randn(features.shape, generator=torch.Generator().manual_seed(1)))
    head, other = fit_softmax(features, labels, 10), fit_softmax(nudged, labels, 10)
    assert head.weight.dtype == torch.float32
    scale = head.weight.abs().max()
    assert (head.weight - other.weight).abs().max() < 5e-6 * scale  # float32 fits: 1.5e-5
    assert (head.logits(features) - other.logits(features)).abs().max() < 5e-6 * head.logits(features).abs().max()


def test_closed_form_gradient_matches_autograd():
    features, labels = _problem(50, 4, 1.0)
    z = (features - features.mean(0)) / features.std(0)
    params = torch.randn(4 * 65, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss, grad = softmax_objective(z, labels, 4, 1e-3)(params.detach())
    weight, bias = params[: 4 * 64].view(4, 64), params[4 * 64 :]
    expected = F.cross_entropy(z @ weight.T + bias, labels) + 1e-3 * weight.pow(2).sum()
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, params.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_fitting_the_probe_and_loading_the_backbone_import_neither_dynamo_nor_torchvision():
    """Each of them costs seconds of every run's start-up (see mixgen/cam/lite0.py, mixgen/cam/probe.py)."""
    script = (
        "import sys, torch\n"
        "from mixgen.cam.backbones import load_backbone\n"
        "from mixgen.cam.probe import fit_probe\n"
        "load_backbone()\n"
        "fit_probe(torch.randn(40, 8), torch.arange(40) % 4, 4)\n"
        "print(sorted(m for m in ('torch._dynamo', 'torchvision', 'timm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_probe_head_is_the_full_float64_fit_and_the_float32_holdout_scores_as_float64():
    """fit_probe's head does not depend on its held-out fit; that fit, in float32 to save time,
    scores the held-out sources as a float64 fit does."""
    features, labels = _problem(300, 10, 4.0)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2))  # every class in every fifth
    features, labels = features[order], labels[order]
    result = fit_probe(features, labels, 10)
    full = fit_softmax(features, labels, 10)
    assert torch.equal(result.head.weight, full.weight) and torch.equal(result.head.bias, full.bias)
    held = torch.arange(300) % 5 == 4
    part = fit_softmax(features[~held], labels[~held], 10)
    expected = (part.logits(features[held]).argmax(1) == labels[held]).float().mean().item()
    assert 0.2 < expected < 1 and result.holdout_accuracy == pytest.approx(expected, abs=1 / 60 + 1e-9)


def test_the_held_out_accuracy_is_scored_over_the_classes_present():
    """Classes listed without a source (a CUB folder holding 3 of its 8 species) do not drop the
    held-out accuracy: it is fitted and scored over the classes present, which the result names;
    the head keeps an output per listed class (ids as listed)."""
    features, labels = _problem(150, 3, 4.0)
    ids = torch.tensor([1, 4, 6])[labels]  # classes 0, 2, 3, 5 and 7 have no source
    result = fit_probe(features, ids, 8)
    assert result.head.weight.shape[0] == 8 and result.classes == 3
    held = torch.arange(150) % 5 == 4
    part = fit_softmax(features[~held], labels[~held], 3)
    expected = (part.logits(features[held]).argmax(1) == labels[held]).float().mean().item()
    assert result.holdout_accuracy is not None
    assert result.holdout_accuracy == pytest.approx(expected, abs=1 / 30 + 1e-9)
    assert result.accuracies()["classes"] == 3
