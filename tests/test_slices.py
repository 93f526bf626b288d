"""The source stage split across the workers of a job: each source is decoded and run through
the backbone once, whoever does it, and any split makes the same caches and outputs as one
process; a worker killed holding a slice leaves it to the next taker; a late worker only loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mixgen.output.lock import hold
from mixgen.pipeline.prepare import SLICES_MAX, slice_spans
from tests.conftest import REPO, SAMPLE, run_cli, sample_run
from tests.test_resume import assert_same_run, record

# --cam-size 320 makes the CPU backbone call 8 images: 20 sources are 3 slices (8, 8, 4).
SNAP = ["--device", "cpu", "--size", "64", "--cam-size", "320", "--pairs", "40", "--shard-size", "10"]
SLICES = 3


def worker(out: Path, index: int, count: int, **kwargs) -> subprocess.Popen:
    split = ["--num-shards", str(count), "--shard-index", str(index)]
    command = [sys.executable, "-m", "mixgen", "snapmix", str(SAMPLE), str(out), *SNAP, "--workers", "1", *split]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def caches(out: Path) -> dict[str, bytes]:
    """The view and map caches (their JSON companions hold timings; the arrays are compared)."""
    found = {p.name: p.read_bytes() for p in (out / ".mixgen").glob("*") if p.suffix in (".u8", ".npy")}
    assert any(name.startswith("views-") for name in found) and any(name.startswith("maps-") for name in found)
    return found


def work(out: Path, name: str = "mixgen.json") -> tuple[int, int, int]:
    counts = record(out, name)["counts"]
    return counts["slices"], counts["slices_prepared"], counts["backbone_sources"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = sample_run(tmp_path_factory, "single", "snapmix", *SNAP, "--workers", "2")
    assert work(out) == (SLICES, SLICES, 20)
    return out


def test_slices_are_fixed_by_the_source_count_and_the_backbone_call():
    for n, unit in [(1, 8), (20, 8), (200, 8), (11_788, 8), (1_000_000, 64), (5, 64)]:
        spans = slice_spans(n, unit)
        assert [p for span in spans for p in span] == list(range(n))
        assert all(len(span) % unit == 0 for span in spans[:-1]) and len(spans) <= SLICES_MAX
    assert len(slice_spans(20, 8)) == SLICES


@pytest.mark.slow
def test_two_workers_prepare_each_source_once_and_match_one_process(tmp_path, single):
    out = tmp_path / "out"
    procs = [worker(out, index, 2) for index in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    rec = record(out)
    assert rec["status"] == "complete" and rec["counts"]["written"] == 40
    mine = [work(out, f"mixgen.worker-{i}-of-2.json") for i in range(2)]
    assert sum(prepared for _, prepared, _ in mine) == SLICES  # every slice once, by one worker
    assert sum(sources for _, _, sources in mine) == 20  # the backbone ran over each source once
    assert work(out) == (SLICES, SLICES, 20)
    run_cli("verify", out)
    assert_same_run(out, single)
    assert caches(out) == caches(single)
    assert not list((out / ".mixgen").glob("slices-*"))


@pytest.mark.slow
def test_a_later_worker_finds_the_sources_prepared_and_only_loads_them(tmp_path, single):
    out = tmp_path / "out"
    run_cli("snapmix", SAMPLE, out, *SNAP, "--num-shards", "2", "--shard-index", "1")
    assert work(out, "mixgen.worker-1-of-2.json") == (SLICES, SLICES, 20)
    run_cli("snapmix", SAMPLE, out, *SNAP, "--num-shards", "2", "--shard-index", "0")
    assert work(out, "mixgen.worker-0-of-2.json") == (SLICES, 0, 0)
    assert_same_run(out, single)
    assert caches(out) == caches(single)


def test_a_slice_held_by_a_live_process_is_busy_and_free_once_it_is_killed(tmp_path):
    path = tmp_path / "00000.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mixgen.output.lock import hold; import time; hold({str(path)!r}); time.sleep(600)",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 60
        while not (path.exists() and path.stat().st_size):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert hold(path) is None  # a live holder: nothing is done twice
        assert json.loads(path.read_text())["pid"] == holder.pid  # and it says who holds it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fd = hold(path)  # the kernel dropped the dead holder's lock: the slice can be taken again
    assert fd is not None
    os.close(fd)


@pytest.mark.slow
def test_a_worker_killed_in_a_slice_leaves_it_to_the_next_run(tmp_path, single):
    out = tmp_path / "out"
    proc = worker(out, 0, 1)
    deadline = time.monotonic() + 300
    while not list(out.glob(".mixgen/slices-*/*.lock")):
        assert proc.poll() is None and time.monotonic() < deadline, "the worker ended before it took a slice"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    board = next(out.glob(".mixgen/slices-*"))
    done = len(list(board.glob("*.json")))
    assert done < SLICES, "the kill must land while slices are being prepared"
    run_cli("snapmix", SAMPLE, out, *SNAP, "--workers", "2")  # the same job again
    assert work(out) == (SLICES, SLICES - done, 20 - 8 * done)  # only what was not done, the killed slice again
    run_cli("verify", out)
    assert_same_run(out, single)
    assert caches(out) == caches(single)


def test_a_worker_still_taking_in_slices_when_another_seals_keeps_the_board_until_it_leaves(tmp_path, monkeypatch):
    """The regression of workers started together: the first to finish seals the caches while a
    sibling is still in its slice loop. The board must outlive every member (a sibling re-making
    it would seal a second time, from a view file already renamed), and the last to leave removes it."""
    from concurrent.futures import ThreadPoolExecutor

    import mixgen.pipeline.prepare as prepare
    from mixgen.config import RunConfig
    from mixgen.progress import Reporter

    cfg = RunConfig(method="cutmix", src=SAMPLE, out=tmp_path / "out", size=32, device="cpu", workers=1, batch_size=4)
    index = cfg.scan_sources()
    joined, sealed = threading.Event(), threading.Event()
    real_work, real_finish, finishes = prepare._work_slices, prepare._finish, []

    def work_slices(*args):
        if threading.current_thread().name == "late":
            joined.set()
            assert sealed.wait(120)
        return real_work(*args)

    def finish(*args):
        finishes.append(threading.current_thread().name)
        return real_finish(*args)

    monkeypatch.setattr(prepare, "_work_slices", work_slices)
    monkeypatch.setattr(prepare, "_finish", finish)
    results = {}

    def late() -> None:
        with ThreadPoolExecutor(1) as pool:
            results["late"] = prepare.prepare_sources(cfg, index, None, pool, Reporter(), None)

    thread = threading.Thread(target=late, name="late")
    thread.start()
    assert joined.wait(120)
    with ThreadPoolExecutor(1) as pool:
        first = prepare.prepare_sources(cfg, index, None, pool, Reporter(), None)
    (board,) = (cfg.out / ".mixgen").glob("slices-*")
    assert (board / "sealed").exists()  # sealed, and kept for the member still at work
    sealed.set()
    thread.join(120)
    assert finishes == ["MainThread"] and not list((cfg.out / ".mixgen").glob("slices-*"))
    assert first.work["slices_prepared"] == len(slice_spans(len(index), 4)) and "late" in results
    assert results["late"].work["slices_prepared"] == 0
    everything = list(range(len(index)))
    assert (results["late"].views.read(everything) == first.views.read(everything)).all()


def test_a_long_wait_for_a_slice_names_its_holder_and_ends_when_it_dies(tmp_path, monkeypatch):
    """A sibling that hangs holding a slice is said in one line naming it (pid and command); once
    it is stopped, the waiting worker takes the slice over."""
    from concurrent.futures import ThreadPoolExecutor

    import mixgen.pipeline.prepare as prepare
    from mixgen.config import RunConfig
    from mixgen.files import allocate
    from mixgen.progress import Reporter

    cfg = RunConfig(method="cutmix", src=SAMPLE, out=tmp_path / "out", size=32, device="cpu", workers=1, batch_size=4)
    index = cfg.scan_sources()
    key = prepare.views_cache_key(index.digest, cfg.size, cfg.resize)
    board = cfg.out / ".mixgen" / f"slices-{key}"
    board.mkdir(parents=True)  # a job in progress: its view file reserved, slice 0 held by a sibling
    allocate(cfg.out / ".mixgen" / f"views-{key}.u8.part", len(index) * 32 * 32 * 3)
    lock = board / "00000.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from mixgen.output.lock import hold; import time; hold({str(lock)!r}); time.sleep(600)",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    notes: list[str] = []

    class Notes(Reporter):
        def info(self, message: str) -> None:
            notes.append(message)

    monkeypatch.setattr(prepare, "WAIT_NOTE_S", 0.3)
    results = {}

    def work() -> None:
        with ThreadPoolExecutor(1) as pool:
            results["prepared"] = prepare.prepare_sources(cfg, index, None, pool, Notes(), None)

    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.stat().st_size):
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        thread = threading.Thread(target=work)
        thread.start()
        while not notes:
            assert thread.is_alive() and time.monotonic() < deadline, "no note of the wait"
            time.sleep(0.05)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    thread.join(120)
    [note] = notes
    assert f"held by pid {holder.pid}" in note and "sources 0-3" in note and "stop it" in note
    assert results["prepared"].work["slices_prepared"] == len(slice_spans(len(index), 4))
