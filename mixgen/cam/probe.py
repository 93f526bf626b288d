"""The linear probe behind ``--cam probe``: multinomial logistic regression of the source labels on
the globally pooled backbone features, fitted full-batch on the device.

The solver is a small L-BFGS with the gradient in closed form rather than torch.optim.LBFGS with
autograd: torch.optim's first use imports torch._dynamo, 1.7 s of every run's start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixgen.cam.cams import LinearHead

L2 = 1e-3
MAX_ITERATIONS = 200
HISTORY = 20


@dataclass
class ProbeResult:
    head: LinearHead
    train_accuracy: float
    holdout_accuracy: float | None
    classes: int = 0  # the classes with a source: the held-out part is scored over these

    def accuracies(self) -> dict[str, float | None]:
        """The accuracies as run records and cams.json report them, and the classes they are over."""
        held = self.holdout_accuracy
        return {
            "train_accuracy": round(self.train_accuracy, 4),
            "holdout_accuracy": None if held is None else round(held, 4),
            "classes": self.classes,
        }


def lbfgs(
    loss_and_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    x: torch.Tensor,
    max_iterations: int = MAX_ITERATIONS,
    history: int = HISTORY,
    grad_tolerance: float = 1e-7,
    change_tolerance: float = 1e-9,
) -> torch.Tensor:
    """Minimise a smooth function of the flat tensor ``x``: L-BFGS directions (two-loop
    recursion) with a backtracking line search on the Armijo condition. Stops when the
    gradient or the change of the loss is below tolerance, as torch.optim.LBFGS does."""
    loss, grad = loss_and_grad(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / yᵀs), oldest first
    for _ in range(max_iterations):
        if grad.abs().max().item() <= grad_tolerance:
            break
        direction = -_inverse_hessian_times(grad, pairs)
        slope = grad.dot(direction).item()
        if slope >= 0:  # not a descent direction: restart from steepest descent
            pairs.clear()
            direction, slope = -grad, -grad.dot(grad).item()
        # The first step has no curvature yet: keep it to unit length.
        step = 1.0 if pairs else min(1.0, 1.0 / grad.abs().sum().item())
        while True:
            candidate = x + step * direction
            new_loss, new_grad = loss_and_grad(candidate)
            # A change below tolerance ends the line search too: at float32's precision floor no
            # step decreases the loss any more, and halving on would only waste evaluations.
            if new_loss <= loss + 1e-4 * step * slope or abs(new_loss - loss) < change_tolerance or step < 1e-10:
                break
            step *= 0.5
        s, y = candidate - x, new_grad - grad
        curvature = y.dot(s).item()
        if curvature > 1e-10:
            pairs.append((s, y, 1.0 / curvature))
            del pairs[:-history]
        converged = abs(loss - new_loss) < change_tolerance
        x, loss, grad = candidate, new_loss, new_grad
        if converged:
            break
    return x


def _inverse_hessian_times(grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """H·grad for the L-BFGS inverse-Hessian estimate H of the stored (s, y) pairs."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(pairs):
        alpha = rho * s.dot(q).item()
        q.sub_(y, alpha=alpha)
        alphas.append(alpha)
    if pairs:
        s, y, _ = pairs[-1]
        q.mul_(s.dot(y).item() / y.dot(y).item())
    for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
        q.add_(s, alpha=alpha - rho * y.dot(q).item())
    return q


def softmax_objective(
    z: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float
) -> Callable[[torch.Tensor], tuple[float, torch.Tensor]]:
    """Loss and gradient of L2-penalised multinomial logistic regression on ``z``, as functions of
    the flat parameters [weight (K·C), bias (K)]; the gradient in closed form, (p − onehot)ᵀz / n."""
    count, channels = z.shape
    rows = torch.arange(count, device=z.device)

    def loss_and_grad(params: torch.Tensor) -> tuple[float, torch.Tensor]:
        weight, bias = params[: num_classes * channels].view(num_classes, channels), params[num_classes * channels :]
        log_p = torch.log_softmax(z @ weight.T + bias, dim=1)
        loss = -log_p[rows, labels].mean() + l2 * weight.pow(2).sum()
        residual = log_p.exp_()
        residual[rows, labels] -= 1
        residual /= count
        grad_weight = residual.T @ z + 2 * l2 * weight
        return loss.item(), torch.cat([grad_weight.flatten(), residual.sum(dim=0)])

    return loss_and_grad


def fit_softmax(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float = L2,
    dtype: torch.dtype = torch.float64,
) -> LinearHead:
    """Multinomial logistic regression fitted from zero on standardised features and folded back
    so that it applies to raw features (and so to every position of F).

    Fitted in float64: in float32 the loss stops resolving changes near the optimum, so where the
    solver stops depends on rounding, and features that differ by 1e-5 (another CAM runtime, another
    machine) gave heads — and SnapMix weights — 2e-4 apart. In float64 it stops at the optimum,
    which moves only as much as the features do. ``dtype=torch.float32`` is for fits whose head
    only scores (``fit_probe``'s held-out estimate): a third of the time, the same accuracy. The
    head is handed back in float32."""
    features = features.to(dtype)
    channels = features.shape[1]
    mu = features.mean(dim=0)
    sigma = features.std(dim=0, unbiased=False).clamp(min=1e-6)
    objective = softmax_objective((features - mu) / sigma, labels, num_classes, l2)
    params = lbfgs(objective, features.new_zeros(num_classes * (channels + 1)))
    weight, bias = params[: num_classes * channels].view(num_classes, channels), params[num_classes * channels :]
    return LinearHead((weight / sigma).float(), (bias - weight @ (mu / sigma)).float())


def fit_probe(pooled: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = L2) -> ProbeResult:
    """Fit the probe on every source (float64, from zero: the head depends on the features alone);
    also fit on 4/5 and score the held-out 1/5 (every fifth source) to give an honest accuracy
    estimate, when the training part has every class that has a source. That estimate is over
    the classes present: a class without a source (a CUB folder holding some species only) is
    left out of its fit and its argmax, where it could only lower the score of a guess it never
    makes. That fit only scores, so it runs in float32: on 5,994 sources in 200 classes it takes
    4 s against 12 s in float64, with the same held-out accuracy, and the whole probe stage comes
    to 0.17 of the backbone stage on a 2-core CPU (benchmarks/probe_time.py)."""
    pooled = pooled.float()
    held = torch.arange(len(labels), device=labels.device) % 5 == 4
    present = torch.unique(labels)  # sorted: with every class present, ``dense`` is ``labels``
    holdout = None
    if held.any() and len(torch.unique(labels[~held])) == len(present):
        dense = torch.searchsorted(present, labels)
        part = fit_softmax(pooled[~held], dense[~held], len(present), l2, dtype=torch.float32)
        holdout = (part.logits(pooled[held]).argmax(1) == dense[held]).float().mean().item()
    head = fit_softmax(pooled, labels, num_classes, l2)
    train_acc = (head.logits(pooled).argmax(1) == labels).float().mean().item()
    return ProbeResult(head, train_acc, holdout, len(present))
