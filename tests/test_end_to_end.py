"""End-to-end CLI runs on sample_data (CPU) and the readers of docs/sources-and-outputs.md, "Load it"."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mixgen.output.manifest import COLUMNS, FIELDS
from tests.conftest import SAMPLE, run_cli

METHODS = ["snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix", "cutmix_semantic"]


@pytest.mark.parametrize("method", METHODS)
def test_manifest_schema_files_and_digests(method_outputs, method):
    out = method_outputs[method]
    record = json.loads((out / "mixgen.json").read_text())
    assert record["status"] == "complete"
    table = ds.dataset(str(out / "data"), format="parquet").to_table()
    assert table.column_names == COLUMNS
    for name, arrow_type, _ in FIELDS:
        assert table.schema.field(name).type == arrow_type, name
    assert table.num_rows == record["config"]["pairs"]
    assert sorted(table.column("index").to_pylist()) == list(range(table.num_rows))
    for manifest in (out / "data").glob("*/metadata.parquet"):
        shard = pq.read_table(manifest)
        for name, digest in zip(shard.column("file_name").to_pylist(), shard.column("sha256").to_pylist(), strict=True):
            path = manifest.parent / name
            assert path.is_file()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    rows = table.to_pylist()
    for row in rows:
        assert row["method"] == method.partition("_")[0]
        assert row["label_weights"] == ("semantic" if method in ("snapmix", "cutmix_semantic") else "area")
        assert row["source_a"] != row["source_b"]
        assert abs(sum(t["weight"] for t in row["targets"]) - 1) < 1e-5
        assert 0 <= row["area_ratio"] <= 1
        assert (row["width"], row["height"]) == (int(record["config"]["size"]),) * 2
    if method == "attentive":
        assert all(len(r["cells"]) == 5 and r["box_a"] is None for r in rows)
        assert all(r["weight_b"] == pytest.approx(5 / 16) for r in rows)
    if method in ("snapmix", "cutmix", "resizemix", "saliencymix"):
        assert any(r["box_a"] is not None for r in rows)
    if method == "fmix":
        assert all(r["mask"] is not None and sum(r["mask"]) == 64 * 64 for r in rows)
    if method == "gridmix":
        assert all(r["weight_b"] == pytest.approx(len(r["cells"]) / 16) for r in rows)
    if method == "snapmix":
        assert record["probe"]["train_accuracy"] >= 0.9
        assert len(list((out / "data").glob("*/metadata.parquet"))) == 2


def test_schema_metadata(method_outputs):
    schema = pq.read_schema(next((method_outputs["snapmix"] / "data").glob("*/metadata.parquet")))
    meta = json.loads(schema.metadata[b"mixgen"])
    assert meta["classes"] == ["astronaut", "cat", "coffee", "flower", "rocket"]
    assert meta["cam"] == "probe" and meta["seed"] == 0 and meta["backbone"]["weights"]
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["label_a"] == {"names": meta["classes"], "_type": "ClassLabel"}
    assert set(hf) == set(COLUMNS)
    for field in schema:
        assert not pa.types.is_dictionary(field.type) and not pa.types.is_fixed_size_list(field.type)
        assert not pa.types.is_unsigned_integer(field.type)


def test_manifest_loads_in_pandas_polars_duckdb(method_outputs):
    import duckdb
    import pandas as pd
    import polars as pl

    out = method_outputs["snapmix"]
    frame = pd.read_parquet(out / "data")
    assert len(frame) == 40 and str(frame["label_a"].dtype) == "int64" and str(frame["weight_a"].dtype) == "float32"
    lazy = pl.scan_parquet(str(out / "data" / "*" / "metadata.parquet")).collect()
    assert lazy.height == 40 and lazy.schema["label_b"] == pl.Int64 and lazy.schema["weight_b"] == pl.Float32
    glob = str(out / "data" / "*" / "metadata.parquet")
    count, kinds = duckdb.sql(f"select count(*), any_value(typeof(targets)) from read_parquet('{glob}')").fetchall()[0]
    assert count == 40 and "STRUCT(class_id BIGINT, weight FLOAT)[]" in kinds


def test_labels_are_classlabels_in_hf_datasets(method_outputs, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (method_outputs["cutmix"] / "data").glob("*/metadata.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert isinstance(loaded.features["label_a"], datasets.ClassLabel)
    assert loaded.features["label_b"].names == ["astronaut", "cat", "coffee", "flower", "rocket"]
    assert loaded.num_rows == 30


@pytest.mark.slow
def test_same_command_twice_is_byte_identical(tmp_path):
    def run(out: Path) -> dict[str, bytes]:
        run_cli("snapmix", SAMPLE, out, "--device", "cpu", "--size", "64", "--pairs", "12", "--workers", "2")
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "data").rglob("*")) if p.is_file()}

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) == 13
    assert first == second


@pytest.mark.slow
@pytest.mark.parametrize("method", ["attentive", "snapmix"])
def test_batch_and_worker_counts_do_not_change_outputs(tmp_path, method):
    """Several mix batches per shard and two shards, so the pool's batches finish out of order."""
    common = ["--device", "cpu", "--size", "64", "--pairs", "150", "--shard-size", "100"]
    run_cli(method, SAMPLE, tmp_path / "a", *common, "--batch-size", "3", "--workers", "1")
    run_cli(method, SAMPLE, tmp_path / "b", *common, "--batch-size", "16", "--workers", "3")
    for shard in ("00000", "00001"):
        a = pq.read_table(tmp_path / "a" / "data" / shard / "metadata.parquet")
        b = pq.read_table(tmp_path / "b" / "data" / shard / "metadata.parquet")
        assert a.equals(b)  # sha256 column included: the images are byte-identical too
    assert a.column("index").to_pylist() == list(range(100, 150))


@pytest.mark.slow
def test_mixing_on_the_main_thread_as_on_a_gpu_gives_the_same_outputs(tmp_path, monkeypatch):
    """The GPU's scheduling (mix on the main thread, the pool only encodes and writes), run on the
    CPU so that CI exercises it."""
    import mixgen.pipeline.run

    common = ["--device", "cpu", "--size", "64", "--pairs", "150", "--workers", "2"]
    run_cli("snapmix", SAMPLE, tmp_path / "pool", *common)
    monkeypatch.setattr(mixgen.pipeline.run, "mixes_on_pool", lambda device: False)
    run_cli("snapmix", SAMPLE, tmp_path / "main", *common)
    pool = pq.read_table(tmp_path / "pool" / "data" / "00000" / "metadata.parquet")
    main = pq.read_table(tmp_path / "main" / "data" / "00000" / "metadata.parquet")
    assert pool.equals(main) and pool.num_rows == 150


def test_help_does_not_import_torch():
    code = "import sys; from mixgen.cli import app; assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run([sys.executable, "-m", "mixgen", "--help"], capture_output=True, text=True, check=True)
    assert "snapmix" in result.stdout and "attentive" in result.stdout


def test_dry_run_writes_nothing(tmp_path):
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", "--pairs", "5", "--dry-run", "--json")
    assert json.loads(result.stdout)["sources"] == 20
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_backbone_batch_size_does_not_change_snapmix_weights(tmp_path):
    common = ["--device", "cpu", "--size", "64", "--pairs", "12"]
    run_cli("snapmix", SAMPLE, tmp_path / "a", *common, "--batch-size", "3")
    run_cli("snapmix", SAMPLE, tmp_path / "b", *common, "--batch-size", "32")
    a = pq.read_table(tmp_path / "a" / "data" / "00000" / "metadata.parquet")
    b = pq.read_table(tmp_path / "b" / "data" / "00000" / "metadata.parquet")
    assert a.equals(b)


@pytest.mark.parametrize("method", ["resizemix", "saliencymix", "fmix", "gridmix", "cutmix_semantic"])
def test_new_methods_load_in_every_reader_and_verify(method_outputs, method, tmp_path):
    """pyarrow, pandas, polars, DuckDB and HF imagefolder read the new columns (mask, label_weights)
    as they are, and ``mixgen verify`` passes."""
    import duckdb
    import pandas as pd
    import polars as pl

    datasets = pytest.importorskip("datasets")
    out = method_outputs[method]
    glob = str(out / "data" / "*" / "metadata.parquet")
    table = ds.dataset(str(out / "data"), format="parquet").to_table()
    assert table.num_rows == 30
    assert len(pd.read_parquet(out / "data")) == 30
    frame = pl.read_parquet(glob)
    assert frame.schema["mask"] == pl.List(pl.Int32) and frame.schema["label_weights"] == pl.String
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == 30
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 30 and isinstance(loaded.features["label_b"], datasets.ClassLabel)
    first = loaded.sort("index")[0]
    assert first["image"].size == (64, 64) and first["label_weights"] in ("area", "semantic")
    if method == "fmix":
        assert sum(first["mask"]) == 64 * 64
    run_cli("verify", out)


def test_fmix_mask_column_is_exactly_the_donor_pixels(tmp_path):
    """Lossless output: every pixel inside the decoded ``mask`` is the donor view's, every other the
    canvas view's, and the weights are the pixel shares."""
    import numpy as np
    from PIL import Image

    from mixgen.methods import mask_from_runs
    from mixgen.sources.views import load_view

    out = tmp_path / "out"
    run_cli("fmix", SAMPLE, out, "--size", "48", "--pairs", "8", "--format", "png", "--device", "cpu")
    for row in ds.dataset(str(out / "data"), format="parquet").to_table().to_pylist():
        mask = mask_from_runs(row["mask"], 48)
        canvas, donor = (load_view(SAMPLE / row[key], 48, "crop") for key in ("source_a", "source_b"))
        image = np.asarray(Image.open(out / "data" / "00000" / row["file_name"]).convert("RGB"))
        assert np.array_equal(image, np.where(mask[..., None], donor, canvas))
        assert row["weight_b"] == pytest.approx(mask.mean()) and row["area_ratio"] == pytest.approx(mask.mean())
        assert (~mask).sum() == int(np.floor(row["lam"] * 48 * 48))
