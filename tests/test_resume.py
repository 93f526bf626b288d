"""Never lose or corrupt output: kill -9 and resume, shard-index workers (by hand and under
torchrun), a different run on an existing OUT, a full disk, Ctrl-C and SIGTERM. After each, the
same command again must end with exactly the bytes an uninterrupted run writes."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mixgen.files import remove_stale_temps, temp_path, write_json
from mixgen.output import manifest
from mixgen.output.manifest import read_manifest
from mixgen.output.record import merge_records
from mixgen.pipeline import prepare, run
from tests.conftest import REPO, SAMPLE, run_cli, sample_run

# SnapMix with the backbone, small views, 24 shards: long enough for a kill to land mid-run.
SNAP = ["--device", "cpu", "--size", "64", "--pairs", "240", "--shard-size", "10", "--workers", "2"]
# CutMix needs no backbone: for the tests that only exercise the shard machinery.
CUT = ["--device", "cpu", "--size", "64", "--pairs", "60", "--shard-size", "10", "--workers", "2"]


def snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file under OUT/data, by relative path: manifests and images."""
    data = out / "data"
    return {
        p.relative_to(data).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }


def assert_same_run(out: Path, reference: Path) -> None:
    assert read_manifest(out).equals(read_manifest(reference))  # row for row
    assert snapshot(out) == snapshot(reference)  # and byte for byte, images included


def assert_no_half_written_files(out: Path) -> None:
    """Every shard folder has its manifest, and no temp file is left anywhere."""
    for directory in (out / "data").iterdir():
        assert (directory / "metadata.parquet").is_file(), f"{directory} holds no manifest"
    temps = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert temps == []


def record(out: Path, name: str = "mixgen.json") -> dict:
    return json.loads((out / name).read_text())


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output
    return [line for line in output.splitlines() if "error" in line]


@pytest.fixture(scope="module")
def snap_reference(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "snap", "snapmix", *SNAP)


@pytest.fixture(scope="module")
def cut_reference(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "cut", "cutmix", *CUT)


def mixgen_process(*args: str, **kwargs) -> subprocess.Popen:
    """mixgen in a child process that takes Ctrl-C as a terminal's foreground job does, even when
    the tests run where SIGINT is ignored (a background job, nohup)."""

    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    argv = [sys.executable, "-m", "mixgen", *map(str, args)]
    return subprocess.Popen(argv, cwd=REPO, preexec_fn=default_sigint, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"mixgen exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


# ---------------------------------------------------------------------------------------------
# kill -9, then the same command


@pytest.mark.slow
def test_kill_9_mid_run_then_same_command_resumes_identically(tmp_path, snap_reference):
    out = tmp_path / "out"
    proc = mixgen_process("snapmix", SAMPLE, out, *SNAP, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "data" / "00000" / "metadata.parquet", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list((out / "data").glob("*/metadata.parquet")))
    assert 1 <= done < 24, f"the kill must land mid-run ({done} of 24 shards were complete)"
    assert record(out)["status"] == "running"  # nobody could record the kill
    before = run_cli("verify", out, expect=3)
    assert "re-run the same command" in before.output

    run_cli("snapmix", SAMPLE, out, *SNAP)  # the same command again
    rec = record(out)
    assert rec["status"] == "complete" and rec["resumed"] is True
    assert rec["counts"]["kept_from_previous_run"] >= 10 * done
    assert rec["counts"]["written"] + rec["counts"]["kept_from_previous_run"] == 240
    run_cli("verify", out)
    assert_same_run(out, snap_reference)
    assert_no_half_written_files(out)


# ---------------------------------------------------------------------------------------------
# Several workers on one OUT


def test_shard_index_workers_union_equals_single_run(tmp_path, monkeypatch, cut_reference):
    out = tmp_path / "out"
    run_cli("cutmix", SAMPLE, out, *CUT, "--num-shards", "2", "--shard-index", "1")
    rec = record(out)
    assert rec["status"] == "running"  # worker 0 has not run yet
    assert [w["status"] for w in rec["workers"]] == ["not started", "complete"]
    assert record(out, "mixgen.worker-1-of-2.json")["status"] == "complete"
    assert sorted(p.parent.name for p in (out / "data").glob("*/metadata.parquet")) == ["00001", "00003", "00005"]
    run_cli("verify", out, expect=3)

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    monkeypatch.setenv("RANK", "0")
    run_cli("cutmix", SAMPLE, out, *CUT)
    rec = record(out)
    assert rec["status"] == "complete" and rec["config"]["num_shards"] == 2
    assert rec["counts"]["written"] == 60 and rec["progress"]["outputs_done"] == 60
    run_cli("verify", out)
    assert_same_run(out, cut_reference)

    # A single process on the same OUT finds every shard done and takes over the record.
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    run_cli("cutmix", SAMPLE, out, *CUT)
    assert record(out)["counts"]["kept_from_previous_run"] == 60
    assert list(out.glob("mixgen.worker-*.json")) == []
    assert_same_run(out, cut_reference)


@pytest.mark.slow
def test_torchrun_two_workers_union_equals_single_run(tmp_path, snap_reference):
    """Two concurrent processes share OUT and its caches (views, CAMs, probe features); torchrun
    also sets OMP_NUM_THREADS=1, which must not change a single byte."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this Python")
    out = tmp_path / "out"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mixgen", "snapmix", str(SAMPLE), str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS")}
    result = subprocess.run([*command, *SNAP], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rec = record(out)
    assert rec["status"] == "complete" and [w["status"] for w in rec["workers"]] == ["complete", "complete"]
    assert rec["counts"]["written"] == 240
    run_cli("verify", out)
    assert_same_run(out, snap_reference)


def test_merged_record_status():
    def worker(index: int, status: str, done: int = 0) -> dict:
        return {
            "fingerprint": "f",
            "status": status,
            "config": {"pairs": 9, "device": f"cuda:{index}"},
            "progress": {"shards_done": done, "outputs_done": done * 10},
            "worker": {"index": index, "count": 3},
        }

    def merged(tmp: Path, statuses: list[str]) -> dict:
        for i, status in enumerate(statuses[1:], start=1):
            write_json(tmp / f"mixgen.worker-{i}-of-3.json", worker(i, status, 1))
        return merge_records(tmp, worker(0, statuses[0], 2), 3)

    with pytest.MonkeyPatch.context():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            assert merged(tmp, ["complete"] * 3)["status"] == "complete"
            assert merged(tmp, ["complete", "running", "complete"])["status"] == "running"
            assert merged(tmp, ["interrupted", "running", "complete"])["status"] == "interrupted"
            assert merged(tmp, ["complete", "failed", "interrupted"])["status"] == "failed"
            m = merged(tmp, ["running", "running", "running"])
            assert m["progress"] == {"shards_done": 4, "outputs_done": 40}
            assert "device" not in m["config"] and m["config"]["num_shards"] == 3
            assert [w["device"] for w in m["workers"]] == ["cuda:0", "cuda:1", "cuda:2"]
            (tmp / "mixgen.worker-2-of-3.json").unlink()
            assert merged(tmp, ["complete", "complete"])["status"] == "running"  # worker 2 not started


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    mine = temp_path(tmp_path / "mixgen.json")
    mine.write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = mine.name.rpartition("@")[2].removesuffix(".tmp")
    stale = tmp_path / f".mixgen.json.{dead.pid}@{host}.tmp"
    stale.write_text("{")
    foreign = tmp_path / f".mixgen.json.{dead.pid}@another-host.tmp"
    foreign.write_text("{")
    assert remove_stale_temps(tmp_path) == [stale]
    assert mine.exists() and foreign.exists()
    assert remove_stale_temps(tmp_path, include_own=True) == [mine]


# ---------------------------------------------------------------------------------------------
# A different run on an existing OUT


def test_different_config_on_existing_out_is_refused_unless_overwrite(tmp_path, cut_reference):
    out = tmp_path / "out"
    shutil.copytree(cut_reference, out)
    before = snapshot(out)
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds a different mixgen run" in lines[0] and "--overwrite" in lines[0]
    assert snapshot(out) == before  # untouched

    run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", "--overwrite")
    assert record(out)["config"]["seed"] == 1 and record(out)["resumed"] is False
    run_cli("verify", out)
    fresh = tmp_path / "fresh"
    run_cli("cutmix", SAMPLE, fresh, *CUT, "--seed", "1")
    assert_same_run(out, fresh)


def test_folder_without_a_mixgen_run_is_never_written(tmp_path):
    out = tmp_path / "mine"
    (out / "data" / "00000").mkdir(parents=True)
    (out / "data" / "00000" / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = run_cli("cutmix", SAMPLE, out, *CUT, *extra, expect=1)
        assert "holds no mixgen run" in result.output
    assert (out / "data" / "00000" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["data"]


# ---------------------------------------------------------------------------------------------
# A full disk, Ctrl-C


def _fail_after(count: int, exc: BaseException, real):
    """``real`` until it has been called ``count`` times, then raise ``exc`` (thread-safe)."""
    calls = itertools.count()
    lock = threading.Lock()
    state = {"raised": 0}

    def wrapper(*args, **kwargs):
        with lock:
            n = next(calls)
        if n >= count:
            state["raised"] += 1
            raise exc
        return real(*args, **kwargs)

    return wrapper, state


@pytest.mark.parametrize(("where", "kept"), [("image", 20), ("manifest", 20), ("cache", 0)])
def test_full_disk_is_one_line_and_leaves_a_resumable_out(tmp_path, monkeypatch, cut_reference, where, kept):
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "image":  # the 25th image write fails: in the middle of shard 00002
        wrapper, state = _fail_after(24, full, run._write_output)
        monkeypatch.setattr(run, "_write_output", wrapper)
    elif where == "manifest":  # the third manifest fails
        wrapper, state = _fail_after(2, full, manifest.write_shard)
        monkeypatch.setattr(manifest, "write_shard", wrapper)
    else:  # no room for the views cache, before any output
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / ".mixgen" / "views.u8"))
        wrapper, state = _fail_after(0, full, prepare.allocate)
        monkeypatch.setattr(prepare, "allocate", wrapper)
    result = run_cli("cutmix", SAMPLE, out, *CUT, expect=1)
    assert state["raised"] >= 1
    errors = error_lines(result.output)
    assert len(errors) == 1, result.output
    assert "no space left on device writing" in errors[0]
    assert "free space and re-run the same command to resume" in errors[0]
    rec = record(out)
    assert rec["status"] == "failed" and "no space left" in rec["error"]
    if (out / "data").exists():
        assert_no_half_written_files(out)
    assert len(list(out.glob("data/*/metadata.parquet"))) == kept // 10

    monkeypatch.undo()  # space freed
    run_cli("cutmix", SAMPLE, out, *CUT)
    assert record(out)["counts"]["kept_from_previous_run"] == kept
    run_cli("verify", out)
    assert_same_run(out, cut_reference)


def test_ctrl_c_discards_the_unfinished_shard_exits_130_and_resumes(tmp_path, monkeypatch, cut_reference):
    out = tmp_path / "out"
    wrapper, state = _fail_after(3, KeyboardInterrupt(), manifest.write_shard)
    monkeypatch.setattr(manifest, "write_shard", wrapper)
    result = run_cli("cutmix", SAMPLE, out, *CUT, expect=130)
    assert state["raised"] == 1 and "Traceback" not in result.output
    assert "re-run the same command to resume" in result.output
    assert record(out)["status"] == "interrupted"
    assert_no_half_written_files(out)
    assert not (out / "data" / "00003").exists()  # the shard being written was discarded
    monkeypatch.undo()
    run_cli("cutmix", SAMPLE, out, *CUT)
    run_cli("verify", out)
    assert_same_run(out, cut_reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_real_interrupt_signal_records_interrupted_and_exits_130(tmp_path, signum):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--size", "64", "--pairs", "3000", "--shard-size", "20", "--workers", "2"]
    proc = mixgen_process("cutmix", SAMPLE, out, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "data" / "00000" / "metadata.parquet", proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert record(out)["status"] == "interrupted"
    assert_no_half_written_files(out)
    report = run_cli("verify", out, expect=3)
    assert "status is 'interrupted'" in report.output


def test_progress_is_recorded_per_shard(cut_reference):
    rec = record(cut_reference)
    assert rec["progress"] == {"shards_done": 6, "shards": 6, "outputs_done": 60}
    assert rec["status"] == "complete" and "error" not in rec
    assert pq.read_metadata(cut_reference / "data" / "00005" / "metadata.parquet").num_rows == 10


def test_an_interrupt_swallowed_while_the_cam_pass_loads_still_stops_the_run(tmp_path, monkeypatch):
    """A C extension's import (ONNX Runtime) can turn Ctrl-C into an ImportError that a fallback
    then handles; the run must still stop with 130 instead of finishing as if nothing was asked."""
    import mixgen.pipeline.run as run_module

    real = run_module.load_campass

    def loads_while_interrupted(*args, **kwargs):
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what Ctrl-C runs, in the main thread
        except KeyboardInterrupt as exc:
            assert isinstance(exc, KeyboardInterrupt)  # swallowed, as an import's conversion would
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "load_campass", loads_while_interrupted)
    out = tmp_path / "out"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not a background job
    try:
        result = run_cli("cutmix", SAMPLE, out, *CUT, expect=130)
    finally:
        signal.signal(signal.SIGINT, before)
    assert "re-run the same command to resume" in result.output
    assert not (out / "data").exists()
