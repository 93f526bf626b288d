"""Every invalid option value (docs/operations.md, "Exit codes") exits 2 with one line naming the option and what it
accepts, before anything is written."""

from __future__ import annotations

import pytest

from tests.conftest import SAMPLE, one_line, run_cli

CASES = [
    # (method, extra args, text the one line must hold)
    ("attentive", ["--top-k", "50"], "--top-k must be in 1..49"),
    ("attentive", ["--top-k", "17", "--grid", "4"], "--top-k must be in 1..16"),
    ("attentive", ["--top-k", "0"], "--top-k must be in 1..49"),
    ("attentive", ["--grid", "0"], "--grid must be >= 1"),
    ("attentive", ["--size", "8", "--grid", "16", "--top-k", "3"], "--size 8 is too small for --grid 16"),
    ("snapmix", ["--pairs", "0"], "--pairs must be a positive integer"),
    ("cutmix", ["--pairs", "-5"], "--pairs must be a positive integer"),
    ("snapmix", ["--size", "4"], "--size must be in 8..4096"),
    ("cutmix", ["--size", "100000"], "--size must be in 8..4096"),
    ("snapmix", ["--beta", "0"], "--beta must be a finite number > 0"),
    ("cutmix", ["--beta", "-1"], "--beta must be a finite number > 0"),
    ("mixup", ["--beta", "inf"], "--beta must be a finite number > 0"),
    ("mixup", ["--beta", "nan"], "--beta must be a finite number > 0"),
    ("cutmix", ["--quality", "0"], "--quality must be in 1..100"),
    ("cutmix", ["--quality", "101"], "--quality must be in 1..100"),
    ("cutmix", ["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ("snapmix", ["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    ("cutmix", ["--pairing", "best"], "--pairing must be random, cross-class or same-class"),
    ("cutmix", ["--resize", "stretch"], "--resize must be crop or squash"),
    ("cutmix", ["--format", "gif"], "--format must be jpg, png or webp"),
    ("cutmix", ["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in 0..1"),
    ("cutmix", ["--shard-index", "-1"], "--shard-index must be in 0..0"),
    ("cutmix", ["--num-shards", "0"], "--num-shards must be >= 1"),
    ("cutmix", ["--shard-size", "0"], "--shard-size must be >= 1"),
    ("snapmix", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("cutmix", ["--workers", "-1"], "--workers must be >= 0"),
    ("cutmix", ["--seed", "-1"], "--seed must be >= 0"),
    ("snapmix", ["--cam", "bogus"], "--cam must be probe, checkpoint, imagenet or mean"),
    ("snapmix", ["--cam", "checkpoint"], "--cam checkpoint needs --checkpoint FILE"),
    ("snapmix", ["--cam-size", "16"], "--cam-size must be in 32..4096"),
    ("snapmix", ["--cam-norm", "softmax"], "--cam-norm must be colour, floor, relu or raw"),
    ("cutmix", ["--cam-norm", "raw"], "--cam-norm: cutmix with --label-weights area uses no CAM"),
    ("cutmix", ["--backbone", "resnet50"], "--backbone: cutmix with --label-weights area uses no CAM"),
    ("mixup", ["--cam-size", "224"], "--cam-size: mixup with --label-weights area uses no CAM"),
    ("cutmix", ["--layout", "weird"], "--layout must be auto, imagefolder or cub"),
    ("cutmix", ["--split", "train"], "--split applies to the CUB layout only"),
]


@pytest.mark.parametrize(("method", "args", "expected"), CASES, ids=[" ".join(c[1]) for c in CASES])
def test_invalid_value_exits_2_with_one_line(tmp_path, method, args, expected):
    out = tmp_path / "out"
    result = run_cli(method, SAMPLE, out, *args, expect=2)
    line = one_line(result.output)
    assert line.startswith("mixgen: error:") and expected in line, line
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "--shard-index must be in 0..1, got 2"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not an integer"),
    ],
)
def test_bad_torchrun_environment_exits_2(tmp_path, monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_cli("cutmix", SAMPLE, tmp_path / "out", expect=2)
    assert expected in one_line(result.output)


def test_format_is_case_insensitive_and_jpeg_means_jpg(tmp_path):
    result = run_cli("cutmix", SAMPLE, tmp_path / "out", "--format", "JPEG", "--pairs", "2", "--dry-run", "--json")
    assert '"format": "jpg"' in result.stdout
