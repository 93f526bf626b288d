"""Choosing what the viewers show: ``preview --sample N`` (seeded random rows) and ``--class``,
``cam --limit`` spread over the classes, and the preview's captions and SPM legend."""

from __future__ import annotations

import json

import pytest

from mixgen.commands import preview
from mixgen.errors import MixgenError, UsageError
from tests.conftest import SAMPLE, run_cli, sample_run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return sample_run(tmp_path_factory, "choices", "cutmix", "--size", "32", "--pairs", "24", "--device", "cpu")


def test_preview_sample_draws_seeded_random_rows(small_run, tmp_path):
    first = preview.make_preview(small_run, tmp_path / "a.png", sample=4, seed=1, tile=32)
    again = preview.make_preview(small_run, tmp_path / "b.png", sample=4, seed=1, tile=32)
    other = preview.make_preview(small_run, tmp_path / "c.png", sample=4, seed=2, tile=32)
    assert first["indices"] == again["indices"] and first["indices"] != other["indices"]
    assert len(set(first["indices"])) == 4 and first["indices"] == sorted(first["indices"])
    assert first["indices"] != [0, 1, 2, 3] and max(first["indices"]) < 24
    assert preview.make_preview(small_run, tmp_path / "d.png", sample=99, tile=32)["rows"] == 24  # all, no error
    assert preview.make_preview(small_run, tmp_path / "e.png", count=3, tile=32)["indices"] == [0, 1, 2]
    result = run_cli(
        "preview", small_run, "--sample", "2", "--seed", "5", "--tile", "32", "--output", tmp_path / "f.png"
    )
    assert result.stdout.strip() == str(tmp_path / "f.png")
    with pytest.raises(UsageError, match="--sample must be >= 1"):
        preview.make_preview(small_run, tmp_path / "g.png", sample=0)
    both = run_cli("preview", small_run, "--sample", "2", "--count", "3", "--output", tmp_path / "h.png", expect=2)
    assert "--count" in both.output and "--sample" in both.output


def test_preview_class_keeps_rows_with_that_class(small_run, tmp_path):
    import pyarrow.dataset as ds

    rows = ds.dataset(small_run / "data", format="parquet").to_table().to_pylist()
    wanted = {r["index"] for r in rows if "cat" in (r["class_a"], r["class_b"])}
    summary = preview.make_preview(small_run, tmp_path / "cat.png", classes=["cat"], count=50, tile=32)
    assert set(summary["indices"]) == wanted and wanted
    two = preview.make_preview(small_run, tmp_path / "two.png", classes=["cat", "rocket"], sample=3, seed=0, tile=32)
    assert all(
        i in {r["index"] for r in rows if {r["class_a"], r["class_b"]} & {"cat", "rocket"}} for i in two["indices"]
    )
    with pytest.raises(MixgenError, match="--class heron: no output of this run"):
        preview.make_preview(small_run, tmp_path / "none.png", classes=["heron"])
    cli = run_cli("preview", small_run, "--class", "heron", "--output", tmp_path / "x.png", expect=1)
    assert "astronaut" in cli.output and len(cli.output.strip().splitlines()) == 1


def test_cam_limit_takes_sources_spread_over_classes(tmp_path):
    result = run_cli(
        "cam", SAMPLE, tmp_path / "cams", "--cam", "mean", "--size", "32", "--limit", "7", "--device", "cpu", "--json"
    )
    items = json.loads(result.stdout)["items"]
    classes = [item["class"] for item in items]
    assert len(items) == 7 and set(classes) == {"astronaut", "cat", "coffee", "flower", "rocket"}
    assert all(classes.count(c) <= 2 for c in set(classes))


SEMANTIC_ROW = {
    "index": 3,
    "class_a": "cat",
    "class_b": "rocket",
    "label_a": 1,
    "label_b": 4,
    "weight_a": 0.61,
    "weight_b": 0.22,
    "area_ratio": 0.3,
    "label_weights": "semantic",
    "lam": None,
    "cells": None,
}


def test_snapmix_captions_name_the_area_once_and_the_sheet_says_what_an_spm_is():
    _, second = preview._captions(SEMANTIC_ROW)
    assert second.count("area from b") == 1 and "0.300" in second and second.count("0.300") == 1
    _, area = preview._captions({**SEMANTIC_ROW, "label_weights": "area", "weight_a": 0.7, "weight_b": 0.3})
    assert area.count("area from b") == 1
    line = preview.legend({"method": "snapmix", "label_weights": "semantic"})
    assert line.startswith("SPM") and "semantic percentage map" in line and "\n" not in line
    assert preview.legend({"method": "cutmix", "label_weights": "area"}) is None or "SPM" not in preview.legend(
        {"method": "cutmix", "label_weights": "area"}
    )
