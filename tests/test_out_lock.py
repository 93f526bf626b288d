"""One writer per OUT (docs/operations.md, "Splitting a job"): a second process refuses at once with
one line naming the first, sibling workers of one sharded job cooperate, a killed writer's lock
never blocks, and workers started together with --overwrite remove the old run once. Also OUT inside
SRC (docs/sources-and-outputs.md, "Sources")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixgen.errors import MixgenError
from mixgen.layout import DOOR_NAME, WORKER_PREFIX
from mixgen.output.lock import Door, claim, live_holders
from mixgen.sources.scan import scan
from tests.conftest import SAMPLE, run_cli, sample_run
from tests.test_resume import CUT, assert_same_run, mixgen_process, record, snapshot, wait_for

# Long enough (300 shards) that a second process starting seconds later finds the first running.
LONG = ["--device", "cpu", "--size", "64", "--pairs", "3000", "--shard-size", "10", "--workers", "1"]


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def hold_lock(out: Path, shard_index: int, info: dict) -> subprocess.Popen:
    """A live process holding OUT's worker lock ``shard_index`` with ``info`` in it."""
    code = (
        "import fcntl, json, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, sys.argv[2].encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    path = out / f"{WORKER_PREFIX}{shard_index}"
    command = [sys.executable, "-c", code, str(path), json.dumps(info)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_second_process_on_one_out_refuses_at_once_and_the_first_completes(tmp_path):
    out = tmp_path / "out"
    first = mixgen_process("cutmix", SAMPLE, out, *LONG, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / f"{WORKER_PREFIX}0", first)
    second = mixgen_process("cutmix", SAMPLE, out, *LONG, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 1
    assert first.poll() is None, "the refusal must come while the first run is still writing"
    line = error_line(stderr)
    assert f"is being written by the same command (pid {first.pid}" in line
    assert "mixgen cutmix" in line and f"kill {first.pid}" in line and "wait for it to finish" in line
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert record(out)["status"] == "complete" and record(out)["counts"]["written"] == 3000
    run_cli("verify", out)
    assert not (out / f"{WORKER_PREFIX}0").exists()  # released and removed at the end


@pytest.mark.slow
def test_two_processes_started_together_one_completes_one_refuses(tmp_path):
    out = tmp_path / "out"
    procs = [
        mixgen_process("cutmix", SAMPLE, out, *LONG, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    finished: dict[int, tuple[int, str, bool]] = {}
    deadline = time.monotonic() + 600
    while len(finished) < 2 and time.monotonic() < deadline:
        for i, proc in enumerate(procs):
            if i not in finished and proc.poll() is not None:
                other_running = procs[1 - i].poll() is None
                finished[i] = (proc.returncode, proc.stderr.read(), other_running)
        time.sleep(0.05)
    assert len(finished) == 2
    codes = sorted(code for code, _, _ in finished.values())
    assert codes == [0, 1], finished
    refused = next(v for v in finished.values() if v[0] == 1)
    assert refused[2], "the refusing process must not wait for the other to finish"
    assert "is being written by the same command" in error_line(refused[1])
    run_cli("verify", out)


@pytest.mark.slow
def test_a_different_run_is_refused_while_one_writes_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    first = mixgen_process("cutmix", SAMPLE, out, *LONG, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / f"{WORKER_PREFIX}0", first)
        result = run_cli("cutmix", SAMPLE, out, *LONG, "--seed", "7", "--overwrite", expect=1)
        assert "is being written by another mixgen" in result.output and f"pid {first.pid}" in result.output
        assert "Traceback" not in result.output
        assert first.poll() is None  # untouched by the refused run
    finally:
        first.kill()
        first.wait()


def test_sibling_workers_pass_the_same_shard_index_twice_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fingerprint = "f" * 16
    info = {"pid": 4242, "command": "mixgen cutmix a b", "fingerprint": fingerprint, "num_shards": 2}
    holder = hold_lock(out, 1, info)
    try:
        with Door(out):
            assert [index for index, _ in live_holders(out)] == [1]
            mine = claim(out, fingerprint, 0, 2)  # worker 0 of the same job: cooperates
        mine.release()
        with Door(out), pytest.raises(MixgenError, match=r"worker 1 of this job .*pid 4242.*kill 4242"):
            claim(out, fingerprint, 1, 2)
        with Door(out), pytest.raises(MixgenError, match="another mixgen run"):
            claim(out, "0" * 16, 0, 2)  # another job
        with Door(out), pytest.raises(MixgenError, match="another mixgen run"):
            claim(out, fingerprint, 0, 1)  # one process for every shard, while a worker runs
    finally:
        holder.kill()
        holder.wait()
    with Door(out):  # the holder is gone: its lock file is a name only
        assert live_holders(out) == []
        claim(out, fingerprint, 1, 2).release(inside_door=True)


@pytest.mark.slow
def test_lock_left_by_a_killed_process_never_blocks(tmp_path):
    out = tmp_path / "out"
    proc = mixgen_process("cutmix", SAMPLE, out, *CUT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / f"{WORKER_PREFIX}0", proc)
    proc.kill()
    proc.wait()
    assert json.loads((out / f"{WORKER_PREFIX}0").read_text() or "{}").get("pid") in (proc.pid, None)
    run_cli("cutmix", SAMPLE, out, *CUT)
    run_cli("verify", out)


@pytest.mark.slow
def test_workers_started_together_with_overwrite_remove_the_old_run_once(tmp_path, cut_reference):
    out = tmp_path / "out"
    run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "5")  # an old, different run
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    procs = [
        mixgen_process(
            "cutmix",
            SAMPLE,
            out,
            *CUT,
            "--overwrite",
            "--num-shards",
            "3",
            "--shard-index",
            str(i),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
    rec = record(out)
    assert rec["status"] == "complete" and rec["config"]["seed"] == 0
    run_cli("verify", out)
    assert_same_run(out, cut_reference)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".mixgen")) == [".mixgen", DOOR_NAME]


@pytest.fixture(scope="module")
def cut_reference(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "cut", "cutmix", *CUT)


# ---------------------------------------------------------------------------------------------
# OUT inside SRC, a mixgen run inside SRC


@pytest.mark.parametrize("where", ["inside", "equal", "symlink"])
def test_out_inside_or_equal_to_src_is_refused_with_one_line(sample_copy, tmp_path, where):
    out = {"inside": sample_copy / "out", "equal": sample_copy, "symlink": tmp_path / "link" / "out"}[where]
    if where == "symlink":
        (tmp_path / "link").symlink_to(sample_copy)
    before = sorted(p.name for p in sample_copy.iterdir())
    for args in (["--dry-run"], []):
        result = run_cli("cutmix", sample_copy, out, *CUT, *args, expect=1)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "choose an OUT outside SRC" in lines[0], result.output
    assert sorted(p.name for p in sample_copy.iterdir()) == before  # nothing written


def test_cam_out_inside_src_is_refused(sample_copy):
    result = run_cli("cam", sample_copy, sample_copy / "cams", "--device", "cpu", expect=1)
    assert "choose an OUT outside SRC" in result.output and not (sample_copy / "cams").exists()


def test_a_mixgen_run_inside_src_is_never_scanned(sample_copy, tmp_path, cut_reference):
    plain = scan(sample_copy)
    shutil.copytree(cut_reference, sample_copy / "zz-old-run")  # a class folder that is a run
    shutil.copytree(cut_reference, sample_copy / "cat" / "mixed")  # a run nested in a class
    index = scan(sample_copy)
    assert index.classes == plain.classes and index.items == plain.items and index.digest == plain.digest
    assert any("'zz-old-run' ignored: it holds a mixgen run" in w for w in index.warnings)
    assert any("'cat/mixed' ignored: it holds a mixgen run" in w for w in index.warnings)
    out = tmp_path / "out"
    result = run_cli("cutmix", sample_copy, out, *CUT)
    assert "holds a mixgen run" in result.output  # the warning is in the summary
    assert_same_run(out, cut_reference)
    refused = run_cli("cutmix", cut_reference, tmp_path / "again", *CUT, expect=1)
    assert "holds a mixgen run (mixgen.json), not source images" in refused.output


# ---------------------------------------------------------------------------------------------
# A different run: what differs


def test_refusal_of_a_different_run_names_the_changed_options(tmp_path, cut_reference):
    out = tmp_path / "out"
    shutil.copytree(cut_reference, out)
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "3", "--quality", "80", expect=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "holds a different mixgen run (--quality 95 → 80; --seed 0 → 3)" in lines[0] and "--overwrite" in lines[0]


def test_refusal_of_a_different_run_counts_added_removed_changed_sources(sample_copy, tmp_path):
    out = tmp_path / "out"
    run_cli("cutmix", sample_copy, out, *CUT)
    before = snapshot(out)
    shutil.copy(sample_copy / "cat" / "cat_0.jpg", sample_copy / "cat" / "new_1.jpg")
    shutil.copy(sample_copy / "cat" / "cat_0.jpg", sample_copy / "rocket" / "new_2.jpg")
    (sample_copy / "flower" / "flower_0.jpg").unlink()
    with open(sample_copy / "coffee" / "coffee_0.jpg", "ab") as f:
        f.write(b"\0")  # same name, other bytes
    result = run_cli("cutmix", sample_copy, out, *CUT, expect=1)
    assert "holds a different mixgen run (sources: 2 added, 1 removed, 1 changed)" in result.output
    assert snapshot(out) == before


def test_lock_files_do_not_make_a_foreign_folder_ours(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    run_cli("cutmix", SAMPLE, out, *CUT, expect=1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # not even a lock file


def test_lock_holder_description_has_pid_and_command(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with Door(out):
        mine = claim(out, "a" * 16, 0, 1)
        info = json.loads((out / f"{WORKER_PREFIX}0").read_text())
        assert info["pid"] == os.getpid() and info["fingerprint"] == "a" * 16 and info["command"]
        [(index, holder)] = live_holders(out)
        assert index == 0 and holder.pid == os.getpid() and "running since" in holder.describe()
        mine.release(inside_door=True)
    assert not (out / f"{WORKER_PREFIX}0").exists()
