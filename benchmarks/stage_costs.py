"""Per-source (and per-output) CPU cost of each stage of a SnapMix run at one size, measured in
CPU seconds (``time.process_time``: every thread of this process, so a loaded machine inflates
them far less than wall time): decode (a CUB-sized JPEG to its S×S view), backbone (the CAM
pass's features, ONNX Runtime on the CPU as ``--runtime auto`` picks), probe (the full-batch fit,
per source of the features it is fitted on), mix (SnapMix's batch) and encode (JPEG q95). The
1M/14M-source plan in docs/operations.md is built from these.

    python -m benchmarks.stage_costs --size 224 --sources 256 --json benchmarks/results/stage_costs_224.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a file (python benchmarks/stage_costs.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common


def cpu() -> float:
    return time.process_time()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.bench import build_dataset
    from mixgen.config import RunConfig
    from mixgen.device import MIX_THREADS, torch_threads
    from mixgen.files import allocate
    from mixgen.output.cache import RecordFile
    from mixgen.pipeline.campass import CamPass
    from mixgen.pipeline.encode import encode_output, to_encode
    from mixgen.pipeline.mixing import MixContext, mix_batch
    from mixgen.pipeline.plan import Pairing, mix_batch_size, plan_outputs
    from mixgen.pipeline.prepare import Prepared
    from mixgen.sources.views import load_source_view

    work = Path(tempfile.mkdtemp(prefix="stage-costs-"))
    src, _, _ = build_dataset(work / "src", args.sources, args.classes, 0, os.cpu_count() or 1)
    cfg = RunConfig("snapmix", src, work / "out", size=args.size, device="cpu", pairs=args.outputs).resolve()
    index = cfg.scan_sources()
    n, size = len(index), cfg.size
    load = os.getloadavg()

    began, wall = cpu(), time.perf_counter()
    views = np.stack([load_source_view(index, item, size, cfg.resize) for item in index.items])
    decode = (cpu() - began) / n, (time.perf_counter() - wall) / n

    device = torch.device("cpu")
    campass = CamPass(cfg, len(index.classes), device)
    campass.features(views[:8])  # warm-up: the runtime's first call
    began, wall = cpu(), time.perf_counter()
    fmaps = [campass.features(views[start : start + 32]) for start in range(0, n, 32)]
    backbone = (cpu() - began) / n, (time.perf_counter() - wall) / n
    fmap = torch.cat(fmaps)
    pooled = fmap.mean(dim=(2, 3))
    labels = torch.tensor([item.label for item in index.items])
    # The fit is full-batch: its cost grows with the rows. Fit on the features repeated (with a
    # little noise) to args.probe_rows rows, as a larger source set would be.
    reps = -(-args.probe_rows // n)
    rows = pooled.repeat(reps, 1)[: args.probe_rows]
    rows = rows + 0.01 * torch.randn_like(rows)
    began, wall = cpu(), time.perf_counter()
    campass.fit_probe(rows, labels.repeat(reps)[: args.probe_rows], len(index.classes))
    probe = (cpu() - began) / args.probe_rows, (time.perf_counter() - wall) / args.probe_rows
    maps = campass.maps(fmap, labels, torch.from_numpy(views)).cpu().numpy()

    path = work / "views.u8"
    allocate(path, n * size * size * 3)
    records = RecordFile(path, n, (size, size, 3), np.uint8)
    for position in range(n):
        records.write(position, views[position])
    prepared = Prepared(records, np.ones(n, dtype=bool), [], maps)
    ctx = MixContext(cfg, index, np.arange(n), prepared, device, lambda i: f"{i}.jpg")
    pairing = Pairing(labels.numpy(), cfg.pairing)
    batch = mix_batch_size(cfg)
    mix_cpu = encode_cpu = mix_wall = encode_wall = 0.0
    with torch_threads(MIX_THREADS):
        for start in range(0, args.outputs, batch):
            planned = plan_outputs(cfg, pairing, start, min(start + batch, args.outputs))
            began, wall = cpu(), time.perf_counter()
            images, _ = mix_batch(ctx, planned)
            arrays = to_encode(images, cfg)
            mix_cpu += cpu() - began
            mix_wall += time.perf_counter() - wall
            began, wall = cpu(), time.perf_counter()
            sizes = [len(encode_output(image, cfg.format, cfg.quality)) for image in arrays]
            encode_cpu += cpu() - began
            encode_wall += time.perf_counter() - wall
    records.close()
    per = {
        "decode_per_source": decode,
        "backbone_per_source": backbone,
        "probe_per_source": probe,
        "mix_per_output": (mix_cpu / args.outputs, mix_wall / args.outputs),
        "encode_per_output": (encode_cpu / args.outputs, encode_wall / args.outputs),
    }
    return {
        "machine": common.machine("cpu"),
        "load_before": load,
        "load_after": os.getloadavg(),
        "setup": {
            "size": size,
            "sources": n,
            "outputs": args.outputs,
            "probe_rows": args.probe_rows,
            "runtime": campass.runtime.name,
            "feature_shape": list(fmap.shape[1:]),
            "jpeg_bytes_per_output": int(np.mean(sizes)),
        },
        "seconds": {name: {"cpu": round(c, 5), "wall": round(w, 5)} for name, (c, w) in per.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sources", type=int, default=256)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--probe-rows", type=int, default=4096)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
