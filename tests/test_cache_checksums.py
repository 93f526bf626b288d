"""Damaged caches are rebuilt, never used (docs/operations.md, "Interrupted? Run the same command
again"): after an interrupted run, a flipped byte in any file under OUT/.mixgen (or zeroed CAM rows)
makes the resume rebuild that cache, say so, and end with exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mixgen.files import allocate
from mixgen.layout import digests_path
from mixgen.output import manifest
from mixgen.output.cache import RecordFile, load_checked_array, save_checked_array
from tests.conftest import SAMPLE, run_cli, sample_run
from tests.test_resume import SNAP, _fail_after, assert_same_run, record


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "ref", "snapmix", *SNAP)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A SnapMix run stopped (Ctrl-C) after 3 of its 24 shards, caches complete."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.MonkeyPatch.context() as mp:
        wrapper, _ = _fail_after(3, KeyboardInterrupt(), manifest.write_shard)
        mp.setattr(manifest, "write_shard", wrapper)
        run_cli("snapmix", SAMPLE, out, *SNAP, expect=130)
    assert record(out)["status"] == "interrupted"
    return out


def cache_file(out: Path, pattern: str) -> Path:
    [path] = (out / ".mixgen").glob(pattern)
    return path


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


CACHES = {
    "views-u8": ("views-*.u8", "views cache damaged (1 of 20 records)"),
    "views-u8-every-record": ("views-*.u8", "views cache damaged (20 of 20 records)"),
    "views-json": ("views-*.json", "views cache damaged"),
    "views-crc32": ("views-*.u8.crc32", "views cache damaged (its checksum file is damaged)"),
    "maps-npy": ("maps-*.npy", "CAM maps cache damaged (1 of 20 records)"),
    "maps-json": ("maps-*.json", "CAM maps cache damaged"),
    "maps-crc32": ("maps-*.npy.crc32", "CAM maps cache damaged (its checksum file is damaged)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CACHES))
def test_flipped_byte_in_a_cache_file_is_rebuilt_and_the_resume_matches(tmp_path, interrupted, reference, name):
    pattern, note = CACHES[name]
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    path = cache_file(out, pattern)
    if name == "views-u8-every-record":  # the centre pixel of every view: the old code's outputs differed
        record_bytes, side = path.stat().st_size // 20, 64
        for position in range(20):
            flip_byte(path, position * record_bytes + (side // 2 * side + side // 2) * 3)
    elif name == "maps-npy":
        header = path.stat().st_size - 20 * int(np.load(path)[0].nbytes)
        flip_byte(path, header + (path.stat().st_size - header) // 2)  # in the data, not the header
    else:
        flip_byte(path)
    result = run_cli("snapmix", SAMPLE, out, *SNAP)
    rec = record(out)
    assert rec["status"] == "complete" and rec["resumed"] is True
    assert rec["counts"]["kept_from_previous_run"] == 30
    assert len(rec["cache_rebuilt"]) == 1 and rec["cache_rebuilt"][0].startswith(note), rec["cache_rebuilt"]
    assert rec["cache_rebuilt"][0].endswith(": rebuilt")
    assert "cache damaged" in result.output  # said in the summary too
    run_cli("verify", out)
    assert_same_run(out, reference)
    # The rebuilt cache is sound again: the next run with work to do (a shard lost) reuses it silently.
    (out / "data" / "00000" / "metadata.parquet").unlink()
    run_cli("snapmix", SAMPLE, out, *SNAP)
    assert record(out)["cache_rebuilt"] == []


@pytest.mark.slow
def test_zeroed_cam_rows_are_rebuilt_and_the_resume_matches(tmp_path, interrupted, reference):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    path = cache_file(out, "maps-*.npy")
    maps = np.load(path)
    maps[[2, 5, 11]] = 0
    np.save(path, maps)
    run_cli("snapmix", SAMPLE, out, *SNAP)
    assert record(out)["cache_rebuilt"] == ["CAM maps cache damaged (3 of 20 records): rebuilt"]
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_cache_without_its_checksums_is_not_trusted(tmp_path, interrupted, reference):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    views = cache_file(out, "views-*.u8")
    digests_path(views).unlink()
    flip_byte(views)
    run_cli("snapmix", SAMPLE, out, *SNAP)
    assert record(out)["cache_rebuilt"] == ["views cache damaged (no checksums (never finished)): rebuilt"]
    assert_same_run(out, reference)


def test_a_maps_cache_replaced_by_a_folder_is_rebuilt(tmp_path, interrupted, reference):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    path = cache_file(out, "maps-*.npy")
    path.unlink()
    path.mkdir()
    result = run_cli("snapmix", SAMPLE, out, *SNAP)
    assert ".tmp" not in result.output
    assert record(out)["cache_rebuilt"] == [f"CAM maps cache damaged ({path.name} missing or unreadable): rebuilt"]
    assert path.is_file()
    assert_same_run(out, reference)


def test_record_file_checksums_follow_writes(tmp_path):
    path = tmp_path / "r.u8"
    allocate(path, 5 * 12)
    records = RecordFile(path, 5, (4, 3), np.uint8)
    for i in (0, 3):
        records.write(i, np.full((4, 3), i + 1, np.uint8))
    records.seal(meta_path=None)
    assert records.damage() is None
    again = RecordFile(path, 5, (4, 3), np.uint8)
    assert again.damage() is None
    flip_byte(path, 3 * 12 + 5)
    assert RecordFile(path, 5, (4, 3), np.uint8).damage() == "1 of 5 records"


def test_checked_array_round_trip_and_damage(tmp_path):
    path, meta = tmp_path / "grids.npy", tmp_path / "grids.json"
    meta.write_text('{"grid": 7}')
    grids = np.arange(4 * 7 * 7, dtype=np.float32).reshape(4, 7, 7)
    save_checked_array(path, grids, meta)
    loaded, problem = load_checked_array(path, 4, meta)
    assert problem is None and np.array_equal(loaded, grids)
    assert load_checked_array(path, 5, meta) == (None, "wrong shape")
    assert load_checked_array(tmp_path / "absent.npy", 4) == (None, None)
    meta.write_text('{"grid": 8}')
    assert load_checked_array(path, 4, meta) == (None, "grids.json changed")


@contextlib.contextmanager
def fifo_watchdog(fifo: Path, after: float = 30.0) -> Iterator[threading.Event]:
    """After ``after`` seconds, releases any reader blocked on ``fifo`` (opens and closes its write
    end) and says so: a test then fails on the event instead of hanging for good."""
    released, stop = threading.Event(), threading.Event()

    def watch() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader waits
            except OSError:
                stop.wait(0.05)
                continue
            os.close(fd)
            released.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield released
    finally:
        stop.set()
        thread.join()


def link_to_fifo(path: Path) -> Path:
    """Replace ``path`` by a symlink to a FIFO (reading it would block until a writer comes)."""
    fifo = path.with_name(path.name + ".fifo")
    os.mkfifo(fifo)
    path.unlink(missing_ok=True)
    path.symlink_to(fifo.name)
    return fifo


def test_cache_files_that_are_fifos_are_not_read(tmp_path):
    from mixgen.files import read_json
    from mixgen.output.cache import load_seal

    status = tmp_path / "status.json"
    array = tmp_path / "maps.npy"
    save_checked_array(array, np.ones((3, 2), dtype=np.float32))
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    with fifo_watchdog(link_to_fifo(status), after=5) as released:
        assert read_json(status) is None
    assert not released.is_set()
    with fifo_watchdog(link_to_fifo(digests_path(array)), after=5) as released:
        assert isinstance(load_seal(array, 3, 8), str)
    assert not released.is_set()
    save_checked_array(array, np.ones((3, 2), dtype=np.float32), meta)
    with fifo_watchdog(link_to_fifo(meta), after=5) as released:
        assert load_seal(array, 3, 8, meta) == "meta.json unreadable"
    assert not released.is_set()


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["views-*.json", "views-*.u8.crc32", "maps-*.json"])
def test_a_cache_file_linked_to_a_fifo_is_rebuilt_not_waited_on(tmp_path, interrupted, reference, pattern):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    fifo = link_to_fifo(cache_file(out, pattern))
    with fifo_watchdog(fifo) as released:
        run_cli("snapmix", SAMPLE, out, *SNAP)
    assert not released.is_set()
    rec = record(out)
    assert rec["status"] == "complete" and len(rec["cache_rebuilt"]) <= 1  # a FIFO is no cache: maybe silent
    assert_same_run(out, reference)
