"""ONNX Runtime for the CAM pass (mixgen.cam.onnx_runtime): the same maps as PyTorch, the export
cache, the fallback to PyTorch and byte-identical outputs under either runtime."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from mixgen.cam.backbones import fast_inference_copy, load_backbone
from mixgen.cam.cams import invariant_feature_maps
from mixgen.cam.onnx_runtime import OnnxFeatures, cam_pass_backbone
from tests.conftest import SAMPLE, run_cli

CPU = torch.device("cpu")
THREADS = 2


def views(count: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module")
def embedded():
    return fast_inference_copy(load_backbone("efficientnet_lite0")).to(CPU)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of this test only (failure markers must not leak into other tests)."""
    monkeypatch.setenv("MIXGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def assert_maps_match(torch_backbone, ort_backbone, side: int, count: int = 3) -> None:
    batch = views(count, side)
    expected = invariant_feature_maps(torch_backbone, batch, side)
    got = invariant_feature_maps(ort_backbone, batch, side)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# 72: odd sides deep in the net take lite0's padded path
@pytest.mark.parametrize("side", [64, pytest.param(72, marks=pytest.mark.slow)])
def test_embedded_backbone_maps_match_pytorch(embedded, side):
    ort_backbone, report = cam_pass_backbone(embedded, "onnxruntime", CPU, side, THREADS)
    assert report.name == "onnxruntime" and report.note is None
    assert isinstance(ort_backbone.features, OnnxFeatures)
    assert ort_backbone.model is embedded.model and not isinstance(embedded.features, OnnxFeatures)
    assert_maps_match(embedded, ort_backbone, side)


@pytest.mark.slow
def test_torchvision_backbone_with_weights_file_maps_match_pytorch(tmp_path):
    import torchvision

    torch.manual_seed(1)
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    backbone = fast_inference_copy(load_backbone("torchvision:mobilenet_v3_small", weights=path)).to(CPU)
    ort_backbone, report = cam_pass_backbone(backbone, "auto", CPU, 64, THREADS)
    assert report.name == "onnxruntime", report.note
    assert_maps_match(backbone, ort_backbone, 64)


def test_maps_do_not_depend_on_how_sources_are_grouped(embedded):
    ort_backbone, _ = cam_pass_backbone(embedded, "onnxruntime", CPU, 64, THREADS)
    batch = views(7, 64, seed=3)
    whole = invariant_feature_maps(ort_backbone, batch, 64)
    parts = torch.cat(
        [invariant_feature_maps(ort_backbone, batch[:3], 64), invariant_feature_maps(ort_backbone, batch[3:], 64)]
    )
    assert torch.equal(whole, parts)


@pytest.mark.slow
def test_cache_is_reused_and_rebuilt_when_the_weights_change(embedded, own_cache, monkeypatch):
    import copy

    import mixgen.cam.onnx_runtime as onnx_runtime

    _, first = cam_pass_backbone(embedded, "auto", CPU, 64, THREADS)
    assert first.exported and first.model and own_cache.joinpath(first.model.rsplit("/", 1)[1]).is_file()
    real_export = onnx_runtime.export_onnx
    calls = []
    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda *a: calls.append(a) or real_export(*a))
    _, again = cam_pass_backbone(embedded, "auto", CPU, 64, THREADS)
    assert again.name == "onnxruntime" and not again.exported and again.model == first.model and not calls

    changed = copy.deepcopy(embedded)
    with torch.no_grad():
        changed.model._conv_head.weight.mul_(1.01)
    changed.features = changed.model.forward_features
    changed_backbone, rebuilt = cam_pass_backbone(changed, "auto", CPU, 64, THREADS)
    assert rebuilt.exported and rebuilt.model != first.model and len(calls) == 1
    assert_maps_match(changed, changed_backbone, 64, count=1)
    _, other_side = cam_pass_backbone(embedded, "auto", CPU, 96, THREADS)
    assert other_side.exported and other_side.model != first.model
    assert sorted(p.suffix for p in own_cache.iterdir()) == [".onnx"] * 3  # no temp file left


@pytest.mark.parametrize("where", ["export", "session"])
def test_failure_falls_back_to_pytorch_once(embedded, own_cache, monkeypatch, where):
    import mixgen.cam.onnx_runtime as onnx_runtime

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of a made-up operator\nsecond line of detail")

    monkeypatch.setattr(onnx_runtime, "export_onnx" if where == "export" else "OnnxFeatures", broken)
    backbone, report = cam_pass_backbone(embedded, "onnxruntime", CPU, 64, THREADS)
    assert backbone is embedded and report.name == "torch" and not report.exported
    assert report.note.startswith("ONNX Runtime not used (export failed: RuntimeError: Unsupported")
    assert "\n" not in report.note and "second line" not in report.note
    # The failure is remembered: the next run falls back at once instead of exporting again.
    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda *a: pytest.fail("exported again"))
    _, again = cam_pass_backbone(embedded, "auto", CPU, 64, THREADS)
    assert again.name == "torch" and "cached in" in again.note


@pytest.mark.slow
def test_failed_export_run_completes_on_pytorch_with_one_line(tmp_path, own_cache, monkeypatch):
    import mixgen.cam.onnx_runtime as onnx_runtime

    monkeypatch.setattr(onnx_runtime, "export_onnx", lambda *a: 1 / 0)
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", "--device", "cpu", "--size", "64", "--pairs", "6")
    record = json.loads((tmp_path / "out" / "mixgen.json").read_text())
    assert record["status"] == "complete" and record["backbone"]["runtime"] == "torch"
    assert record["runtime"]["note"].startswith("ONNX Runtime not used (export failed: ZeroDivisionError")
    assert "Traceback" not in result.output and "ONNX Runtime not used" in result.output


@pytest.mark.slow
def test_runtime_is_part_of_the_fingerprint(tmp_path):
    common = ["--device", "cpu", "--size", "64", "--pairs", "6"]
    out = tmp_path / "out"
    run_cli("snapmix", SAMPLE, out, *common)
    assert json.loads((out / "mixgen.json").read_text())["backbone"]["runtime"] == "onnxruntime"
    # The request is not the fingerprint, the runtime that ran is: auto and onnxruntime resume each other.
    assert "already complete: 6 outputs" in run_cli("snapmix", SAMPLE, out, *common, "--runtime", "onnxruntime").output
    refused = run_cli("snapmix", SAMPLE, out, *common, "--runtime", "torch", expect=1)
    assert "holds a different mixgen run" in refused.output
    run_cli("snapmix", SAMPLE, out, *common, "--runtime", "torch", "--overwrite")
    record = json.loads((out / "mixgen.json").read_text())
    assert record["backbone"]["runtime"] == "torch" and record["runtime"]["requested"] == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_batch_and_worker_counts_do_not_change_outputs_under_each_runtime(tmp_path, runtime):
    common = ["--device", "cpu", "--size", "64", "--pairs", "60", "--runtime", runtime]
    run_cli("snapmix", SAMPLE, tmp_path / "a", *common, "--batch-size", "3", "--workers", "1")
    run_cli("snapmix", SAMPLE, tmp_path / "b", *common, "--batch-size", "16", "--workers", "3")
    for out in ("a", "b"):
        assert json.loads((tmp_path / out / "mixgen.json").read_text())["backbone"]["runtime"] == runtime
    a = pq.read_table(tmp_path / "a" / "data" / "00000" / "metadata.parquet")
    b = pq.read_table(tmp_path / "b" / "data" / "00000" / "metadata.parquet")
    assert a.equals(b)  # sha256 column included: the images are byte-identical too


@pytest.mark.slow
def test_snapmix_weights_agree_between_runtimes(tmp_path):
    common = ["--device", "cpu", "--size", "96", "--pairs", "40"]
    run_cli("snapmix", SAMPLE, tmp_path / "ort", *common, "--runtime", "onnxruntime")
    run_cli("snapmix", SAMPLE, tmp_path / "pt", *common, "--runtime", "torch")
    ort = pq.read_table(tmp_path / "ort" / "data" / "00000" / "metadata.parquet").to_pydict()
    pt = pq.read_table(tmp_path / "pt" / "data" / "00000" / "metadata.parquet").to_pydict()
    assert ort["box_a"] == pt["box_a"] and ort["source_b"] == pt["source_b"]
    for key in ("weight_a", "weight_b"):
        assert max(abs(x - y) for x, y in zip(ort[key], pt[key], strict=True)) < 1e-4


@pytest.mark.slow
def test_cam_command_takes_the_runtime(tmp_path):
    result = run_cli("cam", SAMPLE, tmp_path / "cams", "--size", "64", "--limit", "2", "--device", "cpu", "--json")
    summary = json.loads(result.stdout)
    assert summary["settings"]["runtime"] == "onnxruntime" and summary["runtime_note"] is None
    result = run_cli("cam", SAMPLE, tmp_path / "pt", "--size", "64", "--limit", "2", "--runtime", "torch", "--json")
    assert json.loads(result.stdout)["settings"]["runtime"] == "torch"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runtime", "tensorrt"], "--runtime must be auto, torch or onnxruntime"),
        (["--runtime", "onnxruntime", "--device", "cuda"], "--runtime onnxruntime runs on the CPU"),
    ],
)
def test_bad_runtime_is_a_usage_error(tmp_path, extra, message):
    result = run_cli("snapmix", SAMPLE, tmp_path / "out", "--pairs", "2", *extra, expect=2)
    assert message in result.output
