"""mixgen under torchrun joins torch.distributed's process group (gloo, on the CPU here): two
"machines" (two torchrun agents over a localhost rendezvous), each with its own cache folder and
one shared OUT, write what one process writes, running the backbone over each source once in all;
a rank started with other settings is refused in one line before anything is written; outside
torchrun the file-lock path is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mixgen.pipeline.distributed import (
    COORDINATION_ENV,
    Coordinator,
    FileLocks,
    coordinator_for,
    settings_difference,
    torchrun_rendezvous,
)
from tests.conftest import REPO, SAMPLE, load_benchmark, run_cli, sample_run
from tests.test_resume import assert_same_run, record

# --cam-size 320 makes the CPU backbone call 8 images: 20 sources are 3 slices (8, 8, 4).
SNAP = ["--device", "cpu", "--size", "64", "--cam-size", "320", "--pairs", "40", "--shard-size", "10"]
RENDEZVOUS = {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2"}


def agents(tmp_path: Path, commands: list[list[str]], restarts: int = 0) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per command (``--nnodes len(commands)``, one rank each) on a localhost
    c10d rendezvous; waits for all of them."""
    pair = load_benchmark("torchrun_pair")
    port, run_id = pair.free_port(), uuid.uuid4().hex[:8]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(commands)), "--nproc-per-node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", run_id]
    launcher += ["--max-restarts", str(restarts), "-m", "mixgen"]
    procs = [
        subprocess.Popen(
            [*launcher, *command], cwd=REPO, env=pair.clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for command in commands
    ]
    done = []
    for proc in procs:
        output, _ = proc.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, output.decode(errors="replace"), ""))
    return done


def test_the_process_group_is_joined_only_under_torchrun_with_its_own_shards(monkeypatch):
    cfg = SimpleNamespace(num_shards=2, shard_index=1)
    assert torchrun_rendezvous(cfg, RENDEZVOUS)
    assert not torchrun_rendezvous(cfg, {**RENDEZVOUS, "MASTER_PORT": ""})  # RANK/WORLD_SIZE alone: SLURM by hand
    assert not torchrun_rendezvous(cfg, {**RENDEZVOUS, COORDINATION_ENV: "files"})  # asked for the file locks
    assert not torchrun_rendezvous(SimpleNamespace(num_shards=2, shard_index=0), RENDEZVOUS)  # --shard-index given
    assert not torchrun_rendezvous(SimpleNamespace(num_shards=1, shard_index=0), {**RENDEZVOUS, "WORLD_SIZE": "1"})
    for name in RENDEZVOUS:
        monkeypatch.delenv(name, raising=False)
    assert type(coordinator_for(SimpleNamespace(num_shards=1, shard_index=0))) is Coordinator  # one process
    assert isinstance(coordinator_for(SimpleNamespace(num_shards=2, shard_index=0)), FileLocks)  # workers by hand


def test_a_settings_difference_names_the_first_setting_that_differs():
    first = {"method": "snapmix", "pairs": 40, "seed": 0}
    assert settings_difference(first, first) is None
    assert settings_difference({**first, "pairs": 30}, first) == "--pairs 40 → 30"
    assert settings_difference({**first, "method": "cutmix", "beta": 1.0}, first) == "method snapmix → cutmix"


def test_a_rank_with_other_settings_is_refused_in_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    common = ["cutmix", str(SAMPLE), str(out), "--device", "cpu", "--size", "32", "--workers", "1"]
    results = agents(tmp_path, [[*common, "--pairs", "40"], [*common, "--pairs", "30"]])
    assert [r.returncode for r in results] != [0, 0]
    lines = [line for r in results for line in r.stdout.splitlines() if line.startswith("mixgen: error:")]
    assert lines and all("started with other settings than rank 0 (--pairs" in line for line in lines), lines
    assert all("start every rank with the same command" in line for line in lines)
    for r in results:  # mixgen's own output is one line per rank: no traceback of mixgen's
        assert "mixgen/pipeline" not in r.stdout, r.stdout[-3000:]
    assert not out.exists()  # nothing written, not even OUT


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "single", "snapmix", *SNAP, "--workers", "2")


@pytest.mark.slow
def test_two_machines_with_their_own_caches_write_what_one_process_writes(tmp_path, single):
    out = tmp_path / "out"
    commands = [
        ["snapmix", str(SAMPLE), str(out), *SNAP, "--workers", "1", "--cache-dir", str(tmp_path / f"local-{node}")]
        for node in range(2)
    ]
    results = agents(tmp_path, commands)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:] + results[1].stdout[-3000:]
    rec = record(out)
    assert rec["status"] == "complete" and rec["counts"]["written"] == 40
    workers = [json.loads((out / f"mixgen.worker-{i}-of-2.json").read_text()) for i in range(2)]
    assert all(w["coordination"] == "torch.distributed (gloo)" for w in workers)
    assert sum(w["counts"]["backbone_sources"] for w in workers) == 20  # each source through the backbone once
    run_cli("verify", out)
    assert_same_run(out, single)
    for node in range(2):  # every view and map in each machine's own folder, nothing left of the stage
        local = tmp_path / f"local-{node}"
        names = sorted(p.name for p in local.iterdir())
        assert any(n.startswith("views-") and n.endswith(".u8") for n in names), names
        assert any(n.startswith("maps-") and n.endswith(".npy") for n in names), names
        assert not any(n.startswith("slices-") or n.endswith(".part") for n in names), names
    cached = sorted(p.name for p in (out / ".mixgen").iterdir())
    assert not any(n.startswith(("views-", "maps-", "slices-")) for n in cached), cached  # OUT holds no cache


@pytest.mark.slow
def test_the_pair_benchmark_at_its_tiny_size_kills_a_rank_at_three_moments(tmp_path):
    result = load_benchmark("torchrun_pair").main(["--tiny", "--kills", "--work", str(tmp_path / "work")])
    (row,) = result["rounds"]
    assert row["identical"] and row["backbone_sources"] == 20
    assert [k["moment"] for k in result["kills"]] == ["source", "probe", "mixing"]
    for kill in result["kills"]:
        assert kill["ok"], kill


def test_views_decoded_on_demand_are_the_cached_views():
    from mixgen.sources.scan import scan
    from mixgen.sources.views import DecodedViews, load_source_view

    index = scan(SAMPLE, "auto", None)
    views = DecodedViews(index, 32, "crop")
    expected = np.stack([load_source_view(index, index.items[p], 32) for p in (3, 0, 3)])
    assert np.array_equal(views.read([3, 0, 3]), expected)
    views.write(1, np.zeros((32, 32, 3), np.uint8))  # kept until forgotten: what the backbone reads back
    assert not views.read([1]).any()
    views.forget()
    assert np.array_equal(views.read([1])[0], load_source_view(index, index.items[1], 32))


@pytest.mark.slow
def test_without_room_for_the_views_they_are_decoded_on_demand_and_the_output_is_the_same(tmp_path, single):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mixgen"]
    command += ["snapmix", str(SAMPLE), str(out), *SNAP, "--workers", "1"]
    env = {**load_benchmark("torchrun_pair").clean_env(), "MIXGEN_VIEW_CACHE": "off"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())  # info lines wrap at the terminal's width
    assert "no view cache for 20 sources" in said and "decoded from SRC whenever it is needed" in said
    workers = [json.loads((out / f"mixgen.worker-{i}-of-2.json").read_text()) for i in range(2)]
    assert all(w["counts"]["views_decoded_on_demand"] == 1 for w in workers)
    assert sum(w["counts"]["backbone_sources"] for w in workers) == 20
    assert not any(p.name.startswith("views-") for p in (out / ".mixgen").iterdir())
    run_cli("verify", out)
    assert_same_run(out, single)


def test_a_rank_that_makes_no_progress_while_the_others_wait_ends_the_job(monkeypatch):
    from mixgen.errors import MixgenError
    from mixgen.pipeline import distributed

    class Store:  # the two calls _Stalls makes of torch's store
        def __init__(self):
            self.values = {"done/0": 1, "progress/1": 3}

        def check(self, keys):
            return all(k in self.values for k in keys)

        def add(self, key, amount):
            self.values[key] = self.values.get(key, 0) + amount
            return self.values[key]

    clock = [100.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    store = Store()
    watch = distributed._Stalls(store, 2, timeout=60)
    watch.check()
    clock[0] += 50
    store.add("progress/1", 1)  # rank 1 moved: the clock starts again
    watch.check()
    clock[0] += 59
    watch.check()
    clock[0] += 2
    with pytest.raises(MixgenError, match="rank 1 of this torchrun job made no progress for 60 s"):
        watch.check()
    store.values["done/1"] = 1  # a rank that is done is never stalled
    watch.check()
