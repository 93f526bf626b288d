"""The tools for looking at a run: ``mixgen cam``, ``mixgen preview`` and ``mixgen stats``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mixgen.output.manifest import read_manifest, read_run_metadata
from tests.conftest import run_cli

METHODS = ["snapmix", "attentive", "cutmix", "mixup", "resizemix", "saliencymix", "fmix", "gridmix", "cutmix_semantic"]


@pytest.mark.slow
def test_cam_writes_overlays_and_maps_that_match_the_run(method_outputs, sample_src, tmp_path):
    """Same settings as the snapmix fixture run (--size 96, probe): the .npy maps are that run's
    SPMs, each an S×S float32 map summing to 1, and the probe is fitted on all 20 sources."""
    from mixgen.cam.heatmaps import spm_maps
    from mixgen.commands.preview import _cached_maps
    from mixgen.sources.scan import scan

    out = tmp_path / "cams"
    result = run_cli("cam", sample_src, out, "--size", "96", "--limit", "3", "--device", "cpu")
    assert result.stdout.strip() == str(out)
    index = json.loads((out / "cams.json").read_text())
    assert index["written"] == 3 and index["sources"] == 20
    assert index["probe"]["sources"] == 20 and index["probe"]["train_accuracy"] > 0.5
    assert len(list(out.rglob("*.png"))) == 3 and len(list(out.rglob("*.npy"))) == 3

    run = method_outputs["snapmix"]
    src_index = scan(sample_src)
    cached = _cached_maps(run, read_run_metadata(run), src_index)
    assert cached is not None, "the run's CAM cache was not found under OUT/.mixgen"
    positions = {source.path: position for position, source in enumerate(src_index.items)}
    assert len({src_index.items[positions[item["source"]]].label for item in index["items"]}) == 3  # spread
    for item in index["items"]:
        position = positions[item["source"]]
        assert item["cam_class"] == item["label"]
        with Image.open(out / item["overlay"]) as png:
            assert png.size == (96, 96) and png.mode == "RGB"
        spm = np.load(out / item["map"])
        assert spm.shape == (96, 96) and spm.dtype == np.float32
        assert spm.min() >= 0 and float(spm.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-4)
        expected = spm_maps(np.asarray(cached[position])[None], 96)[0]
        np.testing.assert_allclose(spm, expected, rtol=0.02, atol=2e-6)


@pytest.mark.slow
def test_cam_mean_mode_json_and_refusals(method_outputs, sample_src, tmp_path):
    result = run_cli("cam", sample_src, tmp_path / "mean", "--cam", "mean", "--size", "64", "--limit", "2", "--json")
    summary = json.loads(result.stdout)
    assert summary["written"] == 2 and summary["probe"] is None
    assert [item["cam_class"] for item in summary["items"]] == [None, None]
    for item in summary["items"]:
        assert np.load(tmp_path / "mean" / item["map"]).sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-4)

    again = run_cli("cam", sample_src, tmp_path / "mean", "--cam", "mean", "--size", "64", "--limit", "1", "--json")
    kept = {item["overlay"] for item in json.loads(again.stdout)["items"]}
    written = {p.relative_to(tmp_path / "mean").as_posix() for p in (tmp_path / "mean").rglob("*.png")}
    assert written == kept  # the earlier output's files are gone, not mixed with the new ones
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused = run_cli("cam", sample_src, mine, "--cam", "mean", "--size", "64", "--limit", "1", expect=1)
    assert "is not empty and holds no CAM images of mixgen" in refused.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    refused = run_cli("cam", sample_src, method_outputs["cutmix"], "--limit", "1", expect=1)
    assert "holds a mixgen run" in refused.output
    assert "--limit" in run_cli("cam", sample_src, tmp_path / "x", "--limit", "0", expect=2).output
    assert "does not exist" in run_cli("cam", tmp_path / "nope", tmp_path / "y", expect=1).output


# Runs without maps in their cache make preview load the backbone: those are the slow ones.
PREVIEW_CASES = [
    m if m in ("snapmix", "attentive", "cutmix_semantic") else pytest.param(m, marks=pytest.mark.slow) for m in METHODS
]


@pytest.mark.parametrize("method", PREVIEW_CASES)
def test_preview_every_method(method_outputs, tmp_path, method):
    png = tmp_path / f"{method}.png"
    result = run_cli("preview", method_outputs[method], "--count", "3", "--tile", "64", "--output", png)
    assert result.stdout.strip() == str(png)
    with Image.open(png) as sheet:
        sheet.load()
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        assert sheet.width == 5 * 64 + 6 * 4
        assert 3 * 64 < sheet.height < 3 * 64 + 3 * 40 + 40
        pixels = np.asarray(sheet)
    assert pixels.std() > 20  # real image content, not a blank sheet


@pytest.mark.slow
def test_preview_uses_the_run_maps_and_survives_a_missing_src(method_outputs, tmp_path):
    from mixgen.commands.preview import make_preview

    summary = make_preview(method_outputs["attentive"], tmp_path / "att.png", count=2, tile=48, colors=64)
    assert summary["maps"] and not summary["notes"]
    with Image.open(tmp_path / "att.png") as sheet:
        assert sheet.mode == "P" and len(sheet.getcolors(256)) <= 64
    # Without the CAM cache the maps are recomputed (probe refitted on every source).
    uncached = tmp_path / "uncached"
    shutil.copytree(method_outputs["snapmix"], uncached, ignore=shutil.ignore_patterns(".mixgen"))
    summary = make_preview(uncached, tmp_path / "snap.png", count=2, tile=48, device="cpu")
    assert summary["maps"] and not summary["notes"]
    moved = tmp_path / "moved"
    shutil.copytree(method_outputs["mixup"], moved)
    record = json.loads((moved / "mixgen.json").read_text())
    record["source"]["root"] = str(tmp_path / "gone")
    (moved / "mixgen.json").write_text(json.dumps(record))
    summary = make_preview(moved, tmp_path / "moved.png", count=2, tile=48)
    assert not summary["maps"] and any("--src" in note for note in summary["notes"])
    with Image.open(tmp_path / "moved.png") as sheet:
        assert sheet.size == (summary["width"], summary["height"])


def test_preview_refuses_bad_options(method_outputs, tmp_path):
    out = method_outputs["mixup"]
    assert "--count" in run_cli("preview", out, "--count", "0", expect=2).output
    assert ".png" in run_cli("preview", out, "--output", tmp_path / "x.jpg", expect=2).output
    assert "--colors" in run_cli("preview", out, "--colors", "1", expect=2).output
    assert "no manifest" in run_cli("preview", tmp_path, "--output", tmp_path / "x.png", expect=1).output


@pytest.mark.parametrize("method", ["snapmix", "attentive", "fmix", "cutmix_semantic"])
def test_stats_json_counts_equal_the_manifest(method_outputs, method):
    out = method_outputs[method]
    stats = json.loads(run_cli("stats", out, "--json").stdout)
    manifest = read_manifest(out)
    label_a, label_b = manifest.column("label_a").to_numpy(), manifest.column("label_b").to_numpy()
    weight_a = manifest.column("weight_a").to_numpy().astype(np.float64)
    weight_b = manifest.column("weight_b").to_numpy().astype(np.float64)
    area = manifest.column("area_ratio").to_numpy().astype(np.float64)
    classes = read_run_metadata(out)["classes"]

    assert stats["rows"] == manifest.num_rows
    assert stats["methods"] == {method.partition("_")[0]: manifest.num_rows}
    assert stats["shards"] == (2 if method == "snapmix" else 1)
    assert [c["class"] for c in stats["classes"]] == classes
    assert [c["as_canvas"] for c in stats["classes"]] == np.bincount(label_a, minlength=len(classes)).tolist()
    assert [c["as_donor"] for c in stats["classes"]] == np.bincount(label_b, minlength=len(classes)).tolist()
    assert stats["same_label_rows"] == int((label_a == label_b).sum())
    for key, values in (("weight_a", weight_a), ("weight_b", weight_b), ("weight_sum", weight_a + weight_b)):
        dist = stats["weights"][key]
        assert dist["count"] == manifest.num_rows
        assert dist["min"] == pytest.approx(values.min(), abs=1e-6)
        assert dist["max"] == pytest.approx(values.max(), abs=1e-6)
        assert dist["mean"] == pytest.approx(values.mean(), abs=1e-6)
        assert dist["median"] == pytest.approx(np.median(values), abs=1e-6)

    if method in ("snapmix", "cutmix_semantic"):
        gap = stats["semantic_vs_area"]
        keep = (label_a != label_b) & (area > 0)
        assert gap["rows"] == int(keep.sum()) > 0
        assert gap["mean_abs_gap_b"] == pytest.approx(np.abs(weight_b - area)[keep].mean(), abs=1e-6)
        assert gap["mean_abs_gap_a"] == pytest.approx(np.abs((1 - weight_a) - area)[keep].mean(), abs=1e-6)
        assert gap["mean_abs_gap_b"] > 0.01  # semantic weights are not the pasted area
    else:
        assert "semantic_vs_area" not in stats
        np.testing.assert_allclose(weight_a + weight_b, 1.0, atol=1e-6)


def test_stats_table_and_errors(method_outputs, tmp_path):
    text = run_cli("stats", method_outputs["snapmix"]).stdout
    for needle in ("rows", "classes", "astronaut", "weight_b", "area rule"):
        assert needle in text
    missing = run_cli("stats", tmp_path / "nothing", expect=1)
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    assert len(missing.output.strip().splitlines()) == 1


def test_viewer_commands_are_listed():
    text = run_cli("--help").stdout
    for command in ("cam", "preview", "stats"):
        assert command in text


def test_cam_overlays_are_one_per_source_even_where_paths_clash(tmp_path):
    """``a/x.jpg`` and ``../a/x.jpg`` (and a path differing only in case) each get their own
    overlay and map; the count is the files written (issue 24 item 14)."""
    from mixgen.commands.cam import overlay_names

    assert overlay_names(["a/x.jpg", "../a/x.jpg", "b/y.jpg", "A/X.jpg", "/b/z.jpg"]) == [
        "a/x.jpg~0",
        "a/x.jpg~1",
        "b/y.jpg",
        "A/X.jpg~3",
        "b/z.jpg",
    ]
    assert overlay_names(["a", "../a", "a~1"]) == ["a~0", "a~1~1", "a~1~2"]
    root = tmp_path / "root"
    for path, color in (("sub/a/x.jpg", "red"), ("a/x.jpg", "blue"), ("sub/b/y.jpg", "green")):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), color).save(root / path)
    src = root / "sub" / "index.csv"
    src.write_text("path,label\na/x.jpg,one\n../a/x.jpg,two\nb/y.jpg,two\n")
    out = tmp_path / "cams"
    result = run_cli("cam", src, out, "--device", "cpu", "--size", "32", "--cam", "mean", "--json")
    summary = json.loads(result.stdout)
    overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert overlays == ["a/x.jpg~0.png", "a/x.jpg~1.png", "b/y.jpg.png"]
    assert summary["written"] == len(overlays) == len(list(out.rglob("*.npy")))
    assert [item["overlay"] for item in summary["items"]] == overlays
    red, blue = (np.asarray(Image.open(out / name))[..., :3].astype(int) for name in overlays[:2])
    assert not np.array_equal(red, blue)
