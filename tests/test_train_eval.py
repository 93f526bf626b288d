"""benchmarks/train_eval.py at a tiny size (a few photos, one epoch, the embedded Lite0), so that both
protocols' code runs in CI without the development set, a GPU or any download. The numbers it
prints are not checked: at this size they mean nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import load_benchmark

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TINY = ["--network", "lite0", "--size", "64", "--input", "56", "--cam-size", "64", "--epochs", "1", "--seeds", "1"]
TINY += ["--batch-size", "4", "--clean-epochs", "0", "--jobs", "1"]


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
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 10.0 12.0 40.0 30.0\n" for i, _, _, _ in rows))
    return root, tmp_path_factory.mktemp("work")


def check_record(record: dict, arms: list[str]) -> None:
    assert record["complete"] and list(record["arms"]) == arms
    for arm in arms:
        entry = record["arms"][arm]
        assert entry["seeds"] == [0] and len(entry["top1"]) == 1 and 0 <= entry["top1"][0] <= 1
        assert len(entry["hits"][0]) == 3 and np.mean(entry["hits"][0]) == pytest.approx(entry["top1"][0])
        assert entry["steps"] == 3  # 9 photos, batch 4, one epoch: the same budget for every arm
    assert set(record["summary"]) == set(arms)


@pytest.mark.slow
def test_cpu_protocol_at_a_tiny_size(tiny_cub) -> None:
    cub, work = tiny_cub
    train_eval = load_train_eval()
    out = work / "cpu.json"
    arms = ["clean", "online-cutmix", "cutmix", "snapmix", "snapmix-4"]  # every code path, one CAM run
    argv = [str(cub), "--json", str(out), "--workdir", str(work), "--arms", ",".join(arms), *TINY]
    train_eval.main(argv)
    record = json.loads(out.read_text())
    check_record(record, arms)
    sets = record["sets"]
    assert sets["cutmix"]["rows"] == 9 * 4 and sets["snapmix"]["rows"] == 9 * 16  # snapmix-4: its prefix
    assert sets["cutmix"]["cached_images"] == 36
    assert (record["caching"]["photos"], record["caching"]["test_photos"]) == (9, 3)
    # The same command again continues the experiment: nothing is trained twice, nothing cached twice.
    again = train_eval.main(argv)
    assert again["arms"] == record["arms"] and again["continues"] == [record["started"]]
    assert all(entry["cached_images"] == 0 for entry in again["sets"].values())
    vs_clean = record["summary"]["snapmix"]["vs_clean"]
    assert vs_clean["per_seed"] == [record["arms"]["snapmix"]["top1"][0] - record["arms"]["clean"]["top1"][0]]
    assert vs_clean["bootstrap"]["mean"] == pytest.approx(vs_clean["per_seed"][0])


@pytest.mark.slow
def test_label_rule_arms_and_a_merge_of_parallel_runs(tiny_cub) -> None:
    """Box labels (mixgen --label-weights boxes), the teacher's and the blend: the same images as
    the paper's rule, other weights; arms run in two processes are summarised together."""
    cub, work = tiny_cub
    train_eval = load_train_eval()
    common = [str(cub), "--workdir", str(work), *TINY]
    first, second = work / "rules-a.json", work / "rules-b.json"
    arms_a = ["clean", "snapmix", "snapmix-boxes", "snapmix-teacher"]
    arms_b = ["cutmix-boxes", "snapmix-teacher-relabel", "snapmix-blend", "snapmix-teacher-norm"]
    prepared = train_eval.main([*common, "--json", str(first), "--arms", ",".join(arms_a + arms_b), "--prepare-only"])
    assert prepared["sets"]["snapmix-boxes"]["same_images_as_snapmix"]
    assert prepared["sets"]["snapmix-teacher"]["same_images_as_snapmix"]  # mixgen --label-weights teacher
    record_a = train_eval.main([*common, "--json", str(first), "--arms", ",".join(arms_a)])
    record_b = train_eval.main([*common, "--json", str(second), "--arms", ",".join(arms_b)])
    check_record(record_a, arms_a)
    check_record(record_b, arms_b)
    merged = train_eval.merge([str(work / "rules.json"), str(first), str(second)])
    assert set(merged["arms"]) == set(arms_a + arms_b)
    assert "vs_snapmix" in merged["summary"]["snapmix-teacher"] and "vs_clean" in merged["summary"]["cutmix-boxes"]
    assert "vs_snapmix" in merged["summary"]["snapmix-teacher-relabel"]
    teacher = next(work.glob("snapmix-*-teacher224.pt"))
    rho_a, rho_b = torch.load(teacher, weights_only=True)
    assert ((rho_a >= 0) & (rho_a <= 1) & (rho_b >= 0) & (rho_b <= 1)).all()
    assert (rho_a + rho_b <= 2 + 1e-6).all() and rho_b.max() > 0


@pytest.mark.slow
def test_runs_in_two_processes_match_runs_in_one(tiny_cub) -> None:
    """--jobs 2 (the CPU default on two cores) trains each run in a process of its own: the same
    seeds give the same hits as one process running them in turn."""
    cub, work = tiny_cub
    train_eval = load_train_eval()
    argv = [str(cub), "--workdir", str(work), "--arms", "clean,online-cutmix,snapmix", *TINY, "--threads", "1"]
    one = train_eval.main([*argv, "--json", str(work / "jobs1.json")])
    two = train_eval.main([*argv, "--json", str(work / "jobs2.json"), "--jobs", "2"])
    assert two["jobs"] == 2 and two["threads_per_job"] == 1 and two["complete"]
    for arm in ("clean", "online-cutmix", "snapmix"):
        assert two["arms"][arm]["hits"] == one["arms"][arm]["hits"]
        assert two["arms"][arm]["top1"] == one["arms"][arm]["top1"]


@pytest.mark.slow
def test_the_script_runs_as_a_file_with_its_runs_in_processes(tiny_cub, tmp_path) -> None:
    """``python benchmarks/train_eval.py CUB --json F``, as the README writes it, from another
    folder: the script finds its package, and --jobs 2 spawns its workers from the file."""
    cub, work = tiny_cub
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_eval.py"
    out = tmp_path / "file.json"
    argv = [str(cub), "--json", str(out), "--workdir", str(work), "--arms", "clean,online-cutmix", *TINY]
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--jobs", "2", "--threads", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    check_record(record, ["clean", "online-cutmix"])
    assert record["jobs"] == 2


@pytest.mark.parametrize(
    "name",
    ["bench", "cam_variants", "control_search", "fidelity", "real_variants", "scale", "stage_costs", "torchrun_pair"],
)
@pytest.mark.slow
def test_every_benchmark_script_runs_as_a_file(name, tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr


def test_jobs_share_the_cores() -> None:
    train_eval = load_train_eval()
    cores = __import__("os").cpu_count() or 1
    default = train_eval.parse_args(["cub", "--json", "x.json"])
    assert (default.jobs, default.threads) == (cores, 1)
    single = train_eval.parse_args(["cub", "--json", "x.json", "--jobs", "1"])
    assert (single.jobs, single.threads) == (1, cores)
    assert train_eval.parse_args(["cub", "--json", "x.json", "--gpu", "--device", "cuda"]).jobs == 1


def test_the_norm_relabelling_keeps_the_lean_and_drops_the_mass() -> None:
    """``snapmix-teacher-norm``: each row's two weights scaled to sum to 1 (unmixed rows stay (1, 0);
    a same-label row's two halves sum to one label)."""
    train_eval = load_train_eval()
    arm = next(a for a in train_eval.ARMS if a.name == "snapmix-teacher-norm")
    rows = train_eval.MixRows(
        np.arange(3),
        ["a", "b", "c"],
        torch.zeros(3, 2),
        torch.tensor([0, 1, 0]),
        torch.tensor([1, 0, 0]),
        torch.tensor([0.3, 1.0, 0.2]),
        torch.tensor([0.1, 0.0, 0.2]),
    )
    sets = {"snapmix-teacher": rows}
    train_eval.relabel_sets(sets, {"snapmix-teacher": Path("unused")}, [arm], None, ["x", "y"], 224)
    normed = sets["snapmix-teacher+norm"]
    assert normed.weight_a.tolist() == pytest.approx([0.75, 1.0, 0.5])
    assert normed.weight_b.tolist() == pytest.approx([0.25, 0.0, 0.5])
    assert normed.dense.flatten().tolist() == pytest.approx([0.75, 0.25, 0.0, 1.0, 1.0, 0.0])
    assert normed.bank_rows is rows.bank_rows  # the same images


def test_compare_pairs_arms_of_two_experiments_on_the_same_test_photos(tmp_path) -> None:
    train_eval = load_train_eval()
    config = {"cub": "c", "size": 91, "input": 80, "test_per_class": 0, "quick": False, "crop_scale": 0.35}
    a = {
        "config": config,
        "arms": {"clean": {"seeds": [0, 1], "top1": [0.75, 0.5], "hits": [[1, 1, 1, 0], [1, 0, 1, 0]]}},
    }
    b = {"config": config | {"crop_scale": 1.0}, "arms": {"clean": {"seeds": [1, 2], "top1": [0.25, 0.5], "hits": []}}}
    b["arms"]["clean"]["hits"] = [[0, 0, 1, 0], [1, 1, 0, 0]]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    result = train_eval.compare([f"{tmp_path / 'a.json'}:clean", f"{tmp_path / 'b.json'}:clean"])
    assert result["seeds"] == [1] and result["a_minus_b"]["per_seed"] == [0.25]
    assert result["a_minus_b"]["bootstrap"]["mean"] == pytest.approx(0.25)
    assert result["settings_that_differ"] == {"crop_scale": [0.35, 1.0]}
    (tmp_path / "c.json").write_text(json.dumps(b | {"config": config | {"input": 96}}))
    with pytest.raises(SystemExit, match="input"):
        train_eval.compare([f"{tmp_path / 'a.json'}:clean", f"{tmp_path / 'c.json'}:clean"])


def test_runs_of_other_settings_are_not_merged(tmp_path) -> None:
    train_eval = load_train_eval()
    base = {"config": {"epochs": 60}, "arms": {}, "protocol": "cpu"}
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps({**base, "config": {"epochs": 30}}))
    with pytest.raises(SystemExit, match="epochs"):
        train_eval.merge([str(tmp_path / "m.json"), str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    # A record from before --layout trained contiguous tensors: it merges with --layout contiguous only.
    (tmp_path / "c.json").write_text(json.dumps({**base, "config": {"epochs": 60, "layout": "contiguous"}}))
    train_eval.merge([str(tmp_path / "m.json"), str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    (tmp_path / "d.json").write_text(json.dumps({**base, "config": {"epochs": 60, "layout": "channels_last"}}))
    with pytest.raises(SystemExit, match="layout"):
        train_eval.merge([str(tmp_path / "m.json"), str(tmp_path / "a.json"), str(tmp_path / "d.json")])


def test_gpu_protocol_runs_on_the_cpu_at_a_tiny_size(tiny_cub) -> None:
    cub, work = tiny_cub
    train_eval = load_train_eval()
    out = work / "gpu.json"
    arms = ["clean", "online-cutmix", "cutmix"]  # the whole network trained
    argv = [str(cub), "--json", str(out), "--workdir", str(work), "--gpu", "--device", "cpu", "--arms", ",".join(arms)]
    train_eval.main([*argv, *TINY, "--frozen-blocks", "0"])
    record = json.loads(out.read_text())
    check_record(record, arms)
    assert record["protocol"] == "gpu" and record["config"]["frozen_blocks"] == 0


def test_a_deadline_stops_before_a_run_that_would_end_after_it(tiny_cub) -> None:
    cub, work = tiny_cub
    train_eval = load_train_eval()
    out = work / "deadline.json"
    argv = [str(cub), "--json", str(out), "--workdir", str(work), "--arms", "clean", *TINY, "--seeds", "3"]
    record = train_eval.main([*argv, "--deadline", "0"])
    assert record["stopped_at_deadline"] and not record["complete"] and record["arms"]["clean"]["seeds"] == []


def test_only_the_lower_blocks_are_frozen() -> None:
    train_eval = load_train_eval()
    model = train_eval.Classifier(train_eval.load_network("lite0", None), 3, 0.0, frozen=5)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        name.startswith(("fixed.", "net._conv_stem", "net._bn0", "net._blocks.", "net._fc.")) for name in frozen
    )
    assert not any(name.startswith("net._blocks.5.") for name in frozen)
    assert all(p.requires_grad for p in model.net._blocks[5].parameters())
    model.train()
    assert not model.fixed.training and model.net._blocks[5].training  # frozen BatchNorm keeps its statistics
    before = model.net._blocks[0]._bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, model.net._blocks[0]._bn1.running_mean)


def test_paired_differences_t_intervals_and_the_photo_seed_bootstrap() -> None:
    train_eval = load_train_eval()
    rng = np.random.default_rng(0)
    clean = (rng.random((3, 200)) < 0.8).astype(int)
    better = np.maximum(clean, (rng.random((3, 200)) < 0.3).astype(int))  # never worse, often better
    results = {
        "clean": {"seeds": [0, 1, 2], "top1": clean.mean(1).tolist(), "hits": clean.tolist(), "wall_s": [1, 1, 1]},
        "snapmix": {"seeds": [0, 1, 2], "top1": better.mean(1).tolist(), "hits": better.tolist(), "wall_s": [2] * 3},
    }
    summary = train_eval.summarise(results)
    paired = summary["snapmix"]["vs_clean"]
    differences = better.mean(1) - clean.mean(1)
    assert paired["per_seed"] == pytest.approx(differences) and paired["mean"] == pytest.approx(differences.mean())
    half = 4.303 * np.std(differences, ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert paired["high"] - paired["mean"] == pytest.approx(half)
    boot = paired["bootstrap"]
    assert boot["mean"] == pytest.approx(differences.mean()) and 0 < boot["low"] < boot["mean"] < boot["high"]
    assert summary["clean"]["vs_snapmix"]["bootstrap"]["high"] < 0  # the same pairs, the other way round
    assert train_eval.interval([0.5])["low"] is None
    same = train_eval.paired_bootstrap(clean, clean)
    assert same["mean"] == same["low"] == same["high"] == 0


def test_cutmix_in_the_batch_labels_each_mix_by_the_pasted_share() -> None:
    train_eval = load_train_eval()
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    dense = torch.eye(4)
    mixed = np.array([True, True, False, True])
    out, target = train_eval.cutmix_batch(x, dense, mixed, 1.0, np.random.default_rng(1))
    assert torch.equal(out[2], x[2]) and torch.equal(target[2], dense[2])  # not mixed: untouched
    for i in np.flatnonzero(mixed):
        own = (out[i, 0] == i).float().mean()
        assert target[i, i] == pytest.approx(float(own)) and target[i].sum() == pytest.approx(1.0)
        donor = int(target[i].argmax()) if target[i, i] < 0.5 else None
        if donor is not None and donor != i:
            assert (out[i, 0] == donor).float().mean() == pytest.approx(float(target[i, donor]))
