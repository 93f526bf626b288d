"""Shared fixtures. End-to-end runs use small views (--size 64/96) and few pairs so the whole suite
stays within minutes on 2 CPU cores; runs that several tests read are made once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Iterator[Path]:
    """ONNX models exported by the tests go to a folder of this session, not the user's cache
    (set in the environment, so subprocess runs such as torchrun's workers share it)."""
    path = tmp_path_factory.mktemp("mixgen-cache")
    previous = os.environ.get("MIXGEN_CACHE_DIR")
    os.environ["MIXGEN_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MIXGEN_CACHE_DIR", None)
    else:
        os.environ["MIXGEN_CACHE_DIR"] = previous


def run_cli(*args: str, expect: int | None = 0):
    """Invoke the CLI in-process (no torch re-import per call); assert the exit code when given."""
    from mixgen.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def sample_run(tmp_path_factory, name: str, method: str, *args) -> Path:
    """A run of ``mixgen METHOD sample_data OUT *args`` into a new OUT: the reference runs that
    module-scoped fixtures share."""
    out = tmp_path_factory.mktemp(name) / "out"
    run_cli(method, SAMPLE, out, *args)
    return out


@pytest.fixture(scope="session")
def sample_src() -> Path:
    return SAMPLE


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of sample_data for tests that add or break files."""
    dst = tmp_path / "src"
    shutil.copytree(SAMPLE, dst)
    return dst


SMALL = {
    "snapmix": ["--size", "96", "--pairs", "40", "--shard-size", "25"],
    "attentive": ["--size", "64", "--pairs", "30", "--grid", "4", "--top-k", "5"],
    "cutmix": ["--size", "64", "--pairs", "30"],
    "mixup": ["--size", "64", "--pairs", "30"],
    "resizemix": ["--size", "64", "--pairs", "30"],
    "saliencymix": ["--size", "64", "--pairs", "30"],
    "fmix": ["--size", "64", "--pairs", "30"],
    "gridmix": ["--size", "64", "--pairs", "30", "--grid", "4"],
    "cutmix_semantic": ["--size", "64", "--pairs", "30", "--label-weights", "semantic"],
}


@pytest.fixture(scope="session")
def method_outputs(tmp_path_factory) -> dict[str, Path]:
    """One small CPU run of each method on sample_data (and one semantic-weights run, named
    ``<method>_semantic``), shared by the read-only tests."""
    outs = {}
    for method, extra in SMALL.items():
        outs[method] = sample_run(tmp_path_factory, method, method.partition("_")[0], "--device", "cpu", *extra)
    return outs


def load_benchmark(name: str):
    """A module of the benchmarks package (``bench``, ``fidelity``, ``train_eval``)."""
    return importlib.import_module(f"benchmarks.{name}")


def one_line(output: str) -> str:
    """The single non-blank line a refusal prints (no traceback), asserted to be the only one."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and len(lines) == 1, output
    return lines[0]
