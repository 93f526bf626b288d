"""The benchmark's dataset builder and ratio arithmetic (no timing assertions: the benchmark measures,
the tests only check that what it builds is a valid, deterministic mixgen input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mixgen.sources.scan import scan
from tests.conftest import load_benchmark


def load_bench():
    return load_benchmark("bench")


def test_dataset_builder_makes_a_deterministic_imagefolder(tmp_path: Path) -> None:
    bench = load_bench()
    root, _, reused = bench.build_dataset(tmp_path / "src", sources=4, classes=2, seed=3, jobs=1)
    assert not reused
    index = scan(root, "auto", None)
    assert len(index) == 4 and index.classes == ["class_000", "class_001"]
    for item in index.items:
        with Image.open(root / item.path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert max(img.size) == 500 and 300 <= min(img.size) < 500
    assert np.array_equal(bench.synth_image(3, 1, 1), bench.synth_image(3, 1, 1))
    assert bench.build_dataset(root, sources=4, classes=2, seed=3, jobs=1)[2]  # reused, not rebuilt


def test_paired_ratio_takes_the_median_of_per_round_ratios() -> None:
    bench = load_bench()
    ratio = bench.paired_ratio([90.0, 50.0, 100.0], [100.0, 100.0, 100.0])
    assert ratio["median"] == 0.9 and ratio["low"] == 0.5 and ratio["high"] == 1.0
    # Pairing: a round where the machine was slow for both sides still gives the true ratio.
    assert bench.paired_ratio([45.0, 90.0], [50.0, 100.0])["rounds"] == [0.9, 0.9]


def test_compared_run_options_and_the_cam_sides_to_export() -> None:
    bench = load_bench()
    args = bench.parse_args(["--method", "snapmix", "--size", "448", "--compare-runtime"])
    assert args.compare == "--runtime torch" and bench.cam_sizes(args) == [448]
    args = bench.parse_args(["--size", "448", "--compare-args", "--cam-size 512 --cam-norm floor"])
    assert args.compare == "--cam-size 512 --cam-norm floor" and bench.cam_sizes(args) == [448, 512]
    args = bench.parse_args(["--size", "224", "--mixgen-args", "--cam-size 320"])
    assert args.compare is None and bench.cam_sizes(args) == [320]


def test_amdahl_ceiling_of_a_faster_stage() -> None:
    bench = load_bench()
    assert bench.amdahl_ceiling(10.0, 6.0, 1.5) == 1.25  # 4 s untouched + 6 s / 1.5
    assert bench.amdahl_ceiling(10.0, 6.0, 1.0) == 1.0
    assert abs(bench.amdahl_ceiling(10.0, 6.0, 1e12) - 2.5) < 1e-9  # the untouched 4 s bound it
    assert bench.summarise([3.0, 1.0, 2.0]) == {"median": 2.0, "low": 1.0, "high": 3.0, "rounds": [1.0, 2.0, 3.0]}
