"""The benchmark's dataset builder and mix-stage timing (no timing assertions: the benchmark measures,
the tests only check that what it builds is a valid, deterministic mixgen input)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mixgen.sources import scan

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("mixgen_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


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


def test_mix_stage_seconds_prefers_the_record_then_file_times(tmp_path: Path) -> None:
    bench = load_bench()
    record = {"timings": {"mix_s": 1.0, "encode_wait_s": 0.5}}
    assert bench.mix_stage_seconds({"timings": {**record["timings"], "mix_stage_s": 2.0}}, tmp_path)[0] == 2.0
    assert bench.mix_stage_seconds(record, tmp_path)[0] == 1.5
    (tmp_path / ".mixgen").mkdir()
    (tmp_path / ".mixgen" / "maps-x.json").write_text("{}")
    (tmp_path / "mixgen.json").write_text(json.dumps(record))
    now = time.time()
    os.utime(tmp_path / ".mixgen" / "maps-x.json", (now - 3, now - 3))
    os.utime(tmp_path / "mixgen.json", (now, now))
    assert abs(bench.mix_stage_seconds(record, tmp_path)[0] - 3.0) < 1e-3
