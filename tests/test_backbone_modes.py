"""The CAM modes and non-default backbones, end to end on sample_data (CPU, tiny sizes)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from mixgen.cam.backbones import load_backbone
from mixgen.errors import MixgenError, UsageError
from tests.conftest import SAMPLE, run_cli

TINY = ["--device", "cpu", "--size", "64", "--pairs", "6"]


def record(out):
    return json.loads((out / "mixgen.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("cam", ["imagenet", "mean"])
def test_class_agnostic_cam_modes(tmp_path, cam):
    run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--cam", cam)
    rec = record(tmp_path / "out")
    assert rec["config"]["cam"] == cam and rec["status"] == "complete"
    table = pq.read_table(tmp_path / "out" / "data" / "00000" / "metadata.parquet")
    assert table.num_rows == 6


@pytest.mark.slow
def test_checkpoint_head_is_used_for_cams(tmp_path):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    path = tmp_path / "finetuned.pt"
    torch.save(model.state_dict(), path)
    run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--checkpoint", path)
    rec = record(tmp_path / "out")
    assert rec["config"]["cam"] == "checkpoint"
    assert rec["backbone"]["weights"] and rec["probe"] is None


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["timm:resnet18", "resnet18"])
def test_named_backbone_with_offline_weights(tmp_path, backbone):
    if backbone.startswith("timm:"):
        import timm

        state = timm.create_model("resnet18").state_dict()
    else:
        import torchvision

        state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    run_cli(
        "attentive",
        SAMPLE,
        tmp_path / "out",
        *TINY,
        "--grid",
        "2",
        "--top-k",
        "1",
        "--backbone",
        backbone,
        "--weights",
        path,
    )
    rec = record(tmp_path / "out")
    expected = backbone if backbone.startswith("timm:") else f"torchvision:{backbone}"
    assert rec["backbone"]["name"] == expected


def test_cam_checkpoint_without_file_is_a_usage_error(tmp_path):
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", *TINY, "--cam", "checkpoint", expect=2)
    assert "--checkpoint" in result.output


def test_an_unknown_backbone_name_says_so_and_how_to_find_valid_names():
    """A name no library has is a usage error about the name, not advice to go offline."""
    with pytest.raises(UsageError) as raised:
        load_backbone("nosuchnet")
    message = str(raised.value)
    assert message.startswith("--backbone nosuchnet: no torchvision or timm model has that name")
    assert "timm.list_models()" in message and "--weights" not in message and "offline" not in message
    with pytest.raises(UsageError, match="did you mean resnet50"):
        load_backbone("resnet5")
    with pytest.raises(UsageError, match="--backbone timm:nosuchnet: timm has no model of that name"):
        load_backbone("timm:nosuchnet")
    with pytest.raises(UsageError, match="--backbone torchvision:nosuchnet: torchvision has no model"):
        load_backbone("torchvision:nosuchnet")


@pytest.mark.parametrize("backbone", ["timm:resnet18", "torchvision:resnet18", "resnet18"])
def test_a_failed_download_keeps_the_weights_advice_in_whole_words(monkeypatch, backbone):
    import timm
    import torchvision
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested "
            "files in the local cache. Please check your connection and try again or make sure your Internet "
            "connection is on."
        )

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(MixgenError) as raised:
        load_backbone(backbone)
    message = str(raised.value)
    assert message.startswith(f"--backbone {backbone}: could not download")
    assert "(An error happened" in message and "in the local cache.)" in message  # its whole first sentence
    assert "try aga" not in message and "--weights FILE" in message and "internet" in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_the_cpu_plan(tmp_path):
    run_cli("snapmix", SAMPLE, tmp_path / "gpu", "--device", "cuda", "--size", "96", "--pairs", "20")
    run_cli("snapmix", SAMPLE, tmp_path / "cpu", "--device", "cpu", "--size", "96", "--pairs", "20")
    gpu = pq.read_table(tmp_path / "gpu" / "data" / "00000" / "metadata.parquet").to_pylist()
    cpu = pq.read_table(tmp_path / "cpu" / "data" / "00000" / "metadata.parquet").to_pylist()
    for g, c in zip(gpu, cpu, strict=True):
        assert (g["source_a"], g["source_b"], g["box_a"], g["box_b"]) == (
            c["source_a"],
            c["source_b"],
            c["box_a"],
            c["box_b"],
        )
        assert g["weight_a"] == pytest.approx(c["weight_a"], abs=0.05)
    assert record(tmp_path / "gpu")["environment"]["device_type"] == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_jpeg_codec_writes_valid_images(tmp_path):
    from PIL import Image

    run_cli("cutmix", SAMPLE, tmp_path / "out", "--device", "cuda", "--codec", "cuda", "--size", "64", "--pairs", "8")
    images = sorted((tmp_path / "out" / "data" / "00000").glob("_*.jpg"))
    assert len(images) == 8
    for path in images:
        with Image.open(path) as img:
            assert img.size == (64, 64)


def test_cuda_codec_without_cuda_device_is_refused(tmp_path):
    result = run_cli("cutmix", SAMPLE, tmp_path / "out", "--device", "cpu", "--codec", "cuda", expect=2)
    assert "--codec cuda" in result.output
