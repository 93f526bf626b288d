"""The run configuration: defaults per method, validation with one-line messages, and the
fingerprint that tells a resumable run from a different one. No torch import here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixgen.errors import UsageError

METHODS = ("snapmix", "attentive", "cutmix", "mixup")
CAM_MODES = ("probe", "checkpoint", "imagenet", "mean")
# How a class CAM becomes the map SnapMix's SPM is taken of (mixgen.cams.normalise_cams); the first is
# the default, "raw" is the official code's and mixgen's before the fidelity benchmark.
CAM_NORMS = ("floor", "relu", "raw")
DEFAULT_SIZE = {"snapmix": 448, "attentive": 224, "cutmix": 224, "mixup": 224}
DEFAULT_BETA = {"snapmix": 5.0, "cutmix": 1.0, "mixup": 1.0}
MIN_SIZE = 8
MAX_SIZE = 4096  # one S×S view per source is cached: beyond this the cache alone reaches many GB
MIN_CAM_SIZE = 32
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Settings that change how fast a run goes but never what it writes.
EXECUTION_ONLY = frozenset(
    {"src", "out", "device", "batch_size", "workers", "num_shards", "shard_index", "overwrite", "dry_run", "strict"}
)


@dataclass
class RunConfig:
    method: str
    src: Path
    out: Path
    pairs: int = 1000
    seed: int = 0
    size: int | None = None
    resize: str = "crop"
    format: str = "jpg"
    quality: int = 95
    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    checkpoint: Path | None = None
    cam: str | None = None
    cam_size: int | None = None
    cam_norm: str | None = None
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    layout: str = "auto"
    split: str | None = None
    pairing: str = "random"
    beta: float | None = None
    top_k: int = 6
    grid: int = 7
    shard_size: int = 10_000
    num_shards: int | None = None
    shard_index: int | None = None
    codec: str = "cpu"
    strict: bool = False
    overwrite: bool = False
    dry_run: bool = False

    @property
    def needs_maps(self) -> bool:
        return self.method in ("snapmix", "attentive")

    def resolve(self) -> RunConfig:
        """Fill method-dependent defaults and check every value; raises UsageError naming the option."""
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.src, self.out = Path(self.src), Path(self.out)
        if self.size is None:
            self.size = DEFAULT_SIZE[self.method]
        if self.cam_size is None:
            # The view's own size; tiny views are upsampled to the least a backbone can take.
            self.cam_size = max(self.size, MIN_CAM_SIZE)
        if self.beta is None and self.method in DEFAULT_BETA:
            self.beta = DEFAULT_BETA[self.method]
        if self.cam is None and self.needs_maps:
            if self.checkpoint is not None:
                self.cam = "checkpoint"
            else:
                self.cam = "probe" if self.method == "snapmix" else "mean"
        if self.cam_norm is None and self.needs_maps:
            self.cam_norm = CAM_NORMS[0]
        if not self.needs_maps:
            self.cam = None
            self.cam_size = None
            self.cam_norm = None
        if isinstance(self.format, str) and self.format.lower() in ("jpg", "jpeg", "png", "webp"):
            self.format = "jpg" if self.format.lower() == "jpeg" else self.format.lower()
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0: one per CPU core), got {self.workers}")
        if self.workers == 0:
            # torchrun starts LOCAL_WORLD_SIZE processes per machine: share the cores between them.
            local = _env_int("LOCAL_WORLD_SIZE", 1, "--workers")
            self.workers = max(1, (os.cpu_count() or 1) // max(1, local))
        if self.num_shards is None:
            self.num_shards = _env_int("WORLD_SIZE", 1, "--num-shards")
        if self.shard_index is None:
            self.shard_index = _env_int("RANK", 0, "--shard-index")
        self._validate()
        return self

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(self.pairs > 0, f"--pairs must be a positive integer, got {self.pairs}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(MIN_SIZE <= self.size <= MAX_SIZE, f"--size must be in {MIN_SIZE}..{MAX_SIZE} pixels, got {self.size}")
        need(self.resize in ("crop", "squash"), f"--resize must be crop or squash, got {self.resize!r}")
        need(self.format in ("jpg", "png", "webp"), f"--format must be jpg, png or webp, got {self.format!r}")
        need(self.codec in ("cpu", "cuda"), f"--codec must be cpu or cuda, got {self.codec!r}")
        need(self.codec == "cpu" or self.format == "jpg", "--codec cuda encodes JPEG only: use --format jpg")
        need(self.codec == "cpu" or self.device != "cpu", "--codec cuda needs a CUDA --device (auto, cuda or cuda:N)")
        need(1 <= self.quality <= 100, f"--quality must be in 1..100, got {self.quality}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}")
        need(
            self.pairing in ("random", "cross-class", "same-class"),
            f"--pairing must be random, cross-class or same-class, got {self.pairing!r}",
        )
        need(
            bool(DEVICE_PATTERN.match(self.device)),
            f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        need(self.num_shards >= 1, f"--num-shards must be >= 1, got {self.num_shards}")
        need(
            0 <= self.shard_index < self.num_shards,
            f"--shard-index must be in 0..{self.num_shards - 1}, got {self.shard_index}",
        )
        need(self.split in (None, "train", "test", "all"), f"--split must be train, test or all, got {self.split!r}")
        need(
            self.layout in ("auto", "imagefolder", "cub"),
            f"--layout must be auto, imagefolder or cub, got {self.layout!r}",
        )
        if self.beta is not None:
            need(math.isfinite(self.beta) and self.beta > 0, f"--beta must be a finite number > 0, got {self.beta}")
        for option, path in (("--weights", self.weights), ("--checkpoint", self.checkpoint)):
            need(path is None or Path(path).is_file(), f"{option} {path}: no such file; pass a saved state dict")
        if self.needs_maps:
            need(self.cam in CAM_MODES, f"--cam must be one of {', '.join(CAM_MODES)}, got {self.cam!r}")
            need(
                self.cam != "checkpoint" or self.checkpoint is not None,
                "--cam checkpoint needs --checkpoint FILE (a state dict fine-tuned on SRC's classes)",
            )
            need(self.cam_norm in CAM_NORMS, f"--cam-norm must be one of {', '.join(CAM_NORMS)}, got {self.cam_norm!r}")
            need(
                MIN_CAM_SIZE <= self.cam_size <= MAX_SIZE,
                f"--cam-size must be in {MIN_CAM_SIZE}..{MAX_SIZE} pixels, got {self.cam_size}",
            )
        if self.method == "attentive":
            need(self.grid >= 1, f"--grid must be >= 1, got {self.grid}")
            need(
                1 <= self.top_k <= self.grid**2,
                f"--top-k must be in 1..{self.grid**2} (grid {self.grid}x{self.grid}), got {self.top_k}",
            )
            need(
                self.size >= self.grid,
                f"--size {self.size} is too small for --grid {self.grid}: use a size >= {self.grid}",
            )

    def output_settings(self) -> dict[str, Any]:
        """Every setting that determines the bytes written, as JSON-ready values."""
        settings = {}
        for field in dataclasses.fields(self):
            if field.name in EXECUTION_ONLY:
                continue
            if field.name in ("top_k", "grid") and self.method != "attentive":
                continue
            value = getattr(self, field.name)
            settings[field.name] = str(value) if isinstance(value, Path) else value
        return settings

    def fingerprint(self, extra: dict[str, Any]) -> str:
        blob = json.dumps({**self.output_settings(), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _env_int(name: str, default: int, option: str) -> int:
    """An integer from the environment (torchrun and SLURM set these), or a usage error naming it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer; fix it or pass {option}") from None
