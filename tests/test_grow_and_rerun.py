"""Growing a finished run with more --pairs, the instant answer of a complete rerun, refusals of
OUT before the backbone loads, and a dry run that refuses what the run refuses and says what the
run would do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mixgen.pipeline import run as run_module
from tests.conftest import SAMPLE, one_line, run_cli, sample_run
from tests.test_resume import record, snapshot

# CutMix needs no backbone; mixing batches are 64 outputs at --size 64, so a 180-output run's
# second shard (100..179) ends inside a batch (164..227) that a 230-output run fills.
CUT = ["--device", "cpu", "--size", "64", "--shard-size", "100", "--workers", "2"]
SNAP = ["--device", "cpu", "--size", "64", "--pairs", "12", "--workers", "2"]


@pytest.fixture(scope="module")
def cut_runs(tmp_path_factory) -> dict[str, Path]:
    """Runs of 180 and of 230 outputs, with each writer."""
    runs = {}
    for writer in ("files", "webdataset"):
        for pairs in (180, 230):
            name = f"{writer}{pairs}"
            runs[name] = sample_run(tmp_path_factory, name, "cutmix", *CUT, "--writer", writer, "--pairs", pairs)
    return runs


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "snap", "snapmix", *SNAP)


@pytest.fixture
def no_backbone(monkeypatch):
    """The backbone must not load: a complete rerun and a refusal need none."""

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(run_module, "load_campass", refuse)


# ---------------------------------------------------------------------------------------------
# 25.2: grow a finished run


@pytest.mark.parametrize("writer", ["files", "webdataset"])
def test_more_pairs_keeps_the_outputs_and_equals_a_fresh_run(tmp_path, cut_runs, writer):
    out = tmp_path / "out"
    shutil.copytree(cut_runs[f"{writer}180"], out)
    stats = {p: p.stat().st_mtime_ns for p in (out / "data" / "00000").iterdir()}
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--writer", writer, "--pairs", 230)
    assert "growing the run of 180 outputs to 230: 164 outputs kept" in result.output
    rec = record(out)
    assert rec["status"] == "complete" and rec["config"]["pairs"] == 230 and rec["grown_from"] == 180
    # Only the second shard's last, partial mixing batch (164..179) is redone with the new outputs.
    assert rec["counts"]["written"] == 66 and rec["counts"]["kept_from_previous_run"] == 164
    if writer == "files":  # the full first shard's images are kept as they are
        assert {p: p.stat().st_mtime_ns for p in stats if p.name != "metadata.parquet"} == {
            p: t for p, t in stats.items() if p.name != "metadata.parquet"
        }
    assert snapshot(out) == snapshot(cut_runs[f"{writer}230"])  # byte for byte, manifests included
    run_cli("verify", out, "--recompute", "40")


def test_an_interrupted_grow_resumes_as_a_grow(tmp_path, cut_runs):
    """What an interrupt leaves (the record interrupted, the unfinished shard dropped) is resumed by
    the same command; the record still says what the run grew from."""
    out = tmp_path / "out"
    shutil.copytree(cut_runs["files180"], out)
    run_cli("cutmix", SAMPLE, out, *CUT, "--pairs", 230)
    shutil.rmtree(out / "data" / "00002")
    interrupted = {**record(out), "status": "interrupted"}
    (out / "mixgen.json").write_text(json.dumps(interrupted))
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--pairs", 230)
    assert "growing the run of 180 outputs to 230: 200 outputs kept" in result.output
    rec = record(out)
    assert rec["status"] == "complete" and rec["grown_from"] == 180 and rec["counts"]["written"] == 30
    assert snapshot(out) == snapshot(cut_runs["files230"])


def test_more_pairs_with_two_workers_equals_a_fresh_run(tmp_path, cut_runs):
    out = tmp_path / "out"
    shutil.copytree(cut_runs["files180"], out)
    for worker in ("0", "1"):
        run_cli("cutmix", SAMPLE, out, *CUT, "--pairs", 230, "--num-shards", "2", "--shard-index", worker)
    assert record(out)["status"] == "complete"
    assert snapshot(out) == snapshot(cut_runs["files230"])
    run_cli("verify", out)


@pytest.mark.parametrize("dry", [[], ["--dry-run"]])
def test_fewer_pairs_is_refused_naming_overwrite(tmp_path, cut_runs, dry):
    out = tmp_path / "out"
    shutil.copytree(cut_runs["files180"], out)
    before = snapshot(out)
    line = one_line(run_cli("cutmix", SAMPLE, out, *CUT, "--pairs", 100, *dry, expect=1).output)
    assert "holds a run of 180 outputs; --pairs 100 would shrink it" in line and "--overwrite" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# 25.3: a complete rerun answers at once; refusals come before the backbone loads


def test_complete_rerun_answers_without_loading_the_backbone(tmp_path, snap_run, no_backbone):
    out = tmp_path / "out"
    shutil.copytree(snap_run, out)
    before, rec = snapshot(out), (out / "mixgen.json").read_bytes()
    result = run_cli("snapmix", SAMPLE, out, *SNAP, "--workers", "1")  # execution settings may differ
    assert f"already complete: 12 outputs in {out}" in result.output and "outputs/s" not in result.output
    assert result.stdout.strip().endswith(str(out / "data"))
    assert snapshot(out) == before and (out / "mixgen.json").read_bytes() == rec  # nothing written


def test_a_complete_run_with_a_missing_shard_is_resumed(tmp_path, cut_runs):
    out = tmp_path / "out"
    shutil.copytree(cut_runs["files230"], out)
    (out / "data" / "00001" / "metadata.parquet").unlink()
    result = run_cli("cutmix", SAMPLE, out, *CUT, "--pairs", 230)
    assert "already complete" not in result.output and record(out)["counts"]["written"] == 100
    assert snapshot(out) == snapshot(cut_runs["files230"])


def test_refusals_of_out_come_before_the_backbone_loads(tmp_path, snap_run, no_backbone):
    other = tmp_path / "other"
    shutil.copytree(snap_run, other)
    line = one_line(run_cli("snapmix", SAMPLE, other, *SNAP, "--seed", "1", expect=1).output)
    assert "holds a different mixgen run (--seed 0 → 1)" in line
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds no mixgen run" in one_line(run_cli("snapmix", SAMPLE, foreign, *SNAP, expect=1).output)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in one_line(run_cli("snapmix", SAMPLE, a_file, *SNAP, expect=1).output)


# ---------------------------------------------------------------------------------------------
# 24.9 and 25.8: a dry run refuses what the run refuses and says what the run would do


def test_dry_run_refuses_what_the_run_refuses(tmp_path, snap_run):
    other = tmp_path / "other"
    shutil.copytree(snap_run, other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    under_a_file = a_file / "sub"
    cases = {other: ("--seed", "1"), foreign: (), a_file: (), under_a_file: ()}
    expected = {
        other: "holds a different mixgen run",
        foreign: "holds no mixgen run",
        a_file: "is a file",
        under_a_file: f"{a_file} is a file, not a folder; choose another OUT",
    }
    for out, extra in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        line = one_line(run_cli("snapmix", SAMPLE, out, *SNAP, *extra, "--dry-run", expect=1).output)
        assert expected[out] in line
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_dry_run_refuses_a_checkpoint_the_run_refuses_with_the_same_line(tmp_path):
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("hello")
    args = ("--checkpoint", not_weights, "--pairs", "4")
    dry = one_line(run_cli("snapmix", SAMPLE, tmp_path / "dry", *SNAP, *args, "--dry-run", expect=1).output)
    real = one_line(run_cli("snapmix", SAMPLE, tmp_path / "real", *SNAP, *args, expect=1).output)
    assert dry == real.replace("real", "dry") and "--checkpoint" in dry


def test_an_out_without_write_permission_is_refused_in_one_line_by_the_dry_run_and_the_run(tmp_path, monkeypatch):
    import mixgen.files

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access

    def access(path, mode: int) -> bool:
        return real_access(path, mode) and not (Path(path) == read_only and mode & os.W_OK)

    monkeypatch.setattr(mixgen.files.os, "access", access)
    for out, where in ((read_only, "in it"), (read_only / "new", f"in {read_only} to create it")):
        for extra in (("--dry-run",), ()):
            line = one_line(run_cli("cutmix", SAMPLE, out, *CUT, *extra, expect=1).output)
            assert f"OUT {out}: no permission to write {where}; choose an OUT you can write to" in line
    assert not any(read_only.iterdir())


def test_dry_run_says_what_the_run_would_do(tmp_path, cut_runs):
    new = tmp_path / "new"
    words = run_cli("cutmix", SAMPLE, new, *CUT, "--pairs", 230, "--dry-run").stdout
    assert "sources: 20 images of 5 classes (imagefolder layout)" in words
    assert "outputs: 230 jpg images of 64×64 px in 3 shard(s) of up to 100 (files writer)" in words
    assert f"OUT {new}: would start a new run; 230 outputs to write" in words
    assert "estimate: about " in words and " on disk and " in words
    assert not new.exists()

    grown = run_cli("cutmix", SAMPLE, cut_runs["files180"], *CUT, "--pairs", 230, "--dry-run").stdout
    assert "would grow the run there from 180 outputs; 66 outputs to write" in grown
    done = run_cli("cutmix", SAMPLE, cut_runs["files230"], *CUT, "--pairs", 230, "--dry-run").stdout
    assert "already complete: nothing to write\n" in done and "0 outputs to write" not in done
    other = run_cli("cutmix", SAMPLE, cut_runs["files230"], *CUT, "--pairs", 230, "--seed", "3", "--overwrite",
                    "--dry-run").stdout  # fmt: skip
    assert "would replace the different run there (--overwrite); 230 outputs to write" in other

    summary = json.loads(
        run_cli("cutmix", SAMPLE, cut_runs["files180"], *CUT, "--pairs", 230, "--dry-run", "--json").stdout
    )
    assert summary["action"] == "grow" and summary["to_write"] == 66 and summary["previous_outputs"] == 180
    assert summary["layout"] == "imagefolder" and summary["sources"] == 20 and summary["classes"] == 5
    assert summary["estimate"]["disk_bytes"] > 0 and summary["estimate"]["seconds"] >= 0


# ---------------------------------------------------------------------------------------------
# 31.5: a cut grow never removes a finished output before its replacement is whole

ONE = ["--device", "cpu", "--size", "64", "--workers", "2"]  # one shard of up to 10,000 outputs


@pytest.fixture(scope="module")
def one_shard_runs(tmp_path_factory) -> dict[str, Path]:
    """Runs of 70 and of 400 outputs in one shard, with each writer."""
    return {
        f"{writer}{pairs}": sample_run(
            tmp_path_factory, f"one{writer}{pairs}", "cutmix", *ONE, "--writer", writer, "--pairs", pairs
        )
        for writer in ("files", "webdataset")
        for pairs in (70, 400)
    }


def _cut_after(monkeypatch, writes: int, *, hard: bool) -> None:
    """Interrupt a run at its ``writes``-th output (Ctrl-C); ``hard``: as kill -9 would, nothing
    cleaned up after it."""
    from mixgen.output import writers
    from tests.test_resume import _fail_after

    wrapper, _ = _fail_after(writes, KeyboardInterrupt(), run_module._write_output)
    monkeypatch.setattr(run_module, "_write_output", wrapper)
    if hard:
        monkeypatch.setattr(writers.FilesWriter, "discard_unfinished", lambda self, shard: None)
        monkeypatch.setattr(writers.WebDatasetWriter, "discard_unfinished", lambda self, shard: None)


@pytest.mark.parametrize("writer", ["files", "webdataset"])
@pytest.mark.parametrize(("writes", "hard"), [(3, False), (90, False), (200, True), (330, True)])
def test_a_cut_grow_keeps_every_finished_output(tmp_path, monkeypatch, one_shard_runs, writer, writes, hard):
    out = tmp_path / "out"
    shutil.copytree(one_shard_runs[f"{writer}70"], out)
    before = snapshot(out)
    _cut_after(monkeypatch, writes, hard=hard)
    run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400, expect=130)
    monkeypatch.undo()
    if not hard:  # Ctrl-C: the finished run is left as it was, byte for byte
        assert snapshot(out) == before
        assert "interrupted" in run_cli("verify", out, expect=3).output  # the grow, not the 70 outputs
    # Going back to the finished run answers from what is on disk, never from the cut grow's count.
    result = run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 70)
    assert "400" not in result.output and record(out)["status"] == "complete"
    assert record(out)["counts"]["written"] == 0 and "grown_from" not in record(out)
    assert snapshot(out) == before
    run_cli("verify", out)
    # and the grow taken up again equals a fresh run of 400
    run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400)
    assert snapshot(out) == snapshot(one_shard_runs[f"{writer}400"])


@pytest.mark.parametrize("writer", ["files", "webdataset"])
def test_a_cut_grow_resumed_keeps_the_finished_outputs(tmp_path, monkeypatch, one_shard_runs, writer):
    out = tmp_path / "out"
    shutil.copytree(one_shard_runs[f"{writer}70"], out)
    _cut_after(monkeypatch, 250, hard=True)
    run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400, expect=130)
    monkeypatch.undo()
    result = run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400)
    assert "growing the run of 70 outputs to 400: 64 outputs kept" in result.output
    assert snapshot(out) == snapshot(one_shard_runs[f"{writer}400"])


@pytest.mark.parametrize("writer", ["files", "webdataset"])
def test_a_grow_cut_inside_its_commit_is_finished_on_the_next_run(tmp_path, monkeypatch, one_shard_runs, writer):
    """Killed between moving the redone outputs (or the new tar) into place and the new manifest:
    the pending manifest was whole, so the next run completes that commit."""
    from mixgen.output import writers

    out = tmp_path / "out"
    shutil.copytree(one_shard_runs[f"{writer}70"], out)
    real_replace = os.replace

    def cut_at_manifest(src, dst):
        if Path(dst).name == "metadata.parquet" and Path(src).name == writers.PENDING_MANIFEST:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(writers.os, "replace", cut_at_manifest)
    monkeypatch.setattr(writers.FilesWriter, "discard_unfinished", lambda self, shard: None)
    monkeypatch.setattr(writers.WebDatasetWriter, "discard_unfinished", lambda self, shard: None)
    run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400, expect=130)
    monkeypatch.undo()
    assert (out / "data" / "00000" / writers.PENDING_MANIFEST).is_file()
    run_cli("cutmix", SAMPLE, out, *ONE, "--writer", writer, "--pairs", 400)
    assert snapshot(out) == snapshot(one_shard_runs[f"{writer}400"])
    run_cli("verify", out)


def test_a_smaller_pairs_after_a_cut_grow_names_the_finished_run(tmp_path, monkeypatch, one_shard_runs):
    out = tmp_path / "out"
    shutil.copytree(one_shard_runs["files70"], out)
    _cut_after(monkeypatch, 90, hard=False)
    run_cli("cutmix", SAMPLE, out, *ONE, "--pairs", 400, expect=130)
    monkeypatch.undo()
    line = one_line(run_cli("cutmix", SAMPLE, out, *ONE, "--pairs", 50, expect=1).output)
    assert "holds a run of 70 outputs (its grow to 400 was cut); --pairs 50 would shrink it" in line
    assert "--pairs 400" in line


# ---------------------------------------------------------------------------------------------
# 31.6: a source changed in place at the same byte size


def _with_orientation(path: Path, orientation: int) -> None:
    """Re-save a photo with an EXIF orientation tag, as a camera writes it."""
    from PIL import Image

    with Image.open(path) as image:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.convert("RGB").save(path, exif=exif.tobytes(), quality=90)


def _rotate_in_place(path: Path) -> None:
    """What a viewer's "rotate" does: the orientation byte 1 → 3, same size, a new mtime."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01")  # little-endian: b"\x12\x01..."
    if at < 0:
        at = data.find(b"\x12\x01\x03\x00\x01\x00\x00\x00\x01\x00")
        data[at + 8] = 3
    else:
        data[at + 9] = 3
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


@pytest.mark.parametrize("pairs", [70, 90])  # a resume (or a rerun of a complete run) and a grow
def test_a_source_changed_in_place_at_the_same_size_is_refused(tmp_path, sample_copy, pairs):
    photo = sample_copy / "cat" / "cat_0.jpg"
    _with_orientation(photo, 1)
    out = tmp_path / "out"
    run_cli("cutmix", sample_copy, out, *ONE, "--pairs", 70)
    _rotate_in_place(photo)
    for dry in ([], ["--dry-run"]):
        line = one_line(run_cli("cutmix", sample_copy, out, *ONE, "--pairs", pairs, *dry, expect=1).output)
        assert "sources: 1 changed (cat/cat_0.jpg" in line and "--overwrite" in line
    result = run_cli("verify", out, "--recompute", "5", expect=None)
    assert "changed since the run (sources: 1 changed (cat/cat_0.jpg" in result.output  # not outputs blamed


def test_a_new_mtime_alone_is_no_change(tmp_path, sample_copy):
    """A copy of SRC without its times (``cp -r``) is the same sources: content decides."""
    out = tmp_path / "out"
    run_cli("cutmix", sample_copy, out, *ONE, "--pairs", 70)
    for photo in sample_copy.rglob("*.jpg"):
        os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    assert "already complete" in run_cli("cutmix", sample_copy, out, *ONE, "--pairs", 70).output
    result = run_cli("cutmix", sample_copy, out, *ONE, "--pairs", 90)
    assert "growing the run of 70 outputs to 90" in result.output
