"""Nothing lost, nothing faked (issue 24): ``--overwrite`` removes only mixgen's own files and
fails loudly where it cannot; a shard is kept on resume only when its manifest proves it is this
run's; verify and recompute see a record and manifests of different runs; a damaged run record
is rebuilt from the manifests instead of blocking the resume; a cache entry replaced by a folder
is rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, run_cli, sample_run
from tests.test_resume import CUT, assert_same_run, record, snapshot


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "cut", "cutmix", *CUT)


@pytest.fixture(scope="module")
def mixup_run(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "mixup", "mixup", *CUT)


def lines_of(output: str) -> list[str]:
    assert "Traceback" not in output
    return [line for line in output.splitlines() if line.strip()]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with its bytes, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes().hex()[:64] for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Item 2: OUT/data as a symlink; shards of another run are never adopted


def test_overwrite_refuses_a_symlinked_data_folder_and_keeps_everything(cut_run, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "disk2" / "data"
    shutil.copytree(cut_run, out)
    elsewhere.parent.mkdir()
    (out / "data").rename(elsewhere)
    (out / "data").symlink_to(elsewhere)
    before = tree(elsewhere)
    result = run_cli("mixup", SAMPLE, out, *CUT, "--overwrite", expect=1)
    [line] = lines_of(result.output)
    assert f"{out / 'data'} is a symbolic link" in line and "--overwrite removes only mixgen's own files" in line
    assert tree(elsewhere) == before and record(out)["config"]["method"] == "cutmix"


def test_a_shard_of_another_run_with_the_right_indices_is_redone_not_kept(cut_run, mixup_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(mixup_run, out)
    shutil.rmtree(out / "data" / "00002")
    shutil.copytree(cut_run / "data" / "00002", out / "data" / "00002")  # cutmix rows, indices 20..29
    result = run_cli("verify", out, expect=3)
    assert "00002/metadata.parquet: made by another run than mixgen.json records" in result.output
    run_cli("mixup", SAMPLE, out, *CUT)
    assert record(out)["counts"]["kept_from_previous_run"] == 50
    assert_same_run(out, mixup_run)


def test_verify_and_recompute_catch_a_record_of_another_run(cut_run, mixup_run, tmp_path):
    from mixgen.commands.recompute import recompute

    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    shutil.copy(mixup_run / "mixgen.json", out / "mixgen.json")  # the record says mixup, every row cutmix
    result = run_cli("verify", out, expect=3)
    assert "made by another run than mixgen.json records" in result.output
    problems = recompute(out, 3).problems
    assert "mixgen.json and the manifests record different runs (method mixup in the record, cutmix in" in problems[0]


# ---------------------------------------------------------------------------------------------
# Item 7: --overwrite removes only what mixgen names


@pytest.mark.parametrize("foreign", ["data/notes.txt", "data/00001/notes.txt", ".mixgen/my-settings.yaml", "data/x"])
def test_overwrite_refuses_when_a_foreign_file_sits_among_mixgens(cut_run, tmp_path, foreign):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    path = out / foreign
    if foreign == "data/x":
        (path / "deep").mkdir(parents=True)  # a folder mixgen never makes
    else:
        path.write_text("mine")
    before = tree(out)
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", "--overwrite", expect=1)
    [line] = lines_of(result.output)
    assert str(path) in line and "--overwrite removes only mixgen's own files" in line, line
    assert tree(out) == before  # nothing removed


def test_overwrite_removes_mixgens_files_and_leaves_the_users_beside_them(cut_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    (out / "notes.txt").write_text("mine")  # beside the run, not among its files
    run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    assert record(out)["resumed"] is False and record(out)["config"]["seed"] == 1
    fresh = tmp_path / "fresh"
    run_cli("cutmix", SAMPLE, fresh, *CUT, "--seed", "1")
    assert_same_run(out, fresh)


def test_overwrite_that_cannot_remove_a_file_is_an_error(cut_run, tmp_path, monkeypatch):
    import os

    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if str(path).endswith("00003/metadata.parquet"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", "--overwrite", expect=1)
    [line] = lines_of(result.output)
    assert "--overwrite could not remove" in line and "00003/metadata.parquet (Permission denied)" in line


# ---------------------------------------------------------------------------------------------
# Item 10: a damaged run record


@pytest.mark.parametrize("damage", ["{not json", "[]", "{}"])
def test_a_damaged_record_is_rebuilt_from_the_manifests_and_the_run_resumes(cut_run, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    shutil.rmtree(out / "data" / "00004")  # one shard still to do
    (out / "mixgen.json").write_text(damage)
    run_cli("cutmix", SAMPLE, out, *CUT)
    rec = record(out)
    assert rec["status"] == "complete" and rec["resumed"] is True
    assert rec["counts"]["kept_from_previous_run"] == 50 and rec["counts"]["written"] == 10
    assert_same_run(out, cut_run)
    run_cli("verify", out)


def test_a_damaged_record_of_a_different_run_is_refused_saying_so(cut_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    (out / "mixgen.json").write_text("{not json")
    before = snapshot(out)
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--seed", "1", expect=1)
    [line] = lines_of(result.output)
    assert "holds a different mixgen run (--seed 0 → 1" in line
    assert "mixgen.json is damaged, so this was read from its shards' manifests" in line
    assert snapshot(out) == before


def test_a_damaged_record_without_finished_shards_starts_afresh(tmp_path, cut_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mixgen.json").write_text(json.dumps({"status": "running"}))  # no fingerprint: damaged
    run_cli("cutmix", SAMPLE, out, *CUT)
    assert record(out)["status"] == "complete"
    assert_same_run(out, cut_run)


# ---------------------------------------------------------------------------------------------
# Item 13: a cache entry replaced by a folder


@pytest.mark.parametrize("pattern", ["views-*.u8", "views-*.json", "views-*.u8.crc32", "sources.npy"])
def test_a_cache_entry_replaced_by_a_folder_is_rebuilt(cut_run, tmp_path, pattern):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    [path] = (out / ".mixgen").glob(pattern)
    path.unlink()
    path.mkdir()
    # A complete rerun answers without reading any cache: a shard lost gives the run work to do.
    (out / "data" / "00000" / "metadata.parquet").unlink()
    result = run_cli("cutmix", SAMPLE, out, *CUT)
    assert "Traceback" not in result.output and ".tmp" not in result.output
    rec = record(out)
    assert rec["status"] == "complete" and rec["counts"]["kept_from_previous_run"] == 50
    assert path.is_file()
    if pattern.startswith("views"):
        why = "no checksums (never finished)" if pattern.endswith("crc32") else f"{path.name} was a folder"
        assert rec["cache_rebuilt"] == [f"views cache damaged ({why}): rebuilt"]
    (out / "data" / "00000" / "metadata.parquet").unlink()
    run_cli("cutmix", SAMPLE, out, *CUT)  # the rebuilt cache is whole
    assert record(out)["cache_rebuilt"] == []


def test_a_cache_name_holding_a_folder_of_files_is_refused_in_one_line(cut_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    [path] = (out / ".mixgen").glob("views-*.u8")
    path.unlink()
    (path / "inside").mkdir(parents=True)
    (out / "data" / "00000" / "metadata.parquet").unlink()  # work to do: a complete rerun reads no cache
    result = run_cli("cutmix", SAMPLE, out, *CUT, expect=1)
    [line] = lines_of(result.output)
    assert f"{path} is a folder where mixgen keeps a cache file" in line and "move it out of OUT" in line
    assert (path / "inside").is_dir()


def test_a_records_lock_replaced_by_a_folder_does_not_stop_a_worker(cut_run, tmp_path):
    out = tmp_path / "out"
    for worker in (1, 0):
        if worker == 0:
            lock = out / ".mixgen" / "records.lock"
            lock.unlink()
            lock.mkdir()
        run_cli("cutmix", SAMPLE, out, *CUT, "--num-shards", "2", "--shard-index", str(worker))
    assert record(out)["status"] == "complete" and (out / ".mixgen" / "records.lock").is_file()
    assert_same_run(out, cut_run)


def test_overwrite_removes_the_slice_boards_and_locks_a_stopped_job_left(cut_run, tmp_path):
    """A job stopped during its source stage leaves its slice board and lock files in .mixgen/:
    they are mixgen's own, so --overwrite removes them (and still refuses a foreign file there)."""
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    board = out / ".mixgen" / "slices-0123abcd"
    board.mkdir()
    for name in ("00000.lock", "00000.json", "00000.npy", "00001.f16", "00001.lock"):
        (board / name).write_bytes(b"x")
    (out / ".mixgen" / "prepare.lock").write_bytes(b"")
    (out / ".mixgen" / "backbone-host-1.lock").write_bytes(b"")
    run_cli("mixup", SAMPLE, out, *CUT, "--overwrite")
    assert record(out)["config"]["method"] == "mixup" and not board.exists()
    assert not (out / ".mixgen" / "backbone-host-1.lock").exists()

    board.mkdir()
    (board / "notes.txt").write_text("mine")
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--overwrite", expect=1)
    [line] = lines_of(result.output)
    assert f"{board / 'notes.txt'} is not a file mixgen writes" in line
    assert (board / "notes.txt").read_text() == "mine"
