"""Two "machines" on one box: two torchrun agents (``--nnodes 2 --nproc-per-node 1``) over a
localhost c10d rendezvous, each with its own cache folder (``--cache-dir``) and one shared OUT,
against one process on the same cores.

1. Paired rounds (the order alternates): one process (``--workers 2``) and the pair (each rank
   ``--workers 1``), wall time of each from start to the last exit; the ratio pair / one.
2. Checks: the pair's OUT/data is byte-identical to the single process's, and the ranks together
   ran the backbone over each source once (``counts.backbone_sources`` of their run records).
3. ``--kills``: ``kill -9`` of one rank at three moments under ``--max-restarts 1`` — the source
   stage (its cache folder's view file is being written), the probe (rank 0 says it is fitting it;
   ``MIXGEN_DEBUG_PAUSE=probe:S`` holds it there), the mixing (the first shard's manifest is on
   disk) — then the job must finish by itself, byte-identical.

    python -m benchmarks.torchrun_pair --tiny             # 20 sources, 64 px, 40 outputs (the test)
    python -m benchmarks.torchrun_pair --kills --json results/torchrun_pair.json
                                                          # 200 sources, SnapMix 448 px, 1,600 outputs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python benchmarks/torchrun_pair.py): import the package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
MOMENTS = ("source", "probe", "mixing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("TORCHELASTIC")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def options(args: argparse.Namespace) -> list[str]:
    found = ["--device", "cpu", "--size", args.size, "--pairs", args.pairs, "--shard-size", args.shard_size]
    if args.cam_size:
        found += ["--cam-size", args.cam_size]
    return [str(o) for o in found]


def agent_command(args, src: Path, out: Path, cache: Path, port: int, run_id: str, restarts: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", run_id]
    launcher += ["--max-restarts", str(restarts), "-m", "mixgen"]
    return [*launcher, args.method, str(src), str(out), *options(args), "--cache-dir", str(cache), "--workers", "1"]


def start_pair(
    args, src: Path, out: Path, work: Path, restarts: int = 0, env: dict | None = None, tag: str = "pair", envs=None
):
    """Two agents, each with its own cache folder (``envs``: each agent's environment, else ``env``
    for both); returns [(process, log path, cache folder, log handle)]."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    agents = []
    for node in range(2):
        cache = work / f"{tag}-cache-{node}"
        shutil.rmtree(cache, ignore_errors=True)
        log = work / f"{tag}-agent-{node}.log"
        command = agent_command(args, src, out, cache, port, run_id, restarts)
        handle = open(log, "wb")  # noqa: SIM115 - closed when the agent is waited for
        environment = envs[node] if envs else env or clean_env()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
        agents.append((proc, log, cache, handle))
    return agents


def wait_agents(agents, timeout: float) -> list[int]:
    codes = []
    deadline = time.monotonic() + timeout
    for proc, _, _, handle in agents:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
        handle.close()
    return codes


def worker_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("mixgen.worker-*-of-2.json"))]


STAGES = ("total_s", "scan_s", "load_s", "decode_s", "backbone_s", "backbone_turn_wait_s", "probe_s", "mix_stage_s")


def stage_timings(record: dict[str, Any]) -> dict[str, float]:
    timings = record.get("timings") or {}
    return {key: timings[key] for key in STAGES if key in timings}


def children_cpu() -> float:
    """CPU seconds of every finished child process and the descendants it waited for (the agents'
    ranks): on a loaded machine, what a run cost, where its wall time says how long others let it run."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_single(args, src: Path, out: Path, work: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = common.mixgen_command(args.method, src, out, *options(args), "--workers", "2")
    log = work / "single.log"
    began = time.perf_counter()
    with open(log, "wb") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=clean_env(), cwd=REPO).returncode
    wall = time.perf_counter() - began
    if code != 0:
        sys.exit(f"the single process failed ({code}):\n{log.read_text(errors='replace')[-3000:]}")
    return wall


def run_pair(args, src: Path, out: Path, work: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    agents = start_pair(args, src, out, work)
    codes = wait_agents(agents, args.timeout)
    wall = time.perf_counter() - began
    if codes != [0, 0]:
        sys.exit(f"the pair failed ({codes}):\n{agents[0][1].read_text(errors='replace')[-3000:]}")
    return wall


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), nearest first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def rank_process(agent_pid: int) -> int | None:
    """The mixgen worker an agent started (not the agent itself)."""
    for pid in descendants(agent_pid):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mixgen" in command and b"torch.distributed.run" not in command:
            return pid
    return None


def kill_at(args, src: Path, work: Path, moment: str, reference: str) -> dict[str, Any]:
    """kill -9 one rank at ``moment`` under --max-restarts 1; the job must finish byte-identical."""
    out = work / f"kill-{moment}"
    shutil.rmtree(out, ignore_errors=True)
    env = clean_env(MIXGEN_DEBUG_PAUSE=f"probe:{args.probe_pause}") if moment == "probe" else clean_env()
    began = time.perf_counter()
    agents = start_pair(args, src, out, work, restarts=1, env=env, tag=f"kill-{moment}")
    victim, killed_at = None, None
    deadline = time.monotonic() + args.timeout
    while victim is None and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _, _, _ in agents):
            break  # the job ended before the moment came
        for proc, log, cache, _ in agents:
            if moment == "source":
                hit = any(cache.glob("views-*.part"))
            elif moment == "probe":
                hit = b"fitting the probe" in log.read_bytes()
            else:
                hit = any((out / "data").glob("*/metadata.parquet"))
            pid = rank_process(proc.pid) if hit else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                victim, killed_at = pid, time.perf_counter() - began
                break
        time.sleep(0.02)
    codes = wait_agents(agents, args.timeout)
    result = {
        "moment": moment,
        "killed_pid": victim,
        "killed_after_s": None if killed_at is None else round(killed_at, 2),
        "agent_exit_codes": codes,
        "wall_s": round(time.perf_counter() - began, 2),
    }
    record = json.loads((out / "mixgen.json").read_text()) if (out / "mixgen.json").is_file() else {}
    result["status"] = record.get("status")
    result["identical"] = (out / "data").is_dir() and common.data_digest(out) == reference
    # torchrun's own lines: the killed rank's "failed (exitcode: -9)", the other's stop ("closing signal")
    result["restarted"] = any(b"failed (exitcode" in log.read_bytes() for _, log, _, _ in agents)
    result["ok"] = victim is not None and codes == [0, 0] and result["status"] == "complete" and result["identical"]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def hang(args, src: Path, work: Path, reference: str) -> dict[str, Any]:
    """One rank hangs as it starts mixing (``MIXGEN_DEBUG_PAUSE=mixing:3600`` in its agent's
    environment alone, once); nobody kills it: the other rank, done, sees it make no progress for
    ``MIXGEN_DIST_TIMEOUT_S`` and ends, and torchrun restarts both (--max-restarts 1)."""
    out = work / "hang"
    shutil.rmtree(out, ignore_errors=True)
    timeout = {"MIXGEN_DIST_TIMEOUT_S": str(args.hang_timeout)}
    envs = [clean_env(**timeout), clean_env(**timeout, MIXGEN_DEBUG_PAUSE="mixing:3600")]
    began = time.perf_counter()
    agents = start_pair(args, src, out, work, restarts=1, tag="hang", envs=envs)
    codes = wait_agents(agents, args.timeout)
    logs = b"".join(log.read_bytes() for _, log, _, _ in agents)
    record = json.loads((out / "mixgen.json").read_text()) if (out / "mixgen.json").is_file() else {}
    result = {
        "moment": "hang (mixing)",
        "agent_exit_codes": codes,
        "wall_s": round(time.perf_counter() - began, 2),
        "said": b"made no progress" in logs,
        "status": record.get("status"),
        "identical": (out / "data").is_dir() and common.data_digest(out) == reference,
    }
    result["ok"] = codes == [0, 0] and result["said"] and result["status"] == "complete" and result["identical"]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="20 sources, 64 px, 40 outputs: the test's size")
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--cam-size", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=1600)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--method", default="snapmix")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kills", action="store_true", help="also kill -9 one rank at three moments")
    parser.add_argument("--moments", default=",".join(MOMENTS), help="which kill moments (comma-separated)")
    parser.add_argument("--hang", action="store_true", help="also let one rank hang as it starts mixing")
    parser.add_argument("--hang-timeout", type=float, default=90.0, help="MIXGEN_DIST_TIMEOUT_S for --hang")
    parser.add_argument("--probe-pause", type=float, default=6.0, help="seconds rank 0 holds before the probe fit")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.sources, args.size, args.cam_size, args.pairs, args.shard_size = 20, 64, 320, 40, 10
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="torchrun-pair-"))
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks.bench import build_dataset

    src, _, _ = build_dataset(work / f"src-{args.sources}", args.sources, max(2, args.sources // 20), 0, 2)
    result: dict[str, Any] = {
        "machine": common.machine("cpu"),
        "load_before": os.getloadavg(),
        "setup": {"sources": args.sources, "size": args.size, "pairs": args.pairs, "method": args.method},
        "rounds": [],
    }
    reference = None
    for round_no in range(args.rounds):
        order = ["single", "pair"] if round_no % 2 == 0 else ["pair", "single"]
        walls: dict[str, float] = {}
        cpus: dict[str, float] = {}
        for name in order:
            out = work / name
            before = children_cpu()
            walls[name] = (run_single if name == "single" else run_pair)(args, src, out, work)
            cpus[name] = children_cpu() - before
        digests = {name: common.data_digest(work / name) for name in order}
        reference = digests["single"]
        records = worker_records(work / "pair")
        passes = sum((r.get("counts") or {}).get("backbone_sources", 0) for r in records)
        row = {
            **{f"{name}_wall_s": round(walls[name], 2) for name in order},
            "ratio": round(walls["pair"] / walls["single"], 3),
            **{f"{name}_cpu_s": round(cpus[name], 2) for name in order},
            "cpu_ratio": round(cpus["pair"] / cpus["single"], 3),
            "identical": digests["single"] == digests["pair"],
            "backbone_sources": passes,
            "coordination": [r.get("coordination") for r in records],
            # Where each process's time went (its run record): what the pair adds shows as the ranks'
            # scan_s/load_s (waiting for each other), decode_s (each machine decodes every source)
            # and backbone_turn_wait_s (two ranks of one box take turns at the CPU backbone).
            "timings": {
                "single": stage_timings(json.loads((work / "single" / "mixgen.json").read_text())),
                "ranks": [stage_timings(r) for r in records],
            },
            "load": os.getloadavg(),
        }
        result["rounds"].append(row)
        print(json.dumps(row), flush=True)
        if not row["identical"]:
            sys.exit("the pair's output differs from the single process's")
    if args.kills:
        result["kills"] = []
        for moment in args.moments.split(","):
            row = kill_at(args, src, work, moment, reference)
            result["kills"].append(row)
            print(json.dumps(row), flush=True)
    if args.hang:
        result["hang"] = hang(args, src, work, reference)
        print(json.dumps(result["hang"]), flush=True)
    result["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
