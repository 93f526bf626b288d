"""benchmarks/gpu_check.py, the one command of a device call (issue 33): its --tiny run on the CPU
writes the whole report, its carry check counts what a call takes along and refuses too much, and
its steps stop at their deadlines. A lent GPU minute should never go to fixing this script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["install", "cuda_tests", "build_sources", "mixgen", "bare_limits", "train_eval"]


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so the install step really runs pip offline without the 38 MiB of
    weight wheels a device call carries."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gpu_check_probe/__init__.py", "VALUE = 33\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
def test_tiny_run_writes_the_whole_report(tmp_path: Path) -> None:
    out, work = tmp_path / "report", tmp_path / "work"
    wheels = tmp_path / "wheels"
    probe_wheel(wheels)
    command = [sys.executable, str(SCRIPT), "run", "--tiny", "--out", str(out), "--workdir", str(work)]
    started = time.perf_counter()
    done = subprocess.run([*command, "--wheels", str(wheels)], capture_output=True, text=True, timeout=2500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.perf_counter() - started < 2500

    # What comes back from one call: at most 8 files, names of letters, digits, '.', '_' and '-'.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "mixgen_run.json", "report.json", "report.md", "train_eval.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)

    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert list(steps) == STEPS and report["tiny"] is True and report["total_s"] > 0
    assert {name: step["status"] for name, step in steps.items()} == {
        "install": "ok",
        "cuda_tests": "skipped",
        "build_sources": "ok",
        "mixgen": "ok",
        "bare_limits": "ok",
        "train_eval": "ok",
    }
    for name, step in steps.items():
        if step["status"] == "ok":
            assert step["seconds"] > 0 and step["limit_s"] > 0, name
    assert "needs CUDA" in steps["cuda_tests"]["reason"]

    install = steps["install"]["details"]
    assert install["wheels"] == ["gpu_check_probe-0.1-py3-none-any.whl"] and install["missing_modules"] == {}
    assert (work / "site" / "gpu_check_probe" / "__init__.py").is_file()
    assert install["carry"]["total_bytes"] > install["carry"]["tree_bytes"] > 0

    sources = steps["build_sources"]["details"]
    assert (sources["images"], sources["classes"], sources["train_images"]) == (24, 4, 12)
    assert sources["mean_jpeg_kb"] > 15  # photo-like, not flat colour

    mixgen = steps["mixgen"]["details"]
    assert mixgen["status"] == "complete" and mixgen["counts"]["written"] == 48 and mixgen["size"] == 64
    assert mixgen["counts"]["sources"] == 24  # --split all: every photo of the CUB-layout set
    assert list(mixgen["stages"])[:4] == ["scan_s", "load_s", "decode_s", "backbone_s"]
    assert mixgen["stages"]["backbone_s"] > 0 and mixgen["stages"]["total_s"] > 0
    assert mixgen["wall_s"] >= mixgen["stages"]["total_s"] and mixgen["max_rss_mib"] > 100
    assert mixgen["gpu_memory"]["peak_mib"] is None and mixgen["gpu_memory"]["reason"]

    bare = steps["bare_limits"]["details"]
    for measure in ("decode_pillow_pool", "backbone_forward", "encode_pillow_pool"):
        assert bare[measure]["per_s"] > 0 and bare[measure]["seconds"] > 0, measure
    assert bare["backbone_forward"]["call_size"] >= 1 and bare["backbone_forward"]["dtype"] == "float32"
    for measure in ("decode_nvjpeg", "encode_nvjpeg"):
        assert "needs CUDA" in bare[measure]["skipped"], measure

    train = steps["train_eval"]["details"]
    assert train["complete"] is True and train["arms_done"] == ["clean", "online-cutmix"]
    assert all(0 <= entry["top1"][0] <= 1 and entry["wall_s"][0] > 0 for entry in train["arms"].values())

    table = (out / "report.md").read_text()
    assert "| mixgen | ok |" in table and "| stage | seconds |" in table and "| backbone_s |" in table
    assert "| cuda_tests | skipped |" in table and "| training arm |" in table
    assert "===== mixgen" in (out / "log.txt").read_text()


def git_repo(root: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("/carried/\n/ignored.bin\n")
    (root / "tracked.txt").write_bytes(b"t" * 1000)
    subprocess.run(["git", "-C", str(root), "add", "tracked.txt", ".gitignore"], check=True)
    (root / "untracked.txt").write_bytes(b"u" * 500)  # untracked but not ignored: it travels
    (root / "ignored.bin").write_bytes(b"i" * 10_000)  # ignored and not carried: it stays
    (root / "carried").mkdir()
    (root / "carried" / "a.whl").write_bytes(b"w" * 3000)
    return root


def test_carry_size_counts_the_tree_and_the_carried_folders(tmp_path: Path, gpu_check) -> None:
    repo = git_repo(tmp_path / "repo")
    size = gpu_check.carry_size(repo, [repo / "carried"])
    assert size["tree_bytes"] == 1000 + 500 + len("/carried/\n/ignored.bin\n")
    assert size["carried_bytes"] == {"carried": 3000}
    assert size["total_bytes"] == size["tree_bytes"] + 3000 and size["fits"]
    # On the device the copy may have no git: every file outside .git and the carried folders.
    (repo / ".git" / "HEAD").rename(repo / ".git" / "HEAD.off")
    walked = gpu_check.carry_size(repo, [repo / "carried"])
    assert walked["tree_bytes"] == size["tree_bytes"] + 10_000


def test_carry_check_refuses_a_call_over_the_limit(tmp_path: Path, gpu_check, capsys) -> None:
    repo = git_repo(tmp_path / "repo")
    assert gpu_check.check_carry(repo, [repo / "carried"], limit=1 << 20)["fits"]
    with pytest.raises(gpu_check.CheckError, match=r"^too large for one device call: .* MiB > 0 MiB"):
        gpu_check.check_carry(repo, [repo / "carried"], limit=4000)
    assert "one device call carries" in capsys.readouterr().out


def test_carry_size_command_says_one_line_when_over_64_mib(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with open(wheels / "huge.whl", "wb") as sparse:  # 65 MiB by size, nothing on disk
        sparse.truncate(65 * 1024 * 1024)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "carry-size", "--wheels", str(wheels)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("gpu_check: too large for one device call:")


def test_a_step_is_stopped_at_its_deadline_and_may_save_its_work(tmp_path: Path, gpu_check) -> None:
    saved = tmp_path / "saved.json"
    program = (
        "import json, time\n"
        "try:\n    time.sleep(60)\n"
        f"except KeyboardInterrupt:\n    open({str(saved)!r}, 'w').write(json.dumps({{'kept': 1}}))\n"
    )
    # 5 s: the child must be inside its try before the signal, also on a loaded machine.
    run = gpu_check.run_limited([sys.executable, "-c", program], 5.0, tmp_path / "log", dict(os.environ))
    assert run.timed_out and run.returncode is None and 5.0 <= run.seconds < 5.0 + gpu_check.STOP_GRACE_S
    assert json.loads(saved.read_text()) == {"kept": 1}  # SIGINT first: Python can write what it measured
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)\n"
    gpu_check.STOP_GRACE_S, grace = 0.5, gpu_check.STOP_GRACE_S
    try:
        run = gpu_check.run_limited([sys.executable, "-c", stubborn], 0.5, tmp_path / "log", dict(os.environ))
    finally:
        gpu_check.STOP_GRACE_S = grace
    assert run.timed_out and run.seconds < 5  # SIGTERM after the grace
    ok = gpu_check.run_limited([sys.executable, "-c", "print(1)"], 30.0, tmp_path / "log", dict(os.environ))
    assert (ok.returncode, ok.timed_out) == (0, False) and ok.max_rss_mib > 1


def test_sources_are_cub_sized_photo_like_jpegs_in_cub_layout(tmp_path: Path, gpu_check) -> None:
    record = gpu_check.build_sources(tmp_path / "src", sources=12, classes=3, timeout_s=120)
    assert (record["images"], record["classes"], record["train_images"], record["reused"]) == (12, 3, 6, False)
    files = gpu_check.source_files(tmp_path / "src")
    assert len(files) == 12 and all(f.is_file() for f in files)
    assert (tmp_path / "src" / "classes.txt").read_text().splitlines()[0] == "1 001.Synthetic_001"
    again = gpu_check.build_sources(tmp_path / "src", sources=12, classes=3, timeout_s=120)
    assert again["reused"] and again["images"] == 12
    sizes = [gpu_check.cub_photo_size(gpu_check.np.random.default_rng(i)) for i in range(2000)]
    assert all(240 <= min(s) <= max(s) <= 500 for s in sizes)
    assert 0.2 < sum(s in ((500, 375), (375, 500)) for s in sizes) / len(sizes) < 0.45  # CUB's commonest size
    assert 0.1 < sum(w < h for w, h in sizes) / len(sizes) < 0.25  # some portrait photos
    assert sum(max(s) == 500 for s in sizes) / len(sizes) > 0.85
    assert record["mean_jpeg_kb"] > 25  # noise and texture: a 500×375 photo's size, not a flat one's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bare_limits_on_cuda_measure_nvjpeg_and_the_bf16_forward(tmp_path: Path, gpu_check) -> None:
    gpu_check.build_sources(tmp_path / "src", sources=16, classes=2, timeout_s=120)
    found = gpu_check.measure_bare_limits(tmp_path / "src", 448, "cuda", 16, 64, cap_s=0.5)
    for measure in ("decode_pillow_pool", "decode_nvjpeg", "backbone_forward", "encode_pillow_pool", "encode_nvjpeg"):
        assert found[measure].get("per_s", 0) > 0, (measure, found[measure])
    assert found["backbone_forward"]["dtype"] == "bf16 autocast" and found["backbone_forward"]["call_size"] == 64
    assert found["backbone_forward"]["peak_gpu_mib"] > 0
