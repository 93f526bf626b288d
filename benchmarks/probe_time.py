"""Probe stage against backbone stage at CUB-200-2011's full training size (5,994 photos, 200
classes): the probe's fit (``mixgen.probe.fit_probe``, the full fit and the held-out fit) on
synthetic pooled features of that shape, and the CAM pass per image as mixgen runs it on this
machine (the default runtime, 448 px), scaled to 5,994 photos; and mixgen 0.3's procedure, two
cold fits, beside today's. All are timed in the same round, so the ratios hold on a loaded machine.

    python benchmarks/probe_time.py --sources 5994 --classes 200 --rounds 3

Synthetic features (``synthetic_features``) have the statistics of real pooled features, so the
solver needs as many iterations as on real photos; the held-out accuracy is printed."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixgen.probe  # noqa: E402
from mixgen.backbones import fast_inference_copy, load_backbone  # noqa: E402
from mixgen.cams import invariant_feature_maps  # noqa: E402
from mixgen.onnx_runtime import cam_pass_backbone  # noqa: E402
from mixgen.probe import fit_probe, fit_softmax  # noqa: E402

EVALUATIONS = [0]


def counted_objective(*args, **kwargs):
    """mixgen's objective, counting its loss-and-gradient evaluations (the probe's unit of cost)."""
    inner = OBJECTIVE(*args, **kwargs)

    def loss_and_grad(params):
        EVALUATIONS[0] += 1
        return inner(params)

    return loss_and_grad


OBJECTIVE = mixgen.probe.softmax_objective
mixgen.probe.softmax_objective = counted_objective


def synthetic_features(sources: int, classes: int, channels: int = 1280, rank: int = 32, seed: int = 0):
    """Pooled features shaped like EfficientNet-Lite0's on CUB photos at 448 px (mean 0.07 per
    channel, within-class spread about 0.10; class centres 0.8 of that apart) and, like them,
    correlated: class means and within-class variation live in a ``rank``-dimensional subspace
    (plus a little isotropic noise), so the classes overlap as fine-grained ones do instead of
    being separable in 1,280 independent dimensions. Non-negative as after ReLU6; a balanced,
    shuffled label order."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, rank, generator=generator) * (0.10 / rank**0.5)
    centres = 0.8 * torch.randn(classes, rank, generator=generator)
    labels = (torch.arange(sources) % classes)[torch.randperm(sources, generator=generator)]
    latent = centres[labels] + torch.randn(sources, rank, generator=generator)
    noise = 0.03 * torch.randn(sources, channels, generator=generator)
    return (0.07 + latent @ mixing.T + noise).clamp(min=0), labels


def time_backbone(side: int, images: int, threads: int) -> float:
    """Seconds per image of mixgen's CAM pass (default CPU runtime) on random views."""
    backbone = fast_inference_copy(load_backbone())
    backbone, report = cam_pass_backbone(backbone, "auto", torch.device("cpu"), side, threads)
    views = torch.randint(0, 256, (images, side, side, 3), dtype=torch.uint8)
    invariant_feature_maps(backbone, views[:2], side)  # warm-up
    started = time.perf_counter()
    invariant_feature_maps(backbone, views, side)
    return (time.perf_counter() - started) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=5994)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--images", type=int, default=24, help="views timed through the backbone per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    features, labels = synthetic_features(args.sources, args.classes)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.sources} sources, {args.classes} classes", flush=True)
    for round_number in range(args.rounds):
        per_image = time_backbone(args.size, args.images, args.threads)
        EVALUATIONS[0] = 0
        started = time.perf_counter()
        held = torch.arange(len(labels)) % 5 == 4
        fit_softmax(features[~held], labels[~held], args.classes)
        fit_softmax(features, labels, args.classes)
        cold_s, cold_evaluations = time.perf_counter() - started, EVALUATIONS[0]
        EVALUATIONS[0] = 0
        started = time.perf_counter()
        result = fit_probe(features, labels, args.classes)
        probe_s = time.perf_counter() - started
        backbone_s = per_image * args.sources
        print(
            f"round {round_number}: probe {probe_s:.1f} s, {EVALUATIONS[0]} evaluations "
            f"(held-out {result.accuracies()['holdout_accuracy']}); two cold fits (mixgen 0.3) {cold_s:.1f} s, "
            f"{cold_evaluations} evaluations; backbone {backbone_s:.0f} s ({1000 * per_image:.0f} ms/image x "
            f"{args.sources}); probe / backbone {probe_s / backbone_s:.3f} (two cold fits {cold_s / backbone_s:.3f}), "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
