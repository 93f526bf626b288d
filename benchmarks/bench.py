"""Throughput benchmark for mixgen (issue 3): mixgen vs a naive script, the codec limit and the bare backbone.

It builds its own synthetic dataset, then in one run (in rounds: mixgen, then its two references
right after it, so a shared machine's drift weighs on both sides of each ratio) measures

1. end to end: ``mixgen attentive|snapmix`` as a whole subprocess vs the naive per-pair script
   (``naive_attentive.py``) on the same data and output count, wall time, start-up included;
2. mix stage vs codec limit: mixgen's outputs/s once views and CAMs are ready vs bare JPEG encoding
   + writing of as many same-size images with a thread pool of the same size;
3. backbone pass: mixgen's sources/s in its backbone stage vs a bare forward of the same model at the
   same call size and input size, with the same threads;

plus the peak RSS of each subprocess. Numbers, not assertions: it prints a table (and ``--json``).

    python -m benchmarks.bench                      # CPU: 200 sources × 4 outputs at 224 px
    python -m benchmarks.bench --gpu                # issue 3 target 4 on a CUDA machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if not __package__:  # run as a file (python benchmarks/bench.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, mixgen_command
from mixgen.methods import BUILTIN

HERE = Path(__file__).resolve().parent
DATASET_VERSION = 1
TARGETS = {
    "end_to_end": 6.0,
    "mix_vs_codec": 0.5,
    "backbone": 0.85,
    "gpu_wall_s": 30.0,
    "gpu_rss_mb": 8000.0,
    "vs_torch_runtime": 1.3,  # issue 14: default (ONNX Runtime on a CPU) vs --runtime torch, end to end
    "weights_agree": 1e-4,  # issue 14: SnapMix weights under the two runtimes
}
BARE_CPU_CALLS = 24  # calls per bare-forward variant on a CPU
GPU_PRESET = {
    "sources": 11_788,
    "classes": 200,
    "method": "snapmix",
    "size": 448,
    "pairs": 50_000,
    "device": "cuda",
    "skip_naive": True,
    "rounds": 1,
}


# ---------------------------------------------------------------------------------------------
# The synthetic dataset: CUB-sized JPEGs whose classes differ in a way a CNN can see, so the probe,
# CAMs and attention grids do real work (a flat or pure-noise image would make JPEG and CAMs atypical).


def synth_image(seed: int, index: int, label: int) -> np.ndarray:
    """One deterministic ~500×375 RGB image: smooth background field + gradient, one textured object
    whose colour, shape and stripe texture depend on the class, and sensor-like noise."""
    rng = np.random.default_rng([seed, index])
    look = np.random.default_rng([seed, 1_000_000 + label])  # shared by every image of the class
    short = int(rng.integers(300, 460))
    w, h = (500, short) if rng.random() < 0.8 else (short, 500)
    # Background: a muted low-frequency colour field plus mid-frequency grey texture (foliage-like).
    low = rng.random((4, 5, 3)) * 255
    low = (0.45 * low + 0.55 * low.mean(axis=2, keepdims=True)).astype(np.uint8)
    mid = (rng.random((h // 12, w // 12)) * 255).astype(np.uint8)
    background = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    texture = np.asarray(Image.fromarray(mid).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    background += (texture[..., None] - 127.5) * 0.35
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    tilt = rng.normal(0.0, 0.15, 2).astype(np.float32)
    img = background + ((x * tilt[0] + y * tilt[1])[..., None] * rng.normal(0.0, 0.3, 3).astype(np.float32))

    colour = look.uniform(20, 235, 3).astype(np.float32)
    aspect, freq, angle = look.uniform(0.6, 1.7), look.uniform(0.08, 0.4), look.uniform(0, np.pi)
    radius = rng.uniform(0.12, 0.3) * min(w, h)
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    d2 = ((x - cx) / (radius * aspect)) ** 2 + ((y - cy) / (radius / aspect)) ** 2
    alpha = np.exp(-(d2**2))[..., None]  # super-Gaussian: a fairly sharp object edge
    stripes = 0.65 + 0.35 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
    img = img * (1 - alpha) + (colour * stripes[..., None]) * alpha
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * 6.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_source(task: tuple[Path, int, int, int]) -> None:
    path, seed, index, label = task
    Image.fromarray(synth_image(seed, index, label)).save(path, quality=90)


def build_dataset(root: Path, sources: int, classes: int, seed: int, jobs: int) -> tuple[Path, float, bool]:
    """ImageFolder ``root/class_XXX/img_XXXXX.jpg`` with labels i % classes, in a process pool of
    ``jobs`` (11,788 CUB-sized images: about half a minute on 16 cores).
    Reused when a finished one with the same parameters is there. Returns (root, seconds, reused)."""
    marker = root.with_name(root.name + ".json")
    wanted = {"version": DATASET_VERSION, "sources": sources, "classes": classes, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root, 0.0, True
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    for label in range(classes):
        (root / f"class_{label:03d}").mkdir(parents=True)
    tasks = [(root / f"class_{i % classes:03d}" / f"img_{i:05d}.jpg", seed, i, i % classes) for i in range(sources)]
    if jobs <= 1:
        for task in tasks:
            _write_source(task)
    else:
        with ProcessPoolExecutor(jobs) as pool:
            for _ in pool.map(_write_source, tasks, chunksize=max(1, min(64, sources // (4 * jobs)))):
                pass
    marker.write_text(json.dumps(wanted))
    return root, time.perf_counter() - started, False


# ---------------------------------------------------------------------------------------------
# Whole-process runs


@dataclass
class ProcessRun:
    command: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int


def timed_run(command: list[str], log: Path) -> ProcessRun:
    """Run a command, wall-timed from spawn to exit; peak RSS from os.wait4, which gives this child's
    own rusage (RUSAGE_CHILDREN would be the maximum over every child so far)."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcessRun(command, wall, usage.ru_maxrss / 1024, proc.returncode)


def check(run: ProcessRun, log: Path, what: str) -> None:
    if run.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"{what} failed (exit {run.returncode}): {shlex.join(run.command)}\n{tail}")


def summarise(values: list[float]) -> dict[str, Any]:
    """Median, lowest and highest of per-round values (``rounds``: all of them, sorted)."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "low": ordered[0], "high": ordered[-1], "rounds": ordered}


def paired_ratio(ours: list[float], references: list[float]) -> dict[str, Any]:
    """Median, lowest and highest of the per-round ratios ours[i] / references[i]. Each round
    measures mixgen and its reference back to back, so a shared machine's slow minutes weigh on
    both sides of a ratio instead of on one side of it."""
    return summarise([o / r for o, r in zip(ours, references, strict=True)])


def amdahl_ceiling(wall_s: float, stage_s: float, speedup: float) -> float:
    """How much faster a whole run of ``wall_s`` gets when only its ``stage_s`` runs ``speedup``×
    faster and everything else stays as it was: the most a faster runtime alone can give."""
    return wall_s / (wall_s - stage_s + stage_s / speedup)


# ---------------------------------------------------------------------------------------------
# In-process references: the codec limit and the bare backbone forward


def realistic_images(src: Path, count: int, size: int) -> list[np.ndarray]:
    """Up to 64 distinct S×S images that look like mixgen outputs: views of the synthetic sources with
    mixgen attentive's default top-k grid cells of another view pasted in (JPEG cost depends on
    content, so no random noise)."""
    from mixgen.methods import cell_edges, get_method
    from mixgen.sources.views import load_view

    paths = sorted(src.rglob("*.jpg"))[:64]
    views = [load_view(p, size) for p in paths]
    rng = np.random.default_rng(0)
    attentive = get_method("attentive").defaults()
    grid, top_k = attentive["grid"], attentive["top_k"]
    edges = cell_edges(grid, size)
    images = []
    for k in range(min(count, 64)):
        image = views[k % len(views)].copy()
        donor = views[(7 * k + 3) % len(views)]
        for cell in rng.choice(grid * grid, top_k, replace=False):
            r, c = divmod(int(cell), grid)
            image[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = donor[
                edges[r] : edges[r + 1], edges[c] : edges[c + 1]
            ]
        images.append(image)
    return images


def output_paths(directory: Path, count: int) -> list[Path]:
    """Where mixgen would write outputs 0..count-1 under ``directory`` (its shard folders and file
    names), with the folders made afresh."""
    from mixgen.config import RunConfig
    from mixgen.layout import image_name, shard_dir
    from mixgen.output.manifest import shard_count

    shard_size = RunConfig.shard_size  # mixgen's default --shard-size
    shutil.rmtree(directory, ignore_errors=True)
    for shard in range(shard_count(count, shard_size)):
        shard_dir(directory, shard).mkdir(parents=True)
    return [shard_dir(directory, i // shard_size) / image_name(i, "jpg") for i in range(count)]


def codec_limit(images: list[np.ndarray], count: int, workers: int, quality: int, directory: Path) -> float:
    """Seconds to JPEG-encode (mixgen's own encoder settings) and write ``count`` images with a
    ThreadPoolExecutor of ``workers`` threads, in mixgen's shard folder layout."""
    from mixgen.pipeline.encode import encode

    paths = output_paths(directory, count)

    def encode_write(i: int) -> None:
        paths[i].write_bytes(encode(images[i % len(images)], "jpg", quality))

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(encode_write, range(count)):
            pass
    seconds = time.perf_counter() - started
    shutil.rmtree(directory, ignore_errors=True)
    return seconds


def gpu_codec_limit(images: list[np.ndarray], count: int, workers: int, quality: int, directory: Path) -> dict:
    """Seconds to encode ``count`` images with mixgen's ``--codec cuda`` encoder (torchvision's
    nvJPEG, batches of 64 already on the GPU, one calling thread: torchvision's GPU codec is not
    thread-safe) and write the bytes with a ``workers`` thread pool: the alternative to the CPU pool
    that issue 3 asks about. Its chroma subsampling is nvJPEG's default, not mixgen's 4:4:4 at
    quality ≥ 90."""
    import torch

    from mixgen.pipeline.encode import encode_jpeg_cuda

    device = torch.device("cuda")
    on_gpu = [torch.from_numpy(image).permute(2, 0, 1).contiguous().to(device) for image in images]
    paths = output_paths(directory, count)
    encode_jpeg_cuda(torch.stack(on_gpu[:2]), quality)  # warm-up: nvJPEG handle creation
    torch.cuda.synchronize()
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, count, 64):
            batch = torch.stack([on_gpu[i % len(on_gpu)] for i in range(start, min(count, start + 64))])
            for offset, data in enumerate(encode_jpeg_cuda(batch, quality)):
                pool.submit(paths[start + offset].write_bytes, data)
    seconds = time.perf_counter() - started
    shutil.rmtree(directory, ignore_errors=True)
    return {"images": count, "seconds": seconds, "rate": count / seconds}


def runtime_of(variant: str) -> str:
    """The runtime a bare-forward variant name belongs to."""
    return "onnxruntime" if variant.startswith("onnxruntime") else "torch"


def best_bare_backbone(
    images: int, batch_size: int, cam_size: int, device_name: str, only: list[str] | None = None
) -> dict[str, Any]:
    """The fastest bare forward over the batch sizes mixgen might use: its --batch-size and the
    fixed size of its backbone calls (small batches run faster on a CPU), under PyTorch and (on a
    CPU) ONNX Runtime. ``only`` (variants such as "mixgen/channels_last/batch 1" that an earlier
    round found fastest, one per runtime) measures those alone."""
    import torch

    from mixgen.cam.cams import micro_batch

    wanted: dict[int, set[str] | None] = dict.fromkeys(
        sorted({batch_size, micro_batch(torch.device(device_name), cam_size)})
    )
    if only:
        wanted = {}
        for name in only:
            variant, size = name.rsplit("/batch ", 1)
            wanted.setdefault(int(size), set()).add(variant)
    results = []
    for size, variants in wanted.items():
        print(f"bare backbone forward: {images:,} images, batch {size}, {cam_size} px", flush=True)
        result = bare_backbone(images, size, cam_size, device_name, variants)
        result["rates"] = {f"{name}/batch {size}": rate for name, rate in result["rates"].items()}
        result["variant"] = f"{result['variant']}/batch {size}"
        results.append(result)
    best = max(results, key=lambda r: r["rate"])
    best["rates"] = {name: rate for r in results for name, rate in r["rates"].items()}
    best["by_runtime"] = {}
    for name, rate in sorted(best["rates"].items(), key=lambda item: -item[1]):
        best["by_runtime"].setdefault(runtime_of(name), {"variant": name, "rate": rate})
    best["onnx_note"] = next((r["onnx_note"] for r in results if r.get("onnx_note")), None)
    return best


def bare_backbone(
    images: int, batch_size: int, cam_size: int, device_name: str, only: set[str] | None = None
) -> dict[str, Any]:
    """Bare forward rate of the embedded backbone on random input: eval + inference_mode, same batch
    size and input side as mixgen, this process's default threads (bf16 autocast on CUDA, as mixgen).

    The reference is the fastest of several variants, so that target 3 measures the pipeline around
    the forward pass, not model tricks: both memory layouts (channels_last makes EfficientNet's
    depthwise convolutions several times faster on CPU), mixgen's own inference copy of the model
    (``fast_inference_copy``, BatchNorm folded) and, on a CPU, that copy's ONNX model run by ONNX
    Runtime (``session.run`` on a ready array of the NHWC pixel values the model takes (it
    normalises them in its graph), one intra-op thread per core as mixgen runs it;
    the model comes from mixgen's ONNX cache, exported there if missing). Each runs as many
    batches as mixgen needs for ``images`` sources (on a CPU at most BARE_CPU_CALLS) after a
    warm-up; on CPU the rate comes from the median batch, so a neighbour's burst on a shared
    machine does not skew it."""
    import contextlib

    import torch

    from mixgen.cam import backbones

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    plain = backbones.load_backbone("efficientnet_lite0")
    models = {"plain": plain, "mixgen": backbones.fast_inference_copy(plain)}
    batches = max(1, math.ceil(images / batch_size))
    if not cuda:  # the rate is the median call's: two dozen calls give it, the slow variants spare minutes
        batches = min(batches, BARE_CPU_CALLS)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    rates, warmup = {}, {}
    layouts = (torch.contiguous_format, torch.channels_last)
    for (model_name, backbone), layout in itertools.product(models.items(), layouts):
        name = f"{model_name}/{str(layout).removeprefix('torch.').removesuffix('_format')}"
        if only and name not in only:
            continue
        backbone.model.to(device, memory_format=layout).eval()
        x = torch.randn(batch_size, 3, cam_size, cam_size, device=device).contiguous(memory_format=layout)
        times = []
        with torch.inference_mode(), autocast:
            started = time.perf_counter()
            for _ in range(3 if cuda else 1):
                backbone.features(x)
            if cuda:
                torch.cuda.synchronize(device)
            warmup[name] = time.perf_counter() - started  # kernel selection: not part of the rate
            started = time.perf_counter()
            for _ in range(batches):
                backbone.features(x)
                times.append(time.perf_counter())
            if cuda:
                torch.cuda.synchronize(device)
        if cuda:
            rates[name] = batches * batch_size / (time.perf_counter() - started)
        else:
            per_batch = np.diff([started, *times])
            rates[name] = batch_size / statistics.median(per_batch)
    onnx_note = None
    if not cuda and (not only or "onnxruntime" in only):
        from mixgen.cam.onnx_runtime import cam_pass_backbone

        inference = models["mixgen"].to(device)
        runner, report = cam_pass_backbone(inference, "onnxruntime", device, cam_size, os.cpu_count() or 1)
        if report.name == "onnxruntime":
            session, feed = runner.features.session, runner.features.input
            # The model's own input: NHWC pixel values, normalised inside its graph.
            x = np.random.default_rng(0).uniform(0, 255, (batch_size, cam_size, cam_size, 3)).astype(np.float32)
            started = time.perf_counter()
            session.run(None, {feed: x})
            warmup["onnxruntime"] = time.perf_counter() - started
            started = time.perf_counter()
            times = []
            for _ in range(batches):
                session.run(None, {feed: x})
                times.append(time.perf_counter())
            rates["onnxruntime"] = batch_size / statistics.median(np.diff([started, *times]))
        else:
            onnx_note = report.note
    best = max(rates, key=rates.get)
    return {
        "images": batches * batch_size,
        "rates": rates,
        "warmup_s": warmup,
        "rate": rates[best],
        "variant": best,
        "torch_threads": torch.get_num_threads(),
        "onnx_note": onnx_note,
    }


# ---------------------------------------------------------------------------------------------
# Report


def ratio_row(
    name: str,
    ours: float | None,
    ref: float | None,
    ref_name: str,
    ratio: Any,
    target: float | None,
    times: bool = False,
) -> str:
    """One table row; ``ratio`` is a number (shown as ×) or a paired_ratio dict (shown as %, or as ×
    with ``times``); no verdict without a ``target``."""
    if ours is None or ref is None or ratio is None:
        return f"{name:<38} {'-' if ours is None else f'{ours:,.1f}':>10} {'skipped':>12}"
    if isinstance(ratio, dict) and times:
        shown, goal, value = f"{ratio['median']:.2f}×", f"≥ {target or 0:g}×", ratio["median"]
        spread = f"  (rounds {', '.join(f'{r:.2f}×' for r in ratio['rounds'])})" if len(ratio["rounds"]) > 1 else ""
    elif isinstance(ratio, dict):
        shown, goal, value = f"{ratio['median']:.0%}", f"≥ {target or 0:.0%}", ratio["median"]
        spread = f"  (rounds {', '.join(f'{r:.0%}' for r in ratio['rounds'])})" if len(ratio["rounds"]) > 1 else ""
    else:
        shown, goal, value, spread = f"{ratio:.2f}×", f"≥ {target or 0:g}×", ratio, ""
    if target is None:
        goal, verdict = "", ""
    else:
        verdict = "ok" if value >= target else "BELOW"
    return f"{name:<38} {ours:>10,.1f} {ref:>12,.1f}  {ref_name:<10} {shown:>7}  {goal:<6} {verdict}{spread}"


def print_report(result: dict[str, Any]) -> None:
    cfg, mixgen, ratios = result["config"], result["mixgen"], result["ratios"]
    timings = mixgen["timings"]
    print()
    print(
        f"mixgen {cfg['method']}: {cfg['sources']:,} sources / {cfg['classes']} classes → {cfg['pairs']:,} outputs "
        f"at {cfg['size']} px, device {cfg['device']}, {cfg['workers']} workers, "
        f"batch {mixgen['batch_size']}, torch threads {result['backbone'].get('torch_threads', '-')}, "
        f"CAM pass runtime {mixgen['runtime'].get('name', '-')}, {cfg['rounds']} round(s)"
    )
    print(f"machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, {result['machine']['gpu']}")
    print()
    stages = ["scan_s", "load_s", "decode_s", "backbone_s", "probe_s", "mix_stage_s", "total_s"]
    shown = [f"{k.removesuffix('_s')} {timings[k]:.2f}" for k in stages if k in timings]
    shown += [f"{k.removesuffix('_s')} {v:.2f}" for k, v in timings.items() if k not in stages]
    print("median mixgen run, stage timings, s (OUT/mixgen.json): " + ", ".join(shown))
    startup = mixgen["wall_s"] - timings["total_s"]
    print(f"mixgen process wall {mixgen['wall_s']:.2f} s, of which start-up before run(): {startup:.2f} s")
    measured = sum(
        timings.get(k, 0.0) for k in ("scan_s", "load_s", "decode_s", "backbone_s", "probe_s", "mix_stage_s")
    )
    print(f"rest of run() (importing torch, set-up; total − stages): {timings['total_s'] - measured:.2f} s")
    print()
    print(f"{'measure':<38} {'mixgen':>10} {'reference':>12}  {'':<10} {'ratio':>7}  target")
    naive = result.get("naive")
    print(
        ratio_row(
            "1 end to end, outputs/s (wall)",
            mixgen["median_rate"],
            naive["rate"] if naive else None,
            "naive",
            ratios["end_to_end"],
            TARGETS["end_to_end"],
        )
    )
    codec = result["codec"]
    print(
        ratio_row(
            "2 mix stage vs codec limit, outputs/s",
            mixgen["mix_rate"],
            codec["rate"],
            "bare JPEG",
            ratios["mix_vs_codec"],
            TARGETS["mix_vs_codec"],
        )
    )
    bare = result["backbone"]
    print(
        ratio_row(
            "3 backbone pass, sources/s",
            mixgen["backbone_rate"],
            bare.get("rate"),
            "bare fwd",
            ratios["backbone"],
            TARGETS["backbone"],
        )
    )
    if bare["rates"]:
        for runtime, best in result["bare_by_runtime"].items():
            shown = f"{best['median_rate']:,.1f} ({best['variant']})"
            print(f"{'  bare forward, ' + runtime + ', images/s':<38} {'':>10} {shown}")
        if bare.get("onnx_note"):
            print(f"  {bare['onnx_note']}")
        variants = ", ".join(f"{k} {v:,.1f}" for k, v in result["rounds"][0]["backbone"]["rates"].items())
        print(f"  bare forward variants in round 1, images/s (the fastest is the reference): {variants}")
    if result["torch_runtime"]:
        versus = result["torch_runtime"]
        compared = result["config"]["compare"]
        runtime = result["config"]["compare_runtime"]  # issue 14's targets apply to this comparison
        label = "torch" if runtime else "compared"
        print(f"  row 5 compares the default run with the same command plus {compared}")
        print(
            ratio_row(
                "5 end to end vs --runtime torch, out/s" if runtime else "5 end to end vs compared, out/s",
                mixgen["median_rate"],
                versus["median_rate"],
                label,
                ratios["vs_torch_runtime"],
                TARGETS["vs_torch_runtime"] if runtime else None,
                times=True,
            )
        )
        print(
            ratio_row(
                "  backbone stage vs --runtime torch" if runtime else "  backbone stage vs compared",
                mixgen["backbone_rate"],
                versus["median_backbone_rate"],
                label,
                ratios["backbone_vs_torch_runtime"],
                1.0 if runtime else None,
                times=True,
            )
        )
        for key, what in (("ceiling_stage", "stage ratio"), ("ceiling_bare", "bare ratio")):
            if key in ratios:
                rounds_shown = ", ".join(f"{r:.2f}×" for r in ratios[key]["rounds"])
                print(
                    f"{'  5 ceiling at the ' + what:<38} {'':>10} {'':>12}  {'':<10} "
                    f"{ratios[key]['median']:>6.2f}×          (rounds {rounds_shown})"
                )
        diff = ratios["weights_max_abs_diff"]
        if runtime:
            verdict = "ok" if diff <= TARGETS["weights_agree"] else "BELOW"
            blank = f"{'':>12}  {'':<10} {'':>7}"
            print(f"{'  weights, max |Δ| between runtimes':<38} {diff:>10.2e} {blank}  ≤ 1e-4  {verdict}")
        else:
            print(f"{'  weights, max |Δ| between the runs':<38} {diff:>10.2e}")
        shown = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in versus["timings"].items() if k.endswith("_s"))
        print(f"  {compared} run of the median round, stage timings, s: {shown}")
    gpu = codec.get("gpu")
    if gpu:
        shown = f"{gpu['rate']:,.1f}/s vs CPU pool {codec['rate']:,.1f}/s" if "rate" in gpu else gpu["error"]
        print(f"{'  GPU JPEG encode (nvJPEG) + write':<38} {shown}")
    rss_naive = f"{naive['peak_rss_mb']:>12,.0f}  naive" if naive else f"{'skipped':>12}"
    print(f"{'peak RSS, MB (highest round)':<38} {mixgen['peak_rss_mb']:>10,.0f} {rss_naive}")
    if cfg["preset"] == "gpu":
        wall_ok = "ok" if mixgen["wall_s"] <= TARGETS["gpu_wall_s"] else "BELOW"
        rss_ok = "ok" if mixgen["peak_rss_mb"] <= TARGETS["gpu_rss_mb"] else "BELOW"
        print(
            f"{'4 GPU end to end wall, s':<38} {mixgen['wall_s']:>10,.1f} {'':>12}  {'':<10} {'':>7}  ≤ 30 s  {wall_ok}"
        )
        print(f"{'  peak RSS, MB':<38} {mixgen['peak_rss_mb']:>10,.0f} {'':>12}  {'':<10} {'':>7}  < 8 GB  {rss_ok}")
    print()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="Issue 3 target 4: --sources 11788 --classes 200 --method snapmix --size 448 --pairs 50000 "
        "--device cuda --skip-naive --rounds 1 (options given explicitly win).",
    )
    parser.add_argument("--sources", type=int, default=None, help="Synthetic source images (default 200).")
    parser.add_argument("--classes", type=int, default=None, help="Class folders (default 10).")
    parser.add_argument("--outputs-per-source", type=int, default=4, help="Outputs = sources × this, unless --pairs.")
    parser.add_argument("--pairs", type=int, default=None, help="Number of outputs (overrides --outputs-per-source).")
    parser.add_argument("--size", type=int, default=None, help="View / output side in px (default 224).")
    parser.add_argument("--method", choices=BUILTIN, default=None, help="mixgen command (default attentive)")
    parser.add_argument("--device", default=None, help="mixgen --device: cpu (default) or cuda[:n].")
    parser.add_argument(
        "--workers", type=int, default=None, help="mixgen --workers and codec threads (default: all cores)."
    )
    parser.add_argument("--batch-size", type=int, default=None, help="mixgen --batch-size (default: mixgen's).")
    parser.add_argument("--mixgen-args", default="", help="Extra mixgen options, one shell-quoted string.")
    parser.add_argument("--skip-naive", action="store_true", default=None, help="Do not run the naive script.")
    parser.add_argument(
        "--compare-runtime",
        action="store_true",
        help="Also run mixgen with --runtime torch in every round (order alternating) and compare it with the "
        "default run: end to end, backbone stage and the largest difference of the SnapMix weights.",
    )
    parser.add_argument(
        "--compare-args",
        default="",
        help="Like --compare-runtime, for any other mixgen options (one shell-quoted string, e.g. "
        '"--cam-size 512"): every round also runs mixgen with them added, and row 5 compares the two runs.',
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="Rounds of mixgen + its two references, back to back (default 3; 1 with --gpu).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Dataset seed.")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Processes building the dataset.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mixgen-bench",
        help="Datasets (reused) and outputs.",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the outputs of mixgen and the naive script.")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="Also write the results as JSON.")
    args = parser.parse_args(argv)
    defaults = {
        "sources": 200,
        "classes": 10,
        "size": 224,
        "method": "attentive",
        "device": "cpu",
        "skip_naive": False,
        "rounds": 3,
    }
    for key, value in {**defaults, **(GPU_PRESET if args.gpu else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pairs is None:
        args.pairs = args.sources * args.outputs_per_source
    args.workers = args.workers or os.cpu_count() or 1
    if args.compare_runtime and args.compare_args:
        parser.error("--compare-runtime and --compare-args each name the compared run: give one")
    args.compare = "--runtime torch" if args.compare_runtime else args.compare_args or None
    return args


def manifest_weights(out: Path) -> np.ndarray:
    """(pairs, 2) weight_a, weight_b of a run's outputs in index order."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["index", "weight_a", "weight_b"]) for p in sorted(out.glob("data/*/*.parquet"))]
    rows = sorted((i, a, b) for t in tables for i, a, b in zip(*t.to_pydict().values(), strict=True))
    return np.array([(a, b) for _, a, b in rows], dtype=np.float64)


def run_mixgen(args: argparse.Namespace, src: Path, work: Path, compared: str | None = None) -> dict[str, Any]:
    """One whole mixgen process on ``src``; its wall time, peak RSS and run record. ``compared``:
    the extra options of the compared run (None: the default run); with a comparison the weights
    are kept."""
    out = work / ("mixgen-out" if compared is None else "mixgen-out-compared")
    shutil.rmtree(out, ignore_errors=True)
    command = mixgen_command(args.method, src, out)
    command += ["--pairs", str(args.pairs), "--size", str(args.size), "--device", args.device]
    command += ["--workers", str(args.workers), "--json"]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    command += shlex.split(args.mixgen_args)
    if compared is not None:
        command += shlex.split(compared)
    print(f"running {shlex.join(command)}", flush=True)
    log = work / "mixgen.log"
    run = timed_run(command, log)
    check(run, log, "mixgen")
    record = json.loads((out / "mixgen.json").read_text())
    timings, counts = record["timings"], record["counts"]
    weights = manifest_weights(out) if args.compare else None
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {
        **asdict(run),
        "rate": counts["written"] / run.wall_s,
        "timings": timings,
        "counts": counts,
        "batch_size": record["config"]["batch_size"],
        "cam_size": record["config"].get("cam_size") or args.size,
        "quality": record["config"].get("quality", 95),
        "mix_stage_s": timings["mix_stage_s"],
        "mix_rate": counts["written"] / timings["mix_stage_s"],
        "backbone_rate": counts["readable_sources"] / timings["backbone_s"] if timings.get("backbone_s") else None,
        "probe": record.get("probe"),
        "runtime": record.get("runtime") or {},
        "weights": weights,
    }


def compare_runtimes(
    default: dict[str, Any], torch_run: dict[str, Any], bare: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One round's default run (ONNX Runtime on a CPU) against its ``--runtime torch`` twin. With
    the round's bare forward of both runtimes (``bare``, its ``by_runtime``), also row 5's
    ceilings: the torch run with only its backbone stage made as fast as the default run's is
    (``ceiling_stage``), or as the bare ONNX Runtime forward is over PyTorch's (``ceiling_bare``)."""
    weights = torch_run.pop("weights")
    backbone = default["backbone_rate"] / torch_run["backbone_rate"]
    compared = {
        "runtime": default["runtime"].get("name"),
        "rate": torch_run["rate"],
        "wall_s": torch_run["wall_s"],
        "backbone_rate": torch_run["backbone_rate"],
        "timings": torch_run["timings"],
        "end_to_end": default["rate"] / torch_run["rate"],
        "backbone": backbone,
        "weights_max_abs_diff": float(np.abs(default["weights"] - weights).max()),
    }
    if bare is not None and {"torch", "onnxruntime"} <= bare.get("by_runtime", {}).keys():
        by_runtime = bare["by_runtime"]
        for key, speedup in (
            ("ceiling_stage", backbone),
            ("ceiling_bare", by_runtime["onnxruntime"]["rate"] / by_runtime["torch"]["rate"]),
        ):
            compared[key] = amdahl_ceiling(torch_run["wall_s"], torch_run["timings"]["backbone_s"], speedup)
    return compared


def measure_references(
    args: argparse.Namespace, src: Path, work: Path, mixgen: dict[str, Any], only: list[str] | None
) -> dict[str, Any]:
    """The round's bare JPEG encode + write and bare backbone forward, at mixgen's settings."""
    print(f"bare JPEG encode + write of {args.pairs:,} images at {args.size} px, {args.workers} threads", flush=True)
    images = realistic_images(src, args.pairs, args.size)
    seconds = codec_limit(images, args.pairs, args.workers, mixgen["quality"], work / "codec-out")
    codec = {"images": args.pairs, "seconds": seconds, "rate": args.pairs / seconds, "threads": args.workers}
    backbone = None
    if mixgen["backbone_rate"]:
        readable = mixgen["counts"]["readable_sources"]
        backbone = best_bare_backbone(readable, mixgen["batch_size"], mixgen["cam_size"], args.device, only)
    return {"codec": codec, "backbone": backbone}


def cam_sizes(args: argparse.Namespace) -> list[int]:
    """The CAM sides the runs will use: the view's, or each --cam-size their options give."""
    sides = []
    for extra in (args.mixgen_args, args.mixgen_args + " " + (args.compare or "")):
        tokens = shlex.split(extra)
        given = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == "--cam-size"]
        sides.append(int(given[-1]) if given else args.size)
    return sorted(set(sides))


def fill_onnx_cache(cam_size: int) -> dict[str, Any]:
    """Export the embedded backbone's ONNX model into mixgen's cache unless it is there: a user pays
    the export once, so no round should (round 1 would otherwise, inside its load stage)."""
    import torch

    from mixgen.cam.backbones import fast_inference_copy, load_backbone
    from mixgen.cam.onnx_runtime import cam_pass_backbone

    backbone = fast_inference_copy(load_backbone("efficientnet_lite0"))
    _, report = cam_pass_backbone(backbone, "onnxruntime", torch.device("cpu"), cam_size, os.cpu_count() or 1)
    return report.as_record()


def measure_gpu_codec(args: argparse.Namespace, src: Path, work: Path, quality: int) -> dict[str, Any]:
    print(f"GPU JPEG encode (torchvision nvJPEG) + write of {args.pairs:,} images", flush=True)
    images = realistic_images(src, args.pairs, args.size)
    try:
        return gpu_codec_limit(images, args.pairs, args.workers, quality, work / "codec-out")
    except Exception as exc:  # noqa: BLE001 - a reference number, not the run: report and go on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def run_naive(args: argparse.Namespace, src: Path, work: Path) -> dict[str, Any]:
    naive_out = work / "naive-out"
    shutil.rmtree(naive_out, ignore_errors=True)
    command = [sys.executable, str(HERE / "naive_attentive.py"), str(src), str(naive_out)]
    command += ["--pairs", str(args.pairs), "--size", str(args.size), "--device", args.device]
    print(f"running {shlex.join(command)}", flush=True)
    log = work / "naive.log"
    run = timed_run(command, log)
    check(run, log, "naive script")
    if not args.keep:
        shutil.rmtree(naive_out, ignore_errors=True)
    return {**asdict(run), "rate": args.pairs / run.wall_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, build_s, reused = build_dataset(
        work / f"src-{args.sources}-{args.classes}-{args.seed}", args.sources, args.classes, args.seed, args.jobs
    )
    print(f"dataset {src}: {'reused' if reused else f'built in {build_s:.1f} s'}", flush=True)

    # Each round runs mixgen, then its two references right after it: targets 2 and 3 are
    # per-round ratios, and the report gives their median. The references run in a helper process
    # started now, while this one is small: a child's peak RSS (wait4) counts its parent's at fork.
    rounds: list[dict[str, Any]] = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as helper:
        for side in [] if args.device.startswith("cuda") else cam_sizes(args):
            onnx = helper.submit(fill_onnx_cache, side).result()
            what = f"exported in {onnx['export_s']:.1f} s" if onnx["exported"] else "already cached"
            print(f"ONNX model for {side} px: {what}" + (f" ({onnx['note']})" if onnx["note"] else ""), flush=True)
        for number in range(1, args.rounds + 1):
            print(f"round {number} of {args.rounds}", flush=True)
            # With --compare-runtime, mixgen runs twice (default, then --runtime torch, the order
            # swapped every round), and the round's ratio pairs the two.
            order = [None, args.compare] if args.compare else [None]
            runs = {which: run_mixgen(args, src, work, which) for which in (order if number % 2 else order[::-1])}
            mixgen = runs[None]
            only = None
            if rounds and rounds[0]["backbone"]:
                only = [best["variant"] for best in rounds[0]["backbone"]["by_runtime"].values()]
            references = helper.submit(measure_references, args, src, work, mixgen, only).result()
            round_result = {"mixgen": mixgen, **references}
            if args.compare:
                bare = references["backbone"] if args.compare_runtime else None
                round_result["torch_runtime"] = compare_runtimes(mixgen, runs[args.compare], bare)
            rounds.append(round_result)
        naive = None if args.skip_naive else run_naive(args, src, work)
        gpu_codec = None
        if args.device.startswith("cuda"):
            gpu_codec = helper.submit(measure_gpu_codec, args, src, work, rounds[0]["mixgen"]["quality"]).result()

    for r in rounds:
        r["mixgen"].pop("weights", None)
    walls = [r["mixgen"]["wall_s"] for r in rounds]
    typical = rounds[walls.index(statistics.median_low(walls))]  # the median run, shown in full
    mixgen_rate = statistics.median(r["mixgen"]["rate"] for r in rounds)
    ratios = {
        "end_to_end": mixgen_rate / naive["rate"] if naive else None,
        "mix_vs_codec": paired_ratio([r["mixgen"]["mix_rate"] for r in rounds], [r["codec"]["rate"] for r in rounds]),
        "backbone": paired_ratio(
            [r["mixgen"]["backbone_rate"] for r in rounds], [r["backbone"]["rate"] for r in rounds]
        )
        if typical["backbone"]
        else None,
    }
    if args.compare:
        versus = [r["torch_runtime"] for r in rounds]
        ratios["vs_torch_runtime"] = summarise([v["end_to_end"] for v in versus])
        ratios["backbone_vs_torch_runtime"] = summarise([v["backbone"] for v in versus])
        ratios["weights_max_abs_diff"] = max(v["weights_max_abs_diff"] for v in versus)
        for key in ("ceiling_stage", "ceiling_bare"):
            if all(key in v for v in versus):
                ratios[key] = summarise([v[key] for v in versus])
    bare_by_runtime = {}
    if typical["backbone"]:
        for runtime in typical["backbone"]["by_runtime"]:
            measured = [
                r["backbone"]["by_runtime"][runtime]["rate"] for r in rounds if runtime in r["backbone"]["by_runtime"]
            ]
            bare_by_runtime[runtime] = {
                "median_rate": statistics.median(measured),
                "variant": typical["backbone"]["by_runtime"][runtime]["variant"],
            }
    result = {
        "config": {
            "preset": "gpu" if args.gpu else "cpu",
            "method": args.method,
            "sources": args.sources,
            "classes": args.classes,
            "pairs": args.pairs,
            "size": args.size,
            "cam_size": typical["mixgen"]["cam_size"],
            "device": args.device,
            "workers": args.workers,
            "rounds": args.rounds,
            "mixgen_args": args.mixgen_args,
            "compare_runtime": args.compare_runtime,
            "compare": args.compare,
        },
        "machine": machine(args.device),
        "dataset": {"path": str(src), "build_s": build_s, "reused": reused},
        "mixgen": {
            **typical["mixgen"],
            "median_rate": mixgen_rate,
            "peak_rss_mb": max(r["mixgen"]["peak_rss_mb"] for r in rounds),
        },
        "naive": naive,
        "codec": {**typical["codec"], "gpu": gpu_codec},
        "backbone": typical["backbone"] or {"rates": {}},
        "bare_by_runtime": bare_by_runtime,
        "torch_runtime": (
            {
                "median_rate": statistics.median(r["torch_runtime"]["rate"] for r in rounds),
                "median_backbone_rate": statistics.median(r["torch_runtime"]["backbone_rate"] for r in rounds),
                "timings": typical["torch_runtime"]["timings"],
            }
            if args.compare
            else None
        ),
        "rounds": rounds,
        "ratios": ratios,
        "targets": TARGETS,
    }
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
