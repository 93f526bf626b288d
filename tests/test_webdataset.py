"""``--writer webdataset`` (docs/sources-and-outputs.md, "Outputs"): one tar per shard with
``<key>.<ext>`` + ``<key>.json`` per output in index order, the Parquet manifests beside them under
the usual glob; readable by ``tarfile``, the ``webdataset`` library and
``datasets.load_dataset("webdataset")``; resume, sharding, ``verify`` and ``MixedDataset`` work on
it."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mixgen.dataset import MixedDataset
from mixgen.output.manifest import metadata_of, read_manifest
from tests.conftest import REPO, SAMPLE, run_cli, sample_run
from tests.test_resume import SNAP, mixgen_process, record, snapshot, wait_for

CUT = ["--device", "cpu", "--size", "64", "--pairs", "60", "--shard-size", "10", "--workers", "2"]
WDS = ["--writer", "webdataset"]


@pytest.fixture(scope="module")
def files_run(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "files", "cutmix", *CUT)


@pytest.fixture(scope="module")
def tar_run(tmp_path_factory) -> Path:
    return sample_run(tmp_path_factory, "wds", "cutmix", *CUT, *WDS)


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar]


def test_layout_one_tar_per_shard_in_index_order(tar_run):
    data = tar_run / "data"
    assert sorted(p.name for p in data.glob("*.tar")) == [f"{s:05d}.tar" for s in range(6)]
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == [f"{s:05d}" for s in range(6)]
    for folder in (p for p in data.iterdir() if p.is_dir()):
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.parquet"]
    members = tar_members(data / "00001.tar")
    assert [info.name for info, _ in members] == [f"{i:09d}.{ext}" for i in range(10, 20) for ext in ("jpg", "json")]
    for info, _ in members:  # fixed headers: the tar is a function of its contents
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)


def test_tarfile_reader_sees_every_output_with_its_manifest_row(tar_run, files_run):
    manifest = read_manifest(tar_run).to_pylist()
    by_index = {row["index"]: row for row in manifest}
    seen = 0
    for tar in sorted((tar_run / "data").glob("*.tar")):
        members = dict((info.name, data) for info, data in tar_members(tar))
        for name, data in members.items():
            if not name.endswith(".jpg"):
                continue
            key = name.partition(".")[0]
            row = json.loads(members[f"{key}.json"])
            assert row == by_index[int(key)]  # the JSON is the manifest row, value for value
            assert row["file_name"] == name and hashlib.sha256(data).hexdigest() == row["sha256"]
            assert Image.open(io.BytesIO(data)).size == (64, 64)
            seen += 1
    assert seen == 60
    # The same outputs as the files writer, byte for byte; only file_name differs.
    files = read_manifest(files_run).replace_schema_metadata(None).drop_columns(["file_name"])
    tars = read_manifest(tar_run).replace_schema_metadata(None).drop_columns(["file_name"])
    assert tars.equals(files)
    assert read_manifest(tar_run).column("file_name")[7].as_py() == "000000007.jpg"


def test_manifests_keep_the_glob(tar_run):
    import duckdb

    glob = str(tar_run / "data" / "*" / "metadata.parquet")
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == 60
    meta = json.loads(pq.read_schema(tar_run / "data" / "00000" / "metadata.parquet").metadata[b"mixgen"])
    assert meta["config"]["writer"] == "webdataset"


def test_datasets_load_dataset_webdataset_sees_every_output(tar_run, tmp_path):
    from datasets import load_dataset

    tars = sorted(str(p) for p in (tar_run / "data").glob("*.tar"))
    dataset = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path))
    assert dataset.num_rows == 60
    manifest = {row["index"]: row for row in read_manifest(tar_run).to_pylist()}
    for item in dataset:
        row = manifest[int(item["__key__"])]
        assert item["json"]["index"] == row["index"] and item["json"]["sha256"] == row["sha256"]
        assert item["json"]["label_a"] == row["label_a"] and item["jpg"].size == (64, 64)


def test_webdataset_library_reads_the_shards(tar_run):
    import webdataset as wds

    tars = sorted(str(p) for p in (tar_run / "data").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "json"))
    assert [int(key) for key, _, _ in samples] == list(range(60))
    assert all(row["index"] == int(key) and image.size == (64, 64) for key, image, row in samples)


def test_mixed_dataset_reads_tar_shards(tar_run, files_run):
    tars, files = MixedDataset(tar_run, return_meta=True), MixedDataset(files_run, return_meta=True)
    assert len(tars) == len(files) == 60
    for i in (0, 13, 59):
        (image_t, target_t, meta_t), (image_f, target_f, meta_f) = tars[i], files[i]
        assert torch.equal(image_t, image_f) and torch.equal(target_t, target_f)
        assert meta_t["index"] == meta_f["index"] == i
    assert tars.table.column("image_path")[0].as_py().endswith("00000.tar#000000000.jpg")


def test_verify_passes_and_catches_a_truncated_or_altered_tar(tar_run, tmp_path):
    run_cli("verify", tar_run)
    out = tmp_path / "out"
    import shutil

    shutil.copytree(tar_run, out)
    tar = out / "data" / "00002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    result = run_cli("verify", out, expect=3)
    assert f"{tar}: truncated at member" in result.output
    assert not _mixed_dataset_opens(out)

    shutil.copytree(tar_run, tmp_path / "altered")
    tar = tmp_path / "altered" / "data" / "00004.tar"
    with tarfile.open(tar) as t:
        info = t.getmember("000000041.jpg")
    data = bytearray(tar.read_bytes())
    data[info.offset_data + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    altered = run_cli("verify", tmp_path / "altered", expect=3)
    assert "member 000000041.jpg: sha256 differs from the manifest" in altered.output

    shutil.copytree(tar_run, tmp_path / "lost")
    (tmp_path / "lost" / "data" / "00003.tar").unlink()
    lost = run_cli("verify", tmp_path / "lost", expect=3)
    assert "00003.tar: missing" in lost.output


def test_recompute_passes_on_an_untouched_tar_run_and_names_an_altered_member(tar_run, tmp_path):
    """The writer owns file names and stored bytes: recompute reads each output from its tar."""
    report = json.loads(run_cli("verify", tar_run, "--recompute", "all", "--json").output)
    assert report["ok"], report["problems"]
    assert report["recomputed"] == {"rows": 60, "batches": 6, "device_type": "cpu"}

    import shutil

    out = tmp_path / "altered"
    shutil.copytree(tar_run, out)
    tar = out / "data" / "00004.tar"
    with tarfile.open(tar) as t:
        info = t.getmember("000000041.jpg")
    data = bytearray(tar.read_bytes())
    data[info.offset_data + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = run_cli("verify", out, "--recompute", "all", expect=3)
    rows = [line for line in result.output.splitlines() if line.startswith("row ")]
    assert rows == ["row 41 (data/00004.tar:000000041.jpg): image file differs from its recomputation"], result.output


def test_recompute_of_k_sampled_rows_passes_on_an_untouched_tar_run(tar_run):
    """``--recompute K`` (a number, not only ``all``) reads the sampled outputs from the tars too."""
    report = json.loads(run_cli("verify", tar_run, "--recompute", "7", "--json").output)
    assert report["ok"], report["problems"]
    assert report["recomputed"]["rows"] == 7 and report["recomputed"]["device_type"] == "cpu"


def test_verify_compares_every_field_of_a_members_json_row_with_the_manifest(tar_run, tmp_path):
    """The JSON rows are what webdataset trainers read: any field edited in a tar is caught."""
    import shutil

    from mixgen.output.tarfiles import tar_header

    out = tmp_path / "out"
    shutil.copytree(tar_run, out)
    tar = out / "data" / "00001.tar"
    edits = {
        "000000012.json": {"weight_a": 0.125},
        "000000013.json": {"targets": [{"class_id": 0, "weight": 1.0}]},
        "000000014.json": {"label_a": -1, "class_a": "other"},
    }
    members = []
    for info, data in tar_members(tar):
        if info.name in edits:
            data = json.dumps({**json.loads(data), **edits[info.name]}).encode()
        members.append((info.name, data))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            t.addfile(tar_header(name, len(data)), io.BytesIO(data))
    result = run_cli("verify", out, expect=3)
    assert "member 000000012.json disagrees with its manifest row (weight_a)" in result.output
    assert "member 000000013.json disagrees with its manifest row (targets)" in result.output
    assert "member 000000014.json disagrees with its manifest row (label_a, class_a)" in result.output
    assert "000000015.json" not in result.output


def _mixed_dataset_opens(out: Path) -> bool:
    from mixgen.errors import MixgenError

    try:
        MixedDataset(out)
    except MixgenError as exc:
        assert "truncated" in str(exc)
        return False
    return True


def test_sharded_workers_write_the_same_tars(tar_run, tmp_path):
    out = tmp_path / "out"
    for worker in (1, 0):
        run_cli("cutmix", SAMPLE, out, *CUT, *WDS, "--num-shards", "2", "--shard-index", str(worker))
    assert record(out)["status"] == "complete"
    run_cli("verify", out)
    assert snapshot(out) == snapshot(tar_run)


def test_resume_redoes_a_shard_whose_tar_has_no_manifest(tar_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tar_run, out)
    (out / "data" / "00003" / "metadata.parquet").unlink()  # killed between tar rename and manifest
    (out / "data" / "00005.tar").write_bytes(b"half")  # and a damaged one
    run_cli("cutmix", SAMPLE, out, *CUT, *WDS)
    assert record(out)["counts"]["kept_from_previous_run"] == 40
    assert snapshot(out) == snapshot(tar_run)


@pytest.mark.slow
def test_kill_9_after_the_first_tar_then_resume_is_byte_identical(tmp_path):
    reference = tmp_path / "reference"
    run_cli("snapmix", SAMPLE, reference, *SNAP, *WDS)
    out = tmp_path / "out"
    proc = mixgen_process("snapmix", SAMPLE, out, *SNAP, *WDS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "data" / "00000" / "metadata.parquet", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list((out / "data").glob("*/metadata.parquet")))
    assert 1 <= done < 24, f"the kill must land mid-run ({done} of 24 shards were complete)"
    assert run_cli("verify", out, expect=3)
    run_cli("snapmix", SAMPLE, out, *SNAP, *WDS)
    rec = record(out)
    assert rec["status"] == "complete" and rec["counts"]["kept_from_previous_run"] >= 10 * done
    run_cli("verify", out)
    assert snapshot(out) == snapshot(reference)  # every tar and manifest, byte for byte
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


def test_tar_members_follow_index_order_whatever_order_the_threads_add_them(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mixgen.output.writers import WebDatasetWriter

    reference = _mixup_run(tmp_path)
    table_schema = pq.read_schema(reference / "data" / "00000" / "metadata.parquet")
    out = tmp_path / "wds"
    writer = WebDatasetWriter(out, "jpg")
    # The writer names its outputs (the run asks it when it builds each row).
    rows = [{**row, "file_name": writer.file_name(row["index"])} for row in read_manifest(reference).to_pylist()]
    assert rows[3]["file_name"] == "000000003.jpg"
    shard = writer.open(0, range(12), table_schema)
    images = {row["index"]: f"image {row['index']}".encode() for row in rows}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda row: shard.add(dict(row), images[row["index"]]), reversed(rows)))
    shard.commit(rows)
    assert writer.is_complete(0, range(12), metadata_of(table_schema)["fingerprint"])
    names = [info.name for info, _ in tar_members(out / "data" / "00000.tar")]
    assert names == [f"{i:09d}.{ext}" for i in range(12) for ext in ("jpg", "json")]
    assert all(
        data == images[int(info.name[:9])]
        for info, data in tar_members(out / "data" / "00000.tar")
        if info.name.endswith(".jpg")
    )


def _mixup_run(tmp_path: Path) -> Path:
    out = tmp_path / "ref"
    run_cli("mixup", SAMPLE, out, "--device", "cpu", "--size", "64", "--pairs", "12")
    return out


def test_many_batches_per_tar_on_pool_and_main_thread_mixing(tmp_path, monkeypatch):
    """Shards of several mixing batches, encoded by several threads (and mixed on the main thread
    as on a GPU): the tar is the same, and its images are those of the files writer."""
    import mixgen.pipeline.run

    common = ["--device", "cpu", "--size", "64", "--pairs", "300", "--shard-size", "300", "--workers", "3"]
    run_cli("cutmix", SAMPLE, tmp_path / "files", *common)
    run_cli("cutmix", SAMPLE, tmp_path / "pool", *common, *WDS)
    monkeypatch.setattr(mixgen.pipeline.run, "mixes_on_pool", lambda device: False)
    run_cli("cutmix", SAMPLE, tmp_path / "main", *common, *WDS)
    assert snapshot(tmp_path / "pool") == snapshot(tmp_path / "main")
    files = read_manifest(tmp_path / "files").replace_schema_metadata(None).drop_columns(["file_name"])
    tars = read_manifest(tmp_path / "pool").replace_schema_metadata(None).drop_columns(["file_name"])
    assert tars.equals(files) and tars.num_rows == 300
    run_cli("verify", tmp_path / "main")


def test_writer_option_is_validated(tmp_path):
    result = run_cli("cutmix", SAMPLE, tmp_path / "out", *CUT, "--writer", "tar", expect=2)
    assert "--writer must be files or webdataset, got 'tar'" in result.output
    assert not (tmp_path / "out").exists()


def test_a_files_run_and_a_webdataset_run_never_share_an_out(tar_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tar_run, out)
    result = run_cli("cutmix", SAMPLE, out, *CUT, expect=1)
    assert "holds a different mixgen run" in result.output


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs setrlimit(RLIMIT_FSIZE)")
def test_a_tar_past_the_file_size_limit_is_named_in_the_error(tmp_path):
    """Under ``ulimit -f`` the shard's tar grows past the limit: the one-line error names the tar
    (not OUT) and says what to do."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "out"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    argv = [sys.executable, "-m", "mixgen", "cutmix", str(SAMPLE), str(out), *WDS]
    argv += ["--device", "cpu", "--size", "32", "--pairs", "200", "--shard-size", "200"]
    done = subprocess.run(argv, cwd=REPO, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mixgen: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"mixgen: error: file too large writing {out / 'data' / '00000.tar'}: ")
    assert "ulimit -f" in errors[0] and "re-run the same command" in errors[0]
    assert json.loads((out / "mixgen.json").read_text())["status"] == "failed"
