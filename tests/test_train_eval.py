"""benchmarks/train_eval.py at a tiny size (a few photos, one epoch, the embedded Lite0), so that both
protocols' code runs in CI without the development set, a GPU or any download. The numbers it
prints are not checked: at this size they mean nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_benchmark

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TINY = ["--network", "lite0", "--size", "64", "--cam-size", "64", "--epochs", "1", "--seeds", "1", "--batch-size", "4"]


def load_train_eval():
    return load_benchmark("train_eval")


@pytest.fixture(scope="module")
def tiny_cub(tmp_path_factory) -> tuple[Path, Path]:
    """A CUB-layout folder of sample_data photos: 3 classes, 3 train and 1 test photo each; and a
    work folder the tests share (mixgen's runs are made once)."""
    root = tmp_path_factory.mktemp("cub")
    rows = []
    for label, name in enumerate(("cat", "coffee", "flower"), start=1):
        photos = sorted(p for p in (SAMPLE / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:4]
        (root / "images" / f"00{label}.{name}").mkdir(parents=True)
        for k, photo in enumerate(photos):
            rel = f"00{label}.{name}/{photo.name}"
            shutil.copy(photo, root / "images" / rel)
            rows.append((len(rows) + 1, rel, label, int(k < 3)))
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (root / "classes.txt").write_text("1 001.cat\n2 002.coffee\n3 003.flower\n")
    return root, tmp_path_factory.mktemp("work")


def check_record(record: dict, arms: list[str]) -> None:
    assert record["complete"] and list(record["arms"]) == arms
    for arm in arms:
        entry = record["arms"][arm]
        assert entry["seeds"] == [0] and len(entry["top1"]) == 1 and 0 <= entry["top1"][0] <= 1
        assert entry["steps"] == 3  # 9 photos, batch 4, one epoch: the same budget for every arm
    assert set(record["summary"]) == set(arms)


@pytest.mark.slow
def test_cpu_protocol_at_a_tiny_size(tiny_cub) -> None:
    cub, work = tiny_cub
    train_eval = load_train_eval()
    out = work / "cpu.json"
    arms = ["clean", "online-cutmix", "cutmix", "snapmix", "snapmix-1"]  # every code path, one CAM run
    train_eval.main([str(cub), "--json", str(out), "--workdir", str(work), "--arms", ",".join(arms), *TINY])
    record = json.loads(out.read_text())
    check_record(record, arms)
    sets = record["sets"]
    assert sets["cutmix"]["rows"] == 9 * 4 and sets["snapmix"]["rows"] == 9 * 4  # snapmix-1: its prefix
    assert sets["cutmix"]["cached_images"] == 36
    assert (record["caching"]["photos"], record["caching"]["test_photos"]) == (9, 3)
    # The same command again continues the experiment: nothing is trained twice, nothing cached twice.
    again = train_eval.main([str(cub), "--json", str(out), "--workdir", str(work), "--arms", ",".join(arms), *TINY])
    assert again["arms"] == record["arms"] and again["continues"] == [record["started"]]
    assert all(entry["cached_images"] == 0 for entry in again["sets"].values())
    assert record["summary"]["snapmix"]["vs_clean"]["per_seed"] == [
        record["arms"]["snapmix"]["top1"][0] - record["arms"]["clean"]["top1"][0]
    ]


@pytest.mark.slow
def test_gpu_protocol_runs_on_the_cpu_at_a_tiny_size(tiny_cub) -> None:
    cub, work = tiny_cub
    train_eval = load_train_eval()
    out = work / "gpu.json"
    arms = ["clean", "online-cutmix", "cutmix", "snapmix"]  # online CutMix: pixels mixed in the loop
    argv = [str(cub), "--json", str(out), "--workdir", str(work), "--gpu", "--device", "cpu", "--arms", ",".join(arms)]
    train_eval.main([*argv, *TINY])
    record = json.loads(out.read_text())
    check_record(record, arms)
    assert set(record["sets"]) == {"cutmix", "snapmix"} and record["sets"]["cutmix"]["rows"] == 9 * 4


def test_online_cutmix_uses_each_mix_once_and_offline_reuses_its_own() -> None:
    train_eval = load_train_eval()
    n, cycles = 5, 3
    rng = np.random.default_rng(0)
    canvas = np.concatenate([rng.permutation(n) for _ in range(cycles)])
    rows = train_eval.MixRows(np.arange(n * cycles), canvas, torch.zeros(n * cycles, 2), *[torch.zeros(1)] * 4)
    data = train_eval.Data(None, ["a", "b"], np.arange(n), torch.zeros(n), np.arange(0), torch.zeros(0), {"m": rows})
    online = train_eval.mixed_table(train_eval.Arm("o", "", "m", online=True), data, epochs=cycles)
    assert online.shape == (cycles, n, 1) and sorted(online.ravel()) == list(range(n * cycles))
    assert (canvas[online[:, :, 0]] == np.arange(n)).all()  # epoch e, photo j: the mix of cycle e with canvas j
    offline = train_eval.mixed_table(train_eval.Arm("f", "", "m", per_photo=2), data, epochs=cycles)
    assert offline.shape == (1, n, 2) and offline.max() < 2 * n and (canvas[offline[0]] == np.arange(n)[:, None]).all()


def test_paired_differences_and_t_intervals() -> None:
    train_eval = load_train_eval()
    results = {
        "clean": {"seeds": [0, 1, 2], "top1": [0.80, 0.82, 0.81], "wall_s": [1, 1, 1]},
        "snapmix": {"seeds": [0, 1, 2], "top1": [0.83, 0.84, 0.84], "wall_s": [2, 2, 2]},
    }
    summary = train_eval.summarise(results)
    paired = summary["snapmix"]["vs_clean"]
    assert paired["per_seed"] == pytest.approx([0.03, 0.02, 0.03]) and paired["mean"] == pytest.approx(0.08 / 3)
    half = 4.303 * np.std([0.03, 0.02, 0.03], ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert paired["high"] - paired["mean"] == pytest.approx(half)
    assert "vs_online-cutmix" not in summary["snapmix"] and summary["clean"]["top1"]["n"] == 3
    assert train_eval.interval([0.5])["low"] is None


def test_cutmix_pixels_returns_the_donor_share_it_pasted() -> None:
    train_eval = load_train_eval()
    x, donors = torch.zeros(3, 3, 32, 32), torch.ones(3, 3, 32, 32)
    share = train_eval.cutmix_pixels(x, donors, np.array([0.3, 0.6, 0.9]), np.random.default_rng(1))
    assert torch.allclose(share, x.mean(dim=(1, 2, 3)))
