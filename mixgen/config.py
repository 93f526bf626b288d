"""The run configuration, declared once: ``RunConfig``'s fields hold the defaults and ``FLAGS``
(``mixgen.options``, re-exported here) the help, choices and whether an option only changes how
fast a run goes; the CLI, the validation (one-line messages) and the run record's settings and
fingerprint (which tells a resumable run from a different one) all come from them. No torch
import here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixgen.errors import MixgenError, UsageError
from mixgen.methods import TEACHER
from mixgen.options import (
    CAM_SETTINGS,
    DEFAULT_BACKBONE,
    DEFAULT_CAM_NORM,
    DEVICE_PATTERN,
    EXECUTION_ONLY,
    FLAGS,
    MAX_SIZE,
    MIN_CAM_SIZE,
    MIN_SIZE,
)

# The --cam modes whose head classifies SRC's own classes: the teacher's (--label-weights teacher).
TEACHER_HEADS = ("probe", "checkpoint")

if TYPE_CHECKING:
    from mixgen.methods import Method
    from mixgen.sources.scan import SourceIndex


def recorded_runtime(meta: dict[str, Any]) -> str:
    """The CAM pass runtime a run's manifests record (its maps are that runtime's own); ``auto``
    for a run recorded before there was a choice."""
    return (meta.get("backbone") or {}).get("runtime") or "auto"


def _either(choices: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


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
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    checkpoint: Path | None = None
    cam: str | None = None
    cam_size: int | None = None
    cam_norm: str | None = None
    device: str = "auto"
    runtime: str = "auto"
    batch_size: int = 32
    workers: int = 0
    layout: str = "auto"
    split: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    classes: Path | None = None
    writer: str = "files"
    pairing: str = "random"
    label_weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options (its declaration)
    shard_size: int = 10_000
    num_shards: int | None = None
    shard_index: int | None = None
    cache_dir: Path | None = None
    codec: str = "cpu"
    strict: bool = False
    overwrite: bool = False
    dry_run: bool = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **overrides: Any) -> RunConfig:
        """A config from a run record's flat settings (``output_settings``): the method's options
        are the keys that are not fields."""
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        values = {**settings, **overrides}
        if values.get("cam") is not None and "cam_norm" not in values:
            values["cam_norm"] = "raw"  # recorded before --cam-norm existed: the raw CAM
        common = {k: v for k, v in values.items() if k in names}
        for key in ("src", "out", "weights", "checkpoint", "classes", "cache_dir"):
            if common.get(key) is not None:
                common[key] = Path(common[key])
        return cls(**common, options={k: v for k, v in values.items() if k not in names})

    @property
    def declaration(self) -> Method:
        from mixgen.methods import get_method

        return get_method(self.method)

    @property
    def cache(self) -> Path:
        """Where the source stage's caches go (views, maps, probe features): ``--cache-dir``, or
        OUT/.mixgen. The run's own files (record, source tables, locks) stay in OUT/.mixgen."""
        from mixgen.layout import CACHE_DIR

        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.out) / CACHE_DIR

    @property
    def needs_maps(self) -> bool:
        return self.declaration.needs_maps(self.options, self.label_weights or "area")

    def resolve(self) -> RunConfig:
        """Fill method-dependent defaults and check every value; raises UsageError naming the option."""
        from mixgen.methods import get_method, method_names

        try:
            method = get_method(self.method)
        except KeyError:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(method_names())}") from None
        self.src, self.out = Path(self.src), Path(self.out)
        unknown = sorted(set(self.options) - {o.name for o in method.options})
        if unknown:
            raise UsageError(
                f"{self.method} has no option --{unknown[0].replace('_', '-')}; see mixgen {self.method} --help"
            )
        self.options = {**method.defaults(), **self.options}
        if self.label_weights is None:
            self.label_weights = method.label_weights[0]
        if self.label_weights not in method.label_weights:
            *first, last = method.label_weights
            choices = f"{', '.join(first)} or {last}" if first else last
            raise UsageError(f"--label-weights must be {choices} for {self.method}, got {self.label_weights!r}")
        if self.size is None:
            self.size = method.default_size
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        cam_settings_given = [name for name in CAM_SETTINGS if getattr(self, name) != defaults[name]]
        if self.cam_size is None:
            # The view's own size; tiny views are upsampled to the least a backbone can take.
            self.cam_size = max(self.size, MIN_CAM_SIZE)
        cam_given = self.cam is not None
        if self.cam is None and self.needs_maps:
            self.cam = "checkpoint" if self.checkpoint is not None else method.default_cam
        if self.label_weights == TEACHER and self.cam not in TEACHER_HEADS:
            chosen = f"--cam {self.cam}" if cam_given else f"{self.method}'s default --cam {self.cam}"
            raise UsageError(
                f"--label-weights teacher needs a classifier over SRC's classes, and {chosen} has none; "
                "pass --cam probe (a probe fitted on SRC) or --checkpoint FILE"
            )
        if self.cam_norm is None and self.needs_maps:
            self.cam_norm = DEFAULT_CAM_NORM
        if not self.needs_maps:
            if cam_settings_given:
                raise UsageError(
                    f"--{cam_settings_given[0].replace('_', '-')}: {self.method} with --label-weights "
                    f"{self.label_weights} uses no CAM; drop it or pass --label-weights semantic"
                )
            self.cam = None
            self.cam_size = None
            self.cam_norm = None
        if isinstance(self.device, str):
            self.device = self.device.strip().lower()  # as --format: CPU, Cuda:0 are what they say
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
        def need(ok: bool, message: str, error: type[MixgenError] = UsageError) -> None:
            if not ok:
                raise error(message)

        need(self.pairs > 0, f"--pairs must be a positive integer, got {self.pairs}")
        need(self.pairs < 2**63, f"--pairs must be at most 2^63-1 (the manifest's int64 index), got {self.pairs}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        need(MIN_SIZE <= self.size <= MAX_SIZE, f"--size must be in {MIN_SIZE}..{MAX_SIZE} pixels, got {self.size}")
        unset = {f.name for f in dataclasses.fields(self) if f.default is None}  # None: not chosen (or not used)
        for name, flag in FLAGS.items():
            value = getattr(self, name)
            if flag.choices is not None and value not in flag.choices and not (name in unset and value is None):
                raise UsageError(f"--{name.replace('_', '-')} must be {_either(flag.choices)}, got {value!r}")
        need(self.codec == "cpu" or self.format == "jpg", "--codec cuda encodes JPEG only: use --format jpg")
        need(self.codec == "cpu" or self.device != "cpu", "--codec cuda needs a CUDA --device (auto, cuda or cuda:N)")
        need(1 <= self.quality <= 100, f"--quality must be in 1..100, got {self.quality}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}")
        need(
            bool(DEVICE_PATTERN.match(self.device)),
            f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        need(
            self.runtime != "onnxruntime" or not self.device.startswith("cuda"),
            "--runtime onnxruntime runs on the CPU: use --device cpu, or --runtime torch or auto with CUDA",
        )
        need(self.num_shards >= 1, f"--num-shards must be >= 1, got {self.num_shards}")
        need(
            0 <= self.shard_index < self.num_shards,
            f"--shard-index must be in 0..{self.num_shards - 1}, got {self.shard_index}",
        )
        for option, column in (("--path-column", self.path_column), ("--label-column", self.label_column)):
            need(isinstance(column, str) and bool(column.strip()), f"{option} must name a column, got {column!r}")
        need(
            self.classes is None or Path(self.classes).is_file(),
            f"--classes {self.classes}: no such file; pass a text file with one class name per line",
            MixgenError,  # a file the command line names is missing: a refusal (exit 1), as for SRC
        )
        method = self.declaration
        for option in method.options:
            need((problem := option.check(self.options[option.name])) is None, problem or "")
        need((problem := method.validate(self.options, self.size)) is None, problem or "")
        for option, path in (("--weights", self.weights), ("--checkpoint", self.checkpoint)):
            need(
                path is None or Path(path).is_file(),
                f"{option} {path}: no such file; pass a saved state dict",
                MixgenError,
            )
        if self.needs_maps:
            need(
                self.cam != "checkpoint" or self.checkpoint is not None,
                "--cam checkpoint needs --checkpoint FILE (a state dict fine-tuned on SRC's classes)",
            )
            need(
                MIN_CAM_SIZE <= self.cam_size <= MAX_SIZE,
                f"--cam-size must be in {MIN_CAM_SIZE}..{MAX_SIZE} pixels, got {self.cam_size}",
            )

    def source_options(self) -> dict[str, Any]:
        """The index-file options of ``sources.scan``."""
        return {"path_column": self.path_column, "label_column": self.label_column, "classes": self.classes}

    def scan_sources(self) -> SourceIndex:
        """SRC read with this run's layout, split and index-file options."""
        from mixgen.sources.scan import scan

        return scan(self.src, self.layout, self.split, **self.source_options())

    def output_settings(self) -> dict[str, Any]:
        """Every setting that determines the bytes written, as JSON-ready values."""
        settings = {}
        for setting in dataclasses.fields(self):
            if setting.name in EXECUTION_ONLY or setting.name == "options":
                continue
            value = getattr(self, setting.name)
            settings[setting.name] = str(value) if isinstance(value, Path) else value
        return {**settings, **self.options}

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
