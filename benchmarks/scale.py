"""Scaling out one job (issue 23 phase 2): the source stage shared by the workers of a job.

In rounds, paired (the machine's drift weighs on both sides of each ratio), on one OUT per run:

1. one process with two threads (``--workers 2``);
2. two workers of one job started together (``--num-shards 2``), one thread each
   (``--workers 1``, ``OMP_NUM_THREADS=1`` as torchrun sets it);
3. with ``--baseline REPO``: the same two workers running the mixgen of REPO (e.g. the code before
   the source stage was shared), for the "today" figure.

It prints each worker's stage times from its run record, checks that the workers together ran
the backbone over every source exactly once and that their outputs are those of the single
process, then models N workers from the measured stage times (4 workers of one thread on a
4-core budget; 8 GPUs on full CUB under stated assumptions) and gives the caches' memory and
disk per source at 224 and 448 px and the largest source count this machine's disk and memory hold.

    python -m benchmarks.scale                          # 200 CUB photos (or synthetic), SnapMix 448 px
    python -m benchmarks.scale --json scale.json --rounds 3 --baseline /path/to/older/mixgen
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/scale.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

HERE = Path(__file__).resolve().parent
CUB = Path("/work/data/cub-dev")
# Assumptions of the GPU prediction, each with its source (see benchmarks/README.md):
# timm's results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv: efficientnet_lite0 at 224 px,
# AMP, batch 1024: 10,377 images/s; at 448 px four times the pixels, so about a quarter.
GPU_FORWARD_448 = 10_377 / 4
CUB_SOURCES, CUB_PAIRS = 11_788, 50_000


def build_source_set(root: Path, count: int) -> tuple[Path, str]:
    """The first ``count`` training photos of the CUB development set as an ImageFolder of symlinks
    (species folders), or a synthetic set of CUB-sized JPEGs when the photos are not here."""
    images, split = CUB / "images.txt", CUB / "train_test_split.txt"
    src = root / f"src-{count}"
    if images.is_file() and split.is_file():
        train = {line.split()[0] for line in split.read_text().splitlines() if line.split()[1:] == ["1"]}
        chosen = [line.split()[1] for line in images.read_text().splitlines() if line.split()[0] in train][:count]
        if not src.is_dir():
            for relative in chosen:
                (src / relative).parent.mkdir(parents=True, exist_ok=True)
                (src / relative).symlink_to(CUB / "images" / relative)
        return src, f"first {len(chosen)} training photos of {CUB}"
    from benchmarks.bench import build_dataset

    build_dataset(src, count, max(2, count // 30), seed=0, jobs=os.cpu_count() or 1)
    return src, f"{count} synthetic CUB-sized JPEGs (no {CUB} here)"


def mixgen_command(args: argparse.Namespace, src: Path, out: Path, *extra: str) -> list[str]:
    options = ("--device", "cpu", "--size", args.size, "--pairs", args.pairs, "--shard-size", args.shard_size)
    return common.mixgen_command(args.method, src, out, *options, *extra)


def launch(command: list[str], log: Path, threads: int, pythonpath: Path) -> tuple[subprocess.Popen, float, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(pythonpath)}
    handle = open(log, "wb")  # noqa: SIM115 - closed by wait_all once the process exits
    return (
        subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=pythonpath),
        time.perf_counter(),
        handle,
    )


def wait_all(procs: list[tuple[subprocess.Popen, float, Any]], logs: list[Path]) -> tuple[float, list[float]]:
    """Wall time from the first start to the last exit, and each process's peak RSS (MB)."""
    ends, rss = [], []
    for (proc, _, handle), log in zip(procs, logs, strict=True):
        _, status, usage = os.wait4(proc.pid, 0)
        ends.append(time.perf_counter())
        handle.close()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{proc.args} failed:\n{log.read_text(errors='replace')[-3000:]}")
        rss.append(usage.ru_maxrss / 1024)
    return max(ends) - min(start for _, start, _ in procs), rss


def worker_records(out: Path, workers: int) -> list[dict[str, Any]]:
    names = ["mixgen.json"] if workers == 1 else [f"mixgen.worker-{i}-of-{workers}.json" for i in range(workers)]
    return [json.loads((out / name).read_text()) for name in names]


def stage_row(rec: dict[str, Any]) -> dict[str, Any]:
    t, c = rec["timings"], rec["counts"]
    return {
        "total_s": t["total_s"],
        "load_s": t["load_s"] + t["scan_s"],
        "decode_s": t["decode_s"],
        "backbone_s": t["backbone_s"],
        "wait_s": t.get("slices_wait_s", 0.0),
        "turn_wait_s": t.get("backbone_turn_wait_s", 0.0),  # the other workers' backbone calls
        "probe_s": t.get("probe_s", 0.0),
        "mix_s": t["mix_stage_s"],
        "backbone_sources": c.get("backbone_sources", c["readable_sources"]),  # before: every worker, every source
        "slices_prepared": c.get("slices_prepared"),
        "written": c["written"],
    }


def run_round(args: argparse.Namespace, src: Path, work: Path, round_no: int) -> dict[str, Any]:
    result: dict[str, Any] = {"uptime": os.getloadavg()}
    variants = [("one", REPO_ROOT, 1)] + [("two", REPO_ROOT, 2)]
    if args.baseline:
        variants.append(("two_baseline", Path(args.baseline), 2))
    if round_no % 2:
        variants.reverse()  # alternate the order between rounds
    for name, code, workers in variants:
        out = work / f"{name}-{round_no}"
        shutil.rmtree(out, ignore_errors=True)
        logs = [work / f"{name}-{round_no}-{i}.log" for i in range(workers)]
        if workers == 1:
            procs = [launch(mixgen_command(args, src, out, "--workers", "2"), logs[0], 2, code)]
        else:
            split = ["--workers", "1", "--num-shards", str(workers)]
            procs = [
                launch(mixgen_command(args, src, out, *split, "--shard-index", str(i)), logs[i], 1, code)
                for i in range(workers)
            ]
        wall, rss = wait_all(procs, logs)
        records = worker_records(out, workers)
        result[name] = {
            "wall_s": wall,
            "peak_rss_mb": rss,
            "workers": [stage_row(r) for r in records],
            "digest": common.data_digest(out),
            "cache_bytes": {p.name: p.stat().st_size for p in (out / ".mixgen").iterdir() if p.is_file()},
        }
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    result["uptime_after"] = os.getloadavg()
    return result


REPO_ROOT = HERE.parent


def model(stages: dict[str, float], n: int, workers: int, sources: int, pairs: int) -> dict[str, float]:
    """Wall time of ``workers`` workers from per-unit stage costs (each worker on its own core or
    GPU): start-up in parallel, the source stage divided (shared) or repeated in full (before),
    the probe once (the others wait for it), the mixing divided by shards."""
    prepare = (stages["decode_per_source"] + stages["backbone_per_source"]) * sources
    mix = stages["mix_per_output"] * pairs
    shared = stages["load_s"] + prepare / workers + stages["probe_s"] + mix / workers
    repeated = stages["load_s"] + prepare + stages["probe_s"] + mix / workers
    single = stages["load_s"] + prepare + stages["probe_s"] + mix
    return {
        "workers": workers,
        "shared_s": shared,
        "repeated_s": repeated,
        "speedup_shared": single / shared,
        "speedup_repeated": single / repeated,
    }


def per_core_stages(two: dict[str, Any], sources: int, pairs: int) -> dict[str, float]:
    """Per-source and per-output costs of one core, from the two one-thread workers of a round
    (each had one of the two cores)."""
    rows = two["workers"]
    prepared = sum(r["backbone_sources"] for r in rows) or sources
    cores, turns = os.cpu_count() or 1, any(r.get("turn_wait_s") for r in rows)
    return {
        "load_s": statistics.mean(r["load_s"] for r in rows),
        "decode_per_source": sum(r["decode_s"] for r in rows) / prepared,
        # Taking turns (mixgen >= issue 23 phase 2), each call had every core: count them all.
        "backbone_per_source": sum(r["backbone_s"] for r in rows) / prepared * (cores if turns else 1),
        "probe_s": max(r["probe_s"] for r in rows),
        "mix_per_output": sum(r["mix_s"] for r in rows) / pairs,
    }


def cache_sizes(channels: int, maps_grid_448: int) -> dict[int, dict[str, float]]:
    """Bytes per source of each cache at 224 and 448 px (views S²·3; probe features C·(S/32)²·2,
    kept until the probe is fitted; pooled C·4; maps, 4 bytes a cell) and what stays in memory."""
    sizes = {}
    for side in (224, 448):
        grid = maps_grid_448 * side // 448
        views, features, pooled, maps = side * side * 3, channels * (side // 32) ** 2 * 2, channels * 4, grid * grid * 4
        sizes[side] = {
            "views": views,
            "probe_features": features,
            "pooled": pooled,
            "maps": maps,
            "disk_peak": views + features + pooled + maps,
            "disk_kept": views + maps,
            "memory": maps + pooled,  # held by each worker; views are read through the page cache
        }
    return sizes


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _rounds(values: dict[str, Any]) -> str:
    return f"{values['median']:.2f}× (rounds: {', '.join(f'{v:.2f}' for v in values['rounds'])})"


def report(result: dict[str, Any]) -> None:
    args, s = result["args"], result["summary"]
    print(f"\nsources: {result['sources']} ({result['source_set']})")
    print(f"{args['method']} {args['size']} px, {args['pairs']} outputs; {result['cpus']} CPUs")
    print("\nround  load avg 1/5/15 min   one process (2 threads) s   two workers (1 thread each) s   baseline two s")
    for i, r in enumerate(result["rounds"]):
        load = " ".join(f"{v:.1f}" for v in r["uptime"])
        base = r.get("two_baseline", {}).get("wall_s")
        print(f"{i:>5}  {load:>20}   {r['one']['wall_s']:>25.1f}   {r['two']['wall_s']:>29.1f}   {base or 0:>14.1f}")
    print(f"\ntwo workers / one process: {_rounds(s['ratio'])}")
    if "ratio_baseline" in s:
        print(f"baseline two workers / one process: {_rounds(s['ratio_baseline'])}")
    print(f"the workers' backbone ran over each of the {result['sources']} sources once: {s['backbone_once']}")
    print(f"outputs identical to the single process in every round: {s['identical']}")
    print("\nper-worker stages (s), last round:")
    for name in ("one", "two", "two_baseline"):
        for i, w in enumerate(result["rounds"][-1].get(name, {}).get("workers", [])):
            print(
                f"  {name:>13} #{i}: total {w['total_s']:.1f}  start-up {w['load_s']:.1f}  decode {w['decode_s']:.1f}"
                f"  backbone {w['backbone_s']:.1f} ({w['backbone_sources']} sources)  waiting {w['wait_s']:.1f}"
                f" (+ {w.get('turn_wait_s', 0.0):.1f} for a backbone turn)"
                f"  probe {w['probe_s']:.1f}  mix {w['mix_s']:.1f} ({w['written']} outputs)"
            )
    st = s["per_core"]
    print(
        f"\nper core: decode {1000 * st['decode_per_source']:.1f} ms/source, backbone "
        f"{1000 * st['backbone_per_source']:.1f} ms/source, mix {1000 * st['mix_per_output']:.2f} ms/output, "
        f"start-up {st['load_s']:.1f} s, probe {st['probe_s']:.1f} s"
    )
    print("\nmodel of N one-core workers on this set:   shared: wall s, speed-up   before (repeated): wall s, speed-up")
    for m in s["model"]:
        shared, repeated = (
            f"{m['shared_s']:.1f}, {m['speedup_shared']:.2f}×",
            f"{m['repeated_s']:.1f}, {m['speedup_repeated']:.2f}×",
        )
        print(f"  N = {m['workers']:<36} {shared:>22}   {repeated:>30}")
    g = s["gpu"]
    print(f"\n8 GPUs, full CUB ({CUB_SOURCES:,} sources, 448 px); assumptions: {g['assumptions']}")
    print(
        f"  source stage: one GPU {g['one_gpu_s']:.1f} s; 8 GPUs before (each repeats it) {g['repeated_s']:.1f} s;"
        f" shared {g['shared_s']:.1f} s ({g['speedup']:.1f}× faster)"
    )
    print("\ncaches per source:")
    for side, row in s["cache_sizes"].items():
        print(f"  {side} px: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in row.items()))
    for side, row in s["capacity"].items():
        print(f"  {side} px: this machine holds at most {row['sources']:,} sources ({row['bound']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--method", default="snapmix")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--pairs", type=int, default=1600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=100, help="small enough that every worker has shards")
    parser.add_argument("--baseline", help="a checkout of an earlier mixgen to time its two workers too")
    parser.add_argument("--workdir", type=Path, help="where sources and outputs go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep every OUT")
    parser.add_argument("--cores-per-gpu", type=int, default=8, help="CPU cores decoding for each GPU (prediction)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixgen-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    src, described = build_source_set(work, args.sources)
    rounds = []
    for i in range(args.rounds):
        rounds.append(run_round(args, src, work, i))
        if args.json:  # what is measured so far survives an interrupted run
            args.json.write_text(json.dumps({"rounds": rounds}, indent=2, default=str))
    n = sum(1 for p in src.rglob("*.jpg"))

    def ratios(name: str) -> dict[str, Any]:
        values = sorted(r[name]["wall_s"] / r["one"]["wall_s"] for r in rounds)
        return {"median": statistics.median(values), "rounds": values}

    last = rounds[-1]
    per_core = per_core_stages(last["two"], n, args.pairs)
    views_file = next(
        size for name, size in last["one"]["cache_bytes"].items() if name.startswith("views-") and name.endswith(".u8")
    )
    maps_file = [
        size for name, size in last["one"]["cache_bytes"].items() if name.startswith("maps-") and name.endswith(".npy")
    ]
    grid = int(round(((maps_file[0] - 128) / n / 4) ** 0.5)) if maps_file else 0
    grid_448 = grid * 448 // args.size
    sizes = cache_sizes(channels=1280, maps_grid_448=grid_448)  # efficientnet_lite0: 1,280 channels
    disk_free = shutil.disk_usage(work).free
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    capacity = {}
    for side, row in sizes.items():
        by_disk, by_memory = disk_free // row["disk_peak"], memory // 2 // row["memory"]
        capacity[side] = {
            "sources": int(min(by_disk, by_memory)),
            "bound": f"disk: {fmt_bytes(disk_free)} free / {fmt_bytes(row['disk_peak'])} at the peak"
            if by_disk < by_memory
            else f"memory: half of {fmt_bytes(memory)} / {fmt_bytes(row['memory'])}",
        }
    decode_rate = 1 / per_core["decode_per_source"]
    one_gpu = CUB_SOURCES / (args.cores_per_gpu * decode_rate) + CUB_SOURCES / GPU_FORWARD_448
    shared = one_gpu / 8
    gpu = {
        "assumptions": (
            f"GPU forward {GPU_FORWARD_448:,.0f} images/s at 448 px (timm rtx4090 AMP efficientnet_lite0 at 224 / 4); "
            f"decode {decode_rate:.0f} sources/s per core (measured here), {args.cores_per_gpu} cores per GPU; "
            "decode and forward not overlapped (an upper bound)"
        ),
        "one_gpu_s": one_gpu,
        "repeated_s": one_gpu,
        "shared_s": shared,
        "speedup": one_gpu / shared,
    }
    summary = {
        "ratio": ratios("two"),
        "backbone_once": all(sum(w["backbone_sources"] for w in r["two"]["workers"]) == n for r in rounds),
        "identical": all(r["two"]["digest"] == r["one"]["digest"] for r in rounds),
        "per_core": per_core,
        "model": [model(per_core, n, w, n, args.pairs) for w in (1, 2, 4, 8)],
        "gpu": gpu,
        "cache_sizes": sizes,
        "capacity": capacity,
        "views_bytes_per_source": views_file / n,
    }
    if args.baseline:
        summary["ratio_baseline"] = ratios("two_baseline")
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sources": n,
        "source_set": described,
        "cpus": os.cpu_count(),
        "memory_gb": memory / 1e9,
        "rounds": rounds,
        "summary": summary,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    report(result)
    return result


if __name__ == "__main__":
    main()
