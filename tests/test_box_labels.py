"""--label-weights boxes: SnapMix's rule on each source's object box drawn in its view, so the
weights are the share of the canvas's object that stays and of the donor's object that arrives."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from mixgen.sources.boxes import coverage_map, upright_box
from mixgen.sources.views import view_box
from tests.conftest import one_line, run_cli

SIZE = 40


def test_coverage_map_is_the_box_share_of_each_cell():
    full = coverage_map((0, 0, 100, 100), (0, 0, 100, 100), 4)
    assert np.allclose(full, 1)
    left = coverage_map((0, 0, 50, 100), (0, 0, 100, 100), 4)
    assert np.allclose(left[:, :2], 1) and np.allclose(left[:, 2:], 0)
    # an edge inside a cell covers its share of it; the view region shifts and scales the box
    part = coverage_map((0, 0, 37.5, 100), (0, 0, 100, 100), 4)
    assert np.allclose(part[0], [1, 0.5, 0, 0])
    cropped = coverage_map((25, 0, 75, 50), (25, 0, 75, 50), 2)
    assert np.allclose(cropped, 1)
    outside = coverage_map((0, 0, 10, 10), (50, 50, 100, 100), 3)
    assert not outside.any()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_box_follows_exif_transpose(tmp_path, orientation):
    """The box turned as the view's pixels are turned: a mask image carrying the orientation tag,
    turned upright by Pillow, has its object exactly where upright_box says."""
    width, height, box = 60, 40, (10, 5, 25, 30)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "m.png"
    mask.save(path, exif=exif)
    with Image.open(path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img)) > 0
    (x0, y0, x1, y1), w, h = upright_box(box, width, height, orientation)
    assert upright.shape == (h, w)
    expected = np.zeros((h, w), bool)
    expected[int(y0) : int(y1), int(x0) : int(x1)] = True
    assert (upright == expected).all()


def _cub(root: Path, boxes: list[str] | None) -> Path:
    """A CUB-layout folder: 3 classes × 4 photos of 60×40 (landscape: the view crops the sides),
    a bright square object on grey, its box in bounding_boxes.txt."""
    rng = np.random.default_rng(0)
    lines, labels, split, box_lines = [], [], [], []
    classes = ["001.A", "002.B", "003.C"]
    for number in range(12):
        cls = number % 3
        rel = f"{classes[cls]}/p{number}.jpg"
        (root / "images" / classes[cls]).mkdir(parents=True, exist_ok=True)
        x, y = int(rng.integers(0, 40)), int(rng.integers(0, 20))
        pixels = np.full((40, 60, 3), 120, np.uint8)
        pixels[y : y + 20, x : x + 20] = rng.integers(150, 255, 3)
        Image.fromarray(pixels).save(root / "images" / rel)
        lines.append(f"{number + 1} {rel}")
        labels.append(f"{number + 1} {cls + 1}")
        split.append(f"{number + 1} 1")
        box_lines.append(f"{number + 1} {x}.0 {y}.0 20.0 20.0")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (root / "bounding_boxes.txt").write_text("\n".join(box_lines if boxes is None else boxes) + "\n")
    return root


def _object_in_view(src: Path, path: str) -> tuple[float, float, float, float]:
    number = int(Path(path).stem[1:]) + 1
    x, y, w, h = (float(v) for v in (src / "bounding_boxes.txt").read_text().split("\n")[number - 1].split()[1:])
    left, top, right, _ = view_box(60, 40)
    scale = SIZE / (right - left)
    clip = lambda v: min(max(v, 0.0), SIZE)  # noqa: E731
    return clip((x - left) * scale), clip((y - top) * scale), clip((x + w - left) * scale), clip((y + h - top) * scale)


def _share(obj, box) -> float:
    inter = max(0, min(obj[2], box["x1"]) - max(obj[0], box["x0"])) * max(
        0, min(obj[3], box["y1"]) - max(obj[1], box["y0"])
    )
    area = (obj[2] - obj[0]) * (obj[3] - obj[1])
    return inter / area


@pytest.mark.parametrize("method", ["cutmix", "snapmix"])
def test_box_weights_are_the_object_shares(tmp_path, method):
    src = _cub(tmp_path / "cub", None)
    out = tmp_path / "out"
    run_cli(method, src, out, "--pairs", 40, "--size", SIZE, "--label-weights", "boxes")
    record = json.loads((out / "mixgen.json").read_text())
    assert record["config"]["label_weights"] == "boxes"
    assert record["config"]["cam"] is None  # no CAM, no backbone: the boxes alone
    rows = pq.read_table(glob.glob(str(out / "data" / "*" / "metadata.parquet"))[0]).to_pylist()
    checked = 0
    for row in rows:
        assert row["label_weights"] == "boxes"
        if row["box_a"] is None or row["label_a"] == row["label_b"]:
            continue
        canvas_object = _object_in_view(src, row["source_a"])
        donor_object = _object_in_view(src, row["source_b"])
        assert row["weight_a"] == pytest.approx(1 - _share(canvas_object, row["box_a"]), abs=0.02)
        assert row["weight_b"] == pytest.approx(_share(donor_object, row["box_b"]), abs=0.02)
        checked += 1
    assert checked > 20


def test_new_boxes_are_another_run(tmp_path):
    src = _cub(tmp_path / "cub", None)
    out = tmp_path / "out"
    run_cli("cutmix", src, out, "--pairs", 8, "--size", SIZE, "--label-weights", "boxes")
    # the same boxes: the same run, which answers at once and grows
    again = run_cli("cutmix", src, out, "--pairs", 8, "--size", SIZE, "--label-weights", "boxes")
    assert "already complete" in again.output
    run_cli("cutmix", src, out, "--pairs", 10, "--size", SIZE, "--label-weights", "boxes")
    text = (src / "bounding_boxes.txt").read_text().replace("20.0 20.0", "10.0 10.0", 1)
    (src / "bounding_boxes.txt").write_text(text)
    result = run_cli("cutmix", src, out, "--pairs", 10, "--size", SIZE, "--label-weights", "boxes", expect=None)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert "object boxes changed (bounding_boxes.txt)" in one_line(result.output)


@pytest.mark.parametrize(
    ("boxes", "said"),
    [
        (["1 0 0 20 20"], "has no box in"),
        ([f"{i} 0 0 20 20" for i in range(1, 12)] + ["12 0 0 -3 20"], "line 12"),
        ([f"{i} 0 0 20 20" for i in range(1, 12)] + ["12 0 zero 3 20"], "is not 'x y width height'"),
    ],
)
def test_bad_box_files_are_refused_in_one_line(tmp_path, boxes, said):
    src = _cub(tmp_path / "cub", boxes)
    result = run_cli(
        "cutmix", src, tmp_path / "out", "--pairs", 8, "--size", SIZE, "--label-weights", "boxes", expect=1
    )
    assert said in one_line(result.output) and "bounding_boxes.txt" in result.output


def test_boxes_need_a_box_file(tmp_path, sample_src):
    result = run_cli(
        "cutmix", sample_src, tmp_path / "out", "--pairs", 8, "--size", SIZE, "--label-weights", "boxes", expect=2
    )
    assert "bounding_boxes.txt" in one_line(result.output)
    assert not (tmp_path / "out" / "data").exists()


def test_preview_and_stats_show_the_boxes(tmp_path):
    from mixgen.commands.preview import heat_titles, legend

    src = _cub(tmp_path / "cub", None)
    out = tmp_path / "out"
    run_cli("snapmix", src, out, "--pairs", 12, "--size", SIZE, "--label-weights", "boxes")
    config = json.loads((out / "mixgen.json").read_text())["config"]
    assert heat_titles(config) == ("object box a", "object box b") and "object" in legend(config)
    sheet = tmp_path / "sheet.png"
    run_cli("preview", out, "--count", 3, "--output", sheet)
    assert Image.open(sheet).size[0] > 0
    stats = run_cli("stats", out, "--json")
    assert "semantic_vs_area" in json.loads(stats.output)
