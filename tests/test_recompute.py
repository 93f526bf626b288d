"""``mixgen verify OUT --recompute K|all`` (docs/operations.md, "mixgen verify OUT"): sampled rows
derived afresh from SRC, with no trust in OUT's caches, must match image bytes and every column; a
consistent lie (an image replaced together with its sha256, wrong weights) is caught and named; a
changed or missing SRC is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixgen.commands.recompute import parse_count, sample_rows
from tests.conftest import SAMPLE, run_cli
from tests.test_cache_checksums import flip_byte

# Two shards of 25 and 15 rows at 96 px: mix batches of 64 cut at each shard's start.
SNAP = ["--device", "cpu", "--size", "96", "--pairs", "40", "--shard-size", "25", "--workers", "2"]


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory) -> tuple[Path, Path]:
    """(SRC copy, OUT) of a small SnapMix run; tests copy OUT before changing it."""
    root = tmp_path_factory.mktemp("recompute")
    src, out = root / "src", root / "out"
    shutil.copytree(SAMPLE, src)
    run_cli("snapmix", src, out, *SNAP)
    return src, out


def edit_manifest(out: Path, shard: str, index: int, **values) -> None:
    path = out / "data" / shard / "metadata.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    for row in rows:
        if row["index"] == index:
            row.update(values)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def problem_lines(output: str) -> list[str]:
    assert "Traceback" not in output
    return [line for line in output.splitlines() if line.startswith("row ")]


@pytest.mark.slow
def test_recompute_of_an_untouched_run_passes(snap_run):
    _, out = snap_run
    result = run_cli("verify", out, "--recompute", "all", "--json")
    report = json.loads(result.output)
    assert report["ok"] and report["recomputed"] == {"rows": 40, "batches": 2, "device_type": "cpu"}
    sampled = json.loads(run_cli("verify", out, "--recompute", "3", "--json").output)
    assert sampled["ok"] and sampled["recomputed"]["rows"] == 3


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("attentive", marks=pytest.mark.slow),
        "cutmix",
        "mixup",
        "resizemix",
        "saliencymix",
        "fmix",
        "gridmix",
        pytest.param("cutmix_semantic", marks=pytest.mark.slow),
    ],
)
def test_recompute_passes_for_the_other_methods(method_outputs, method):
    run_cli("verify", method_outputs[method], "--recompute", "all")


@pytest.mark.slow
def test_replaced_image_with_matching_sha256_passes_verify_but_not_recompute(snap_run, tmp_path):
    _, recorded = snap_run
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    victim, other = out / "data" / "00001" / "_000000031.jpg", out / "data" / "00001" / "_000000032.jpg"
    victim.write_bytes(other.read_bytes())  # a real image, just the wrong one
    edit_manifest(out, "00001", 31, sha256=hashlib.sha256(victim.read_bytes()).hexdigest())
    run_cli("verify", out)  # the manifest and the files agree: a consistent lie
    result = run_cli("verify", out, "--recompute", "all", expect=3)
    lines = problem_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("row 31 (data/00001/_000000031.jpg): image differs from its recomputation")


@pytest.mark.slow
def test_image_replaced_behind_the_manifest_and_wrong_weights_are_named(snap_run, tmp_path):
    _, recorded = snap_run
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    edit_manifest(out, "00000", 3, weight_a=0.123, weight_b=0.877)
    run_cli("verify", out)
    result = run_cli("verify", out, "--recompute", "all", expect=3)
    [line] = problem_lines(result.output)
    assert line.startswith("row 3 (data/00000/_000000003.jpg): weight_a 0.123")
    assert "in the manifest" in line and "recomputed" in line and "weight_b 0.877" in line


@pytest.mark.slow
def test_recompute_never_trusts_out_caches(snap_run, tmp_path):
    _, recorded = snap_run
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    for path in (out / ".mixgen").iterdir():
        if path.suffix in (".u8", ".npy"):
            for offset in range(0, path.stat().st_size, 97):
                flip_byte(path, offset)
    before = {p.name: p.read_bytes() for p in sorted((out / ".mixgen").iterdir())}
    run_cli("verify", out, "--recompute", "all")
    assert {p.name: p.read_bytes() for p in sorted((out / ".mixgen").iterdir())} == before  # read-only


@pytest.mark.slow
def test_changed_or_missing_src_is_refused_in_one_line(snap_run, tmp_path):
    src, recorded = snap_run
    out = tmp_path / "out"
    shutil.copytree(recorded, out)
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    run_cli("verify", out, "--recompute", "2", "--src", moved)  # a moved SRC: --src
    shutil.copy(moved / "cat" / "cat_0.jpg", moved / "cat" / "extra.jpg")
    (moved / "rocket" / "rocket_1.jpg").unlink()
    result = run_cli("verify", out, "--recompute", "2", "--src", moved, expect=1)
    lines = [line for line in result.output.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "changed since the run (sources: 1 added, 1 removed)" in lines[0]
    gone = run_cli("verify", out, "--recompute", "2", "--src", tmp_path / "nowhere", expect=1)
    assert "of the run is gone; pass --src" in gone.output


def test_recompute_count_and_sample():
    assert parse_count("all") == 0 and parse_count("7") == 7 and parse_count(None) is None
    for bad in ("0", "-2", "some"):
        with pytest.raises(Exception, match="--recompute must be a positive number"):
            parse_count(bad)
    rows = list(range(100))
    assert sample_rows(rows, 5, 0) == sample_rows(rows, 5, 0) != sample_rows(rows, 5, 1)
    assert len(set(sample_rows(rows, 5, 0))) == 5 and sample_rows(rows, 0, 0) == rows
    assert sample_rows(rows, 500, 3) == rows
