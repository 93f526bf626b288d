"""The consumers' side of an OUT folder: MixedDataset, snapmix_loss and Hugging Face imagefolder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mixgen import MixedDataset, snapmix_loss
from mixgen.errors import MixgenError
from mixgen.output.manifest import COLUMNS, manifest_paths, read_manifest, read_run_metadata

METHODS = ["snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix", "cutmix_semantic"]


def dense(entries: list[dict], classes: int) -> np.ndarray:
    out = np.zeros(classes, dtype=np.float32)
    for entry in entries:
        out[entry["class_id"]] += entry["weight"]
    return out


@pytest.mark.parametrize("method", METHODS)
def test_normalised_targets_sum_to_one_and_match_manifest(method_outputs, method):
    out = method_outputs[method]
    dataset = MixedDataset(out)
    rows = read_manifest(out).to_pylist()
    size = rows[0]["width"]
    assert dataset.classes == read_run_metadata(out)["classes"]
    assert len(dataset) == len(rows)
    for i, row in enumerate(rows):
        image, target = dataset[i]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert target.shape == (len(dataset.classes),)
        assert float(target.sum()) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(target.numpy(), dense(row["targets"], len(dataset.classes)), atol=1e-6)


@pytest.mark.parametrize("method", ["snapmix", "attentive"])
def test_unnormalised_targets_equal_manifest_weights(method_outputs, method):
    out = method_outputs[method]
    dataset = MixedDataset(out, normalize=False)
    rows = read_manifest(out).to_pylist()
    same_label = 0
    for i, row in enumerate(rows):
        expected = np.zeros(len(dataset.classes), dtype=np.float32)
        expected[row["label_a"]] += row["weight_a"]
        expected[row["label_b"]] += row["weight_b"]
        target = dataset.target(i).numpy()
        np.testing.assert_allclose(target, expected, atol=1e-6)
        if row["label_a"] != row["label_b"]:
            assert target[row["label_a"]] == pytest.approx(row["weight_a"])
            assert target[row["label_b"]] == pytest.approx(row["weight_b"])
        else:
            same_label += 1
        assert target.sum() == pytest.approx(row["weight_a"] + row["weight_b"], abs=1e-5)
    if method == "snapmix":
        # SnapMix weights are not normalised: some rows must differ from 1 (the point of the method).
        sums = np.array([r["weight_a"] + r["weight_b"] for r in rows])
        assert np.abs(sums - 1).max() > 0.05


def test_dataloader_with_two_workers(method_outputs):
    out = method_outputs["snapmix"]
    dataset = MixedDataset(out, return_meta=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    seen = []
    for images, targets, meta in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 96, 96)
        assert targets.shape == (images.shape[0], len(dataset.classes))
        assert meta["label_a"].dtype == torch.int64 and meta["weight_a"].dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(images.shape[0]), atol=1e-5, rtol=0)
        seen.extend(meta["index"].tolist())
    assert seen == list(range(len(dataset)))
    assert len(manifest_paths(out)) == 2  # the loader read both shards


def test_snapmix_loss_is_the_paper_loss(method_outputs):
    out = method_outputs["snapmix"]
    dataset = MixedDataset(out, normalize=False, return_meta=True)
    images, targets, meta = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    logits = torch.randn(len(dataset), len(dataset.classes), generator=torch.Generator().manual_seed(0))
    log_p = logits.log_softmax(dim=1)
    rows = read_manifest(out).to_pylist()
    by_hand = torch.tensor(
        [-(r["weight_a"] * log_p[i, r["label_a"]] + r["weight_b"] * log_p[i, r["label_b"]]) for i, r in enumerate(rows)]
    )
    per_sample = snapmix_loss(logits, meta, reduction="none")
    torch.testing.assert_close(per_sample, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(snapmix_loss(logits, meta), by_hand.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(snapmix_loss(logits, (images, targets, meta)), by_hand.mean(), atol=1e-5, rtol=1e-5)
    # The unnormalised dense target gives the same loss as a plain soft-target cross-entropy.
    torch.testing.assert_close(-(targets * log_p).sum(dim=1), by_hand, atol=1e-5, rtol=1e-5)
    # ...while the normalised one is what F.cross_entropy with probabilities expects.
    normalised = torch.stack([MixedDataset(out).target(i) for i in range(len(dataset))])
    assert torch.isfinite(F.cross_entropy(logits, normalised))
    with pytest.raises(KeyError, match="return_meta"):
        snapmix_loss(logits, {"label_a": meta["label_a"]})


def test_transform_and_errors(method_outputs, tmp_path):
    dataset = MixedDataset(method_outputs["mixup"], transform=lambda x: x[:, :16, :8])
    assert dataset[0][0].shape == (3, 16, 8)
    assert dataset[-1][1].shape == (len(dataset.classes),)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert {"index", "weight_a", "image_path"} <= set(dataset.table.column_names)
    with pytest.raises(MixgenError, match="no manifest"):
        MixedDataset(tmp_path)


def test_import_mixgen_and_stats_stay_torch_free():
    code = (
        "import sys, mixgen, mixgen.commands.stats, mixgen.output.reader, mixgen.cli, mixgen.layout; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_imagefolder_two_shards(method_outputs, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = method_outputs["snapmix"]
    assert len(manifest_paths(out)) == 2
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    manifest = read_manifest(out)
    classes = read_run_metadata(out)["classes"]
    assert loaded.num_rows == manifest.num_rows
    # Every manifest column except file_name (which becomes the decoded `image`) is there.
    assert set(loaded.column_names) == (set(COLUMNS) - {"file_name"}) | {"image"}
    for column in ("label_a", "label_b"):
        feature = loaded.features[column]
        assert isinstance(feature, datasets.ClassLabel), feature
        assert feature.names == classes
    order = np.argsort(loaded["index"])
    expected = manifest.to_pylist()
    for position, row in zip(order[:5], expected[:5], strict=True):
        item = loaded[int(position)]
        assert item["index"] == row["index"]
        assert item["image"].size == (row["width"], row["height"])
        assert item["source_a"] == row["source_a"]
        assert [t["class_id"] for t in item["targets"]] == [t["class_id"] for t in row["targets"]]
        assert [t["weight"] for t in item["targets"]] == pytest.approx([t["weight"] for t in row["targets"]])
        assert item["weight_a"] == pytest.approx(row["weight_a"])
        assert loaded.features["label_a"].int2str(item["label_a"]) == row["class_a"]
    # Both shards' rows are present, with their schema-level Hugging Face metadata.
    assert sorted(loaded["index"]) == list(range(manifest.num_rows))
    assert b"huggingface" in pq.read_schema(manifest_paths(out)[1]).metadata
