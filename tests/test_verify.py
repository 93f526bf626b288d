"""``mixgen verify OUT``: exit 0 on a sound run; exit 3 with one line per problem for every kind of
damage a killed run, a full disk or a stray hand could leave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mixgen.commands.verify import verify
from mixgen.errors import MixgenError
from mixgen.layout import WORKER_PREFIX
from mixgen.output.lock import Door, claim
from tests.conftest import REPO, run_cli, sample_run

CUT = ["--device", "cpu", "--size", "64", "--pairs", "30", "--shard-size", "10", "--workers", "2"]


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "verify", "cutmix", *CUT)


@pytest.fixture
def out(sound, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(sound, copy)
    return copy


def names(out: Path, shard: str = "00001") -> list[str]:
    return pq.read_table(out / "data" / shard / "metadata.parquet").column("file_name").to_pylist()


def problems(out: Path) -> list[str]:
    result = run_cli("verify", out, expect=3)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == verify(out).problems  # one line each, on stdout
    return lines


def test_sound_run_passes(sound):
    result = run_cli("verify", sound)
    assert result.stdout == "" and "ok: 30 outputs in 3 shard(s)" in result.output
    report = json.loads(run_cli("verify", sound, "--json").stdout)
    assert report["ok"] is True and report["rows"] == 30 and report["files_hashed"] == 30
    assert report["expected_outputs"] == 30 and report["status"] == "complete"


def test_corrupt_image(out):
    path = out / "data" / "00001" / names(out)[3]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert problems(out) == [f"{path}: sha256 differs from the manifest (corrupt or replaced)"]


def test_missing_image_and_orphan(out):
    gone = out / "data" / "00001" / names(out)[0]
    gone.unlink()
    (out / "data" / "00002" / "000000099.jpg").write_bytes(b"stray")
    found = problems(out)
    assert f"{gone}: listed in the manifest but missing" in found
    assert f"{out / 'data' / '00002' / '000000099.jpg'}: orphan file (not in the manifest)" in found
    assert len(found) == 2


def test_stray_temp_files(out):
    (out / "data" / "00000" / ".metadata.parquet.tmp").write_bytes(b"PAR1")
    (out / ".mixgen.json.123@host.tmp").write_text("{")
    found = problems(out)
    assert len(found) == 2 and all("stray temp file" in line for line in found)


def test_missing_manifest_is_an_unfinished_shard_and_missing_indices(out):
    (out / "data" / "00001" / "metadata.parquet").unlink()
    found = problems(out)
    assert found[0] == (
        f"{out / 'data' / '00001'}: no metadata.parquet (10 image(s) without a manifest: an unfinished shard; "
        "re-run the same command to redo it)"
    )
    assert found[1].startswith("10 of 30 outputs missing: indices 10..19")


def test_unreadable_manifest(out):
    path = out / "data" / "00002" / "metadata.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    found = problems(out)
    assert found[0].startswith(f"{path}: cannot be read")
    assert "outputs missing: indices 20..29" in found[-1]


def test_duplicate_and_misplaced_rows(out):
    shutil.copy(out / "data" / "00000" / "metadata.parquet", out / "data" / "00001" / "metadata.parquet")
    found = problems(out)
    assert any("indices outside the shard's range 10..19: 0..9" in line for line in found)
    assert any(line.startswith("indices listed in more than one row: 0..9") for line in found)
    assert any("outputs missing: indices 10..19" in line for line in found)


def test_unfinished_record_and_extra_shard(out):
    rec = json.loads((out / "mixgen.json").read_text())
    (out / "mixgen.json").write_text(json.dumps({**rec, "status": "running"}))
    (out / "data" / "00007").mkdir()
    found = problems(out)
    assert found[0].startswith(f"{out / 'mixgen.json'}: status is 'running', not 'complete'")
    assert f"{out / 'data' / '00007'}: shard folder beyond the run's 3 shards" in found


def test_missing_record_falls_back_to_manifest_metadata(out):
    (out / "mixgen.json").unlink()
    assert problems(out) == [f"{out / 'mixgen.json'}: missing or unreadable run record"]


def refusal(out: Path) -> str:
    """The one line ``mixgen verify OUT`` refuses with, exit 1 (as the run command's refusals)."""
    result = run_cli("verify", out, expect=1)
    assert result.stdout == "" and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.strip()]
    return line


def test_not_a_run_folder(tmp_path):
    assert "is not a folder holding a mixgen run (no such folder); check the path" in refusal(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    assert "(it is a file)" in refusal(tmp_path / "file.txt")


def test_a_folder_without_a_run_is_refused_like_a_missing_one(tmp_path):
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    for folder in (empty, foreign):
        line = refusal(folder)
        assert f"OUT {folder} is not a folder holding a mixgen run (no mixgen.json and no data/ in it)" in line
        assert f"make a run there first (e.g. `mixgen cutmix SRC {folder}`)" in line
        with pytest.raises(MixgenError, match="holding a mixgen run"):
            verify(folder)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # verify writes nothing


HOLD = (
    "import sys, time\n"
    "from mixgen.output.lock import Door, claim\n"
    "with Door(sys.argv[1]):\n"
    "    lock = claim(sys.argv[1], sys.argv[2], 0, 1)\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_refuses_while_a_live_process_writes_out_and_advises_a_rerun_once_it_died(out):
    rec = json.loads((out / "mixgen.json").read_text())
    (out / "mixgen.json").write_text(json.dumps({**rec, "status": "running"}))
    command = [sys.executable, "-c", HOLD, str(out), rec["fingerprint"]]
    writer = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        line = refusal(out)
        assert f"OUT {out} is being written by a mixgen run (pid {writer.pid}, running since " in line
        assert f"wait for it to finish, then run `mixgen verify {out}` again" in line
        assert "re-run the same command" not in line
    finally:
        writer.kill()
        writer.wait()
    # The writer died (a crashed run): its lock file is only a name; the record's status is reported.
    assert (out / f"{WORKER_PREFIX}0").exists()
    advice = "status is 'running', not 'complete'; re-run the same command to finish the run"
    assert problems(out) == [f"{out / 'mixgen.json'}: {advice}"]


def test_refusal_names_every_worker_of_a_sharded_job_writing_out(out):
    with Door(out):
        locks = [claim(out, "f" * 16, index, 2) for index in (0, 1)]
    try:
        pid = os.getpid()
        with pytest.raises(MixgenError, match=rf"by 2 workers of a sharded job \(pid {pid}, .*; also pid {pid}\)"):
            verify(out)
    finally:
        for lock in locks:
            lock.release()


def test_missing_outputs_of_a_huge_run_are_found_from_the_indices_seen():
    """An interrupted run of 10^15 outputs with a few written: the gaps come from what is on disk,
    never from a set of every expected index."""
    from mixgen.commands.verify import _check_indices

    problems: list[str] = []
    _check_indices(problems, {0, 1, 2, 5, 10**15 - 1}, set(), 10**15)
    n = 10**15
    expected = f"{n - 5} of {n} outputs missing: indices 3..4, 6..{n - 2}; re-run the same command to write them"
    assert problems == [expected]


# ---------------------------------------------------------------------------------------------
# 31.8: a manifest that contradicts itself, or lost its run metadata, fails plain verify


def _rewrite(out: Path, edit, shard: str = "00001", keep_metadata: bool = True) -> Path:
    """Rewrite a shard's manifest with ``edit`` applied to its rows (a list of dicts)."""
    import pyarrow as pa

    path = out / "data" / shard / "metadata.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    schema = table.schema if keep_metadata else table.schema.remove_metadata()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _swap_files(rows: list[dict]) -> None:
    """Row 3's image (file_name and sha256 together) becomes row 4's and back: every hash matches."""
    for key in ("file_name", "sha256"):
        rows[3][key], rows[4][key] = rows[4][key], rows[3][key]


def _other_class(rows: list[dict]) -> None:
    rows[2]["class_a"] = next(r["class_b"] for r in rows if r["class_b"] != rows[2]["class_a"])


def _unknown_class(rows: list[dict]) -> None:
    rows[5]["class_b"] = "no such bird"


def _nan_weight(rows: list[dict]) -> None:
    rows[1]["weight_b"] = float("nan")


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (_swap_files, "output 13's row names '_000000014.jpg', not its own file (_000000013.*)"),
        (_other_class, "output 12: label_a"),
        (_unknown_class, "output 15: class_b 'no such bird' is no class of the run"),
        (_nan_weight, "output 11: weight_b is nan (not a number >= 0)"),
    ],
    ids=["swapped rows", "label vs class", "unknown class", "NaN weight"],
)
def test_a_manifest_that_contradicts_itself(out, edit, said):
    path = _rewrite(out, edit)
    found = problems(out)
    assert any(line.startswith(f"{path}: {said}") and "remove" in line for line in found), found


def test_a_manifest_stripped_of_its_run_metadata(out):
    path = _rewrite(out, lambda rows: None, keep_metadata=False)
    found = problems(out)
    assert len(found) == 1 and found[0].startswith(f"{path}: carries no mixgen metadata (no run fingerprint")
