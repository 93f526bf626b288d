"""Probe stage against backbone stage at CUB-200-2011's full training size (5,994 photos, 200
classes): the probe's fit (``mixgen.cam.probe.fit_probe``, the full fit and the held-out fit) on
synthetic pooled features of that shape; the rest of the probe stage, each source's CAM read back
from its fp16 feature maps on disk (as ``campass.MapExtractor.finish`` does), timed on
``--maps-sources`` sources and scaled; and the CAM pass per image as mixgen runs it on this machine
(the default runtime, 448 px), scaled to 5,994 photos; and mixgen 0.3's procedure, two cold fits,
beside today's. All are timed in the same round, so the ratios hold on a loaded machine.

    python -m benchmarks.probe_time --sources 5994 --classes 200 --rounds 3

Synthetic features (``synthetic_features``) have the statistics of real pooled features, so the
solver needs as many iterations as on real photos; the held-out accuracy is printed."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mixgen.cam.probe
from mixgen.cam.backbones import fast_inference_copy, load_backbone
from mixgen.cam.cams import LinearHead, invariant_feature_maps, maps_for
from mixgen.cam.onnx_runtime import cam_pass_backbone
from mixgen.cam.probe import fit_probe, fit_softmax
from mixgen.files import allocate
from mixgen.output.cache import RecordFile

EVALUATIONS = [0]


def counted_objective(*args, **kwargs):
    """mixgen's objective, counting its loss-and-gradient evaluations (the probe's unit of cost)."""
    inner = OBJECTIVE(*args, **kwargs)

    def loss_and_grad(params):
        EVALUATIONS[0] += 1
        return inner(params)

    return loss_and_grad


OBJECTIVE = mixgen.cam.probe.softmax_objective
mixgen.cam.probe.softmax_objective = counted_objective


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


def time_maps(head: LinearHead, labels: torch.Tensor, sources: int, grid: int, batch: int = 32) -> float:
    """Seconds per source of the probe stage's second half: each source's fp16 feature maps read
    back from a record file on disk and turned into its label's raw CAM, in the run's batches."""
    channels = head.weight.shape[1]
    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.f16"
        allocate(path, sources * channels * grid * grid * 2)
        records = RecordFile(path, sources, (channels, grid, grid), np.float16)
        for position in range(sources):
            records.write(position, generator.random((channels, grid, grid), dtype=np.float32) * 0.2)
        records.sync()
        maps = np.zeros((sources, grid, grid), dtype=np.float32)
        started = time.perf_counter()
        for start in range(0, sources, batch):
            chunk = np.arange(start, min(start + batch, sources))
            fmap = torch.from_numpy(records.read(chunk)).float()
            maps[chunk] = maps_for(fmap, "probe", head, labels[chunk], norm="raw").numpy()
        seconds = time.perf_counter() - started
        records.close()
    return seconds / sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=5994)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--images", type=int, default=24, help="views timed through the backbone per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--maps-sources", type=int, default=1024, help="sources whose CAMs are timed, then scaled")
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
        grid = args.size // 32
        maps_s = time_maps(result.head, labels[: args.maps_sources], args.maps_sources, grid) * args.sources
        backbone_s = per_image * args.sources
        stage_s = probe_s + maps_s
        print(
            f"round {round_number}: probe fit {probe_s:.1f} s, {EVALUATIONS[0]} evaluations "
            f"(held-out {result.accuracies()['holdout_accuracy']}); two cold fits (mixgen 0.3) {cold_s:.1f} s, "
            f"{cold_evaluations} evaluations; CAMs from the fp16 feature maps {maps_s:.1f} s; "
            f"backbone {backbone_s:.0f} s ({1000 * per_image:.0f} ms/image x {args.sources}); "
            f"probe stage / backbone {stage_s / backbone_s:.3f} (fit alone {probe_s / backbone_s:.3f}, "
            f"two cold fits {cold_s / backbone_s:.3f}), load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
