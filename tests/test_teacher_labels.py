"""--label-weights teacher: the run's own classifier (backbone and probe or checkpoint head) looks at
each mixed image, and each label weighs its posterior there: ρ_a = p(y_a | x), ρ_b = p(y_b | x)."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mixgen.methods import get_method
from mixgen.methods.labels import mix_with_label_weights, teacher_rule
from mixgen.output import manifest
from tests.conftest import SAMPLE, one_line, run_cli
from tests.methods.helpers import planned_batch
from tests.test_cache_checksums import flip_byte
from tests.test_resume import _fail_after, assert_same_run, record, snapshot

# SnapMix at 64 px (the CAM pass and the teacher at 64 px too), lossless: the decoded outputs are the
# images the teacher looked at. Two shards of 80 and 20 rows; mixing batches are 64 outputs.
TEACHER = ["--device", "cpu", "--size", "64", "--format", "png", "--shard-size", "80", "--label-weights", "teacher"]


def _rows(out: Path) -> list[dict]:
    paths = sorted(glob.glob(str(out / "data" / "*" / "metadata.parquet")))
    return [row for path in paths for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "out"
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 100, "--workers", 2)
    return out


def test_the_rule_on_synthetic_posteriors():
    posterior = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    label_a, label_b = torch.tensor([0, 2, 1, 0]), torch.tensor([1, 0, 1, 0])
    mixed = torch.tensor([True, True, True, False])
    same = label_a == label_b
    rho_a, rho_b = teacher_rule(posterior, label_a, label_b, mixed, same)
    # mixed, different labels: each label's posterior; same label: p(y) on both; nothing pasted: (1, 0)
    torch.testing.assert_close(rho_a, torch.tensor([0.7, 0.6, 0.25, 1.0]))
    torch.testing.assert_close(rho_b, torch.tensor([0.2, 0.1, 0.25, 0.0]))
    assert rho_a.dtype == rho_b.dtype == torch.float32


@pytest.mark.parametrize("name", ["cutmix", "snapmix", "mixup", "gridmix"])
def test_every_method_weighs_with_the_teachers_posterior_of_its_own_mixed_images(name):
    batch = planned_batch(name, seed=2, batch=6)
    batch.label_a, batch.label_b = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 1, 0, 2, 0, 1])
    batch.same_label = batch.label_a == batch.label_b
    seen = []

    def teacher(images):  # a posterior that depends on the pixels it is shown
        seen.append(images.clone())
        logits = images.float().mean(dim=(2, 3)) / 40
        return torch.softmax(logits, dim=1)

    result = mix_with_label_weights(get_method(name), batch, "teacher", teacher)
    plain = get_method(name).mix(batch)
    assert torch.equal(seen[0], plain.images)  # the teacher saw the images the method made
    posterior = teacher(plain.images)
    mixed = plain.mixed if plain.mixed is not None else plain.area_ratio > 0
    rows = torch.arange(6)
    expected_a = torch.where(mixed, posterior[rows, batch.label_a], 1.0)
    expected_b = torch.where(mixed, posterior[rows, batch.label_b], 0.0)
    torch.testing.assert_close(result.weight_a, expected_a)
    torch.testing.assert_close(result.weight_b, expected_b)
    with pytest.raises(ValueError, match="classifier"):
        mix_with_label_weights(get_method(name), batch, "teacher")
    assert "teacher" in get_method(name).label_weights
    assert get_method(name).label_weights[0] == ("semantic" if name == "snapmix" else "area")


@pytest.fixture(scope="module")
def refit(teacher_run):
    """The run's classifier made apart from the run: the probe fitted again from SRC (MapMaker, as
    ``mixgen cam`` fits it) on the run's recorded settings."""
    from mixgen.config import RunConfig
    from mixgen.output.reader import run_metadata
    from mixgen.pipeline.campass import MapMaker

    settings = RunConfig.from_settings(run_metadata(teacher_run)["config"], src=SAMPLE, out=teacher_run, device="cpu")
    settings.batch_size, settings.workers = 32, 0
    maker = MapMaker(settings.scan_sources(), settings)
    maker.close()
    return maker.campass


def _images(out: Path, rows: list[dict]) -> np.ndarray:
    """(N, S, S, 3) uint8: the PNG outputs of ``rows`` as written (lossless: what the teacher saw)."""
    return np.stack([np.asarray(Image.open(out / "data" / f"{r['index'] // 80:05d}" / r["file_name"])) for r in rows])


def test_weights_are_the_posterior_of_the_runs_classifier_on_each_decoded_output(teacher_run, refit):
    out = teacher_run
    rows = _rows(out)
    assert {row["label_weights"] for row in rows} == {"teacher"} and len(rows) == 100
    fmap = refit.features(_images(out, rows))
    posterior = torch.softmax(refit.head.logits(fmap.mean(dim=(2, 3))), dim=1).numpy()
    label_a, label_b = (np.array([r[k] for r in rows]) for k in ("label_a", "label_b"))
    mixed = np.array([r["box_a"] is not None for r in rows])
    expected_a = np.where(mixed, posterior[np.arange(100), label_a], 1.0)
    expected_b = np.where(mixed, posterior[np.arange(100), label_b], 0.0)
    assert np.abs(np.array([r["weight_a"] for r in rows]) - expected_a).max() < 1e-4
    assert np.abs(np.array([r["weight_b"] for r in rows]) - expected_b).max() < 1e-4
    same = label_a == label_b
    assert same.any() and all(r["weight_a"] == r["weight_b"] for r, s in zip(rows, same, strict=True) if s)

    rec = record(out)
    teacher = rec["teacher"]
    assert teacher["backbone"] == rec["backbone"] and teacher["cam_size"] == 64 and teacher["classes"] == 5
    assert teacher["head_sha256"] == refit.head.digest()  # the head the run recorded is the probe's
    assert rec["timings"]["teacher_s"] > 0
    meta = json.loads(pq.read_schema(out / "data" / "00000" / "metadata.parquet").metadata[b"mixgen"])
    assert meta["teacher"] == teacher and meta["same_label_weights"] == "posterior"
    [head] = (out / ".mixgen").glob("head-*.npy")  # kept beside the maps, with its checksums
    assert head.with_name(head.name + ".crc32").is_file()


def test_posteriors_do_not_depend_on_the_batch_they_are_in(teacher_run, refit):
    """Every row alone, in any batch: the same floats (what makes reruns, resumes from mid-shard and
    verify --recompute byte-identical)."""
    images = torch.from_numpy(_images(teacher_run, _rows(teacher_run)[:6])).permute(0, 3, 1, 2)
    whole = refit.posterior(images)
    for i in (0, 3, 5):
        assert torch.equal(refit.posterior(images[i : i + 1]), whole[i : i + 1])
    assert torch.equal(refit.posterior(images[2:5]), whole[2:5])
    assert torch.equal(refit.posterior(images.flip(0)), whole.flip(0))


def test_preview_and_stats_read_a_teacher_run(tmp_path, teacher_run):
    from mixgen.commands.preview import legend, make_preview

    stats = json.loads(run_cli("stats", teacher_run, "--json").output)
    gap = stats["semantic_vs_area"]
    assert gap["label_weights"] == ["teacher"] and gap["rows"] > 0
    assert "teacher weights vs the area rule" in run_cli("stats", teacher_run).output
    sheet = tmp_path / "sheet.png"
    shown = make_preview(teacher_run, sheet, count=3, device="cpu")
    assert shown["rows"] == 3 and shown["maps"] and not shown["notes"] and Image.open(sheet).size[0] > 0
    assert "teacher's posterior" in legend(record(teacher_run)["config"])


@pytest.mark.slow
def test_rerun_grow_from_mid_shard_and_resume_after_a_cut_write_the_same_bytes(tmp_path, monkeypatch, teacher_run):
    """A fresh run of the first 70 outputs (other --workers and --batch-size) is byte for byte the
    reference's; growing it to 100 redoes shard 0 from output 64 (the last whole mixing batch: rows
    64-69 now share their batch with 70-79) and is cut before its second shard's manifest; the same
    command then resumes from the maps and head the caches kept."""
    out = tmp_path / "out"
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 70, "--workers", 1, "--batch-size", 7)
    reference = {row["index"]: row for row in _rows(teacher_run)}
    assert _rows(out) == [reference[i] for i in range(70)]
    images = snapshot(out)
    assert all(images[name] == snapshot(teacher_run)[name] for name in images if name.endswith(".png"))

    wrapper, state = _fail_after(1, KeyboardInterrupt(), manifest.write_shard)
    monkeypatch.setattr(manifest, "write_shard", wrapper)
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 100, "--workers", 2, expect=130)
    assert state["raised"] == 1 and record(out)["status"] == "interrupted"
    monkeypatch.undo()
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 100, "--workers", 2)
    rec = record(out)
    assert rec["counts"]["kept_from_previous_run"] == 80 and rec["counts"]["backbone_sources"] == 0
    assert rec["cache_rebuilt"] == [] and rec["teacher"] == record(teacher_run)["teacher"]
    assert_same_run(out, teacher_run)


@pytest.mark.slow
def test_verify_recompute_passes_on_a_teacher_run(teacher_run):
    report = json.loads(run_cli("verify", teacher_run, "--recompute", "all", "--json").output)
    assert report["ok"] and report["recomputed"]["rows"] == 100 and report["recomputed"]["batches"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_missing_or_damaged_head_is_rebuilt_with_its_maps(tmp_path, teacher_run, damage):
    out = tmp_path / "out"
    shutil.copytree(teacher_run, out)
    [head] = (out / ".mixgen").glob("head-*.npy")
    if damage == "missing":
        head.unlink()  # a maps cache of a mixgen before the teacher: no head
    else:
        flip_byte(head, -3)  # a weight of its last row
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 120, "--workers", 2)  # a grow prepares the sources
    rec = record(out)
    assert len(rec["cache_rebuilt"]) == 1 and head.name in rec["cache_rebuilt"][0], rec["cache_rebuilt"]
    assert ("missing" if damage == "missing" else "1 of 5 records") in rec["cache_rebuilt"][0]
    assert rec["counts"]["backbone_sources"] == 20 and head.is_file()
    assert rec["teacher"]["head_sha256"] == record(teacher_run)["teacher"]["head_sha256"]  # the same fit
    assert {row["index"]: row for row in _rows(out)}[99] == _rows(teacher_run)[99]


@pytest.mark.slow
def test_workers_by_hand_take_the_head_from_the_cache_file(tmp_path, monkeypatch, teacher_run):
    """--num-shards workers sharing OUT: the second finds the maps and the head cached by the first
    (its CAM pass fits nothing) and weighs with the same head."""
    out = tmp_path / "out"
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 100, "--num-shards", 2, "--shard-index", 0)
    assert record(out, "mixgen.worker-0-of-2.json")["counts"]["backbone_sources"] == 20
    run_cli("snapmix", SAMPLE, out, *TEACHER, "--pairs", 100, "--num-shards", 2, "--shard-index", 1)
    second = record(out, "mixgen.worker-1-of-2.json")
    assert second["counts"]["backbone_sources"] == 0 and second["probe"]["train_accuracy"] is not None
    assert second["teacher"] == record(teacher_run)["teacher"] and record(out)["status"] == "complete"
    assert_same_run(out, teacher_run)


@pytest.mark.slow
def test_two_torchrun_machines_share_the_probe_head_and_write_what_one_process_writes(tmp_path):
    """Under torchrun rank 0 fits the probe and broadcasts its head: each machine's cache folder gets
    it beside the maps, every rank's teacher weighs with it."""
    from tests.test_torchrun import SNAP, agents

    args = [*SNAP, "--label-weights", "teacher", "--workers", "1"]
    single = tmp_path / "single"
    run_cli("snapmix", SAMPLE, single, *args)
    out = tmp_path / "out"
    commands = [
        ["snapmix", str(SAMPLE), str(out), *args, "--cache-dir", str(tmp_path / f"local-{node}")] for node in range(2)
    ]
    results = agents(tmp_path, commands)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:] + results[1].stdout[-3000:]
    workers = [record(out, f"mixgen.worker-{i}-of-2.json") for i in range(2)]
    assert sum(w["counts"]["backbone_sources"] for w in workers) == 20  # each source through the backbone once
    assert all(w["teacher"] == record(single)["teacher"] for w in workers)
    for node in range(2):
        assert len(list((tmp_path / f"local-{node}").glob("head-*.npy"))) == 1
    assert_same_run(out, single)


@pytest.mark.slow
def test_a_checkpoints_classifier_is_the_teacher_and_another_head_is_another_run(tmp_path):
    import timm

    from mixgen.cam.cams import LinearHead

    torch.manual_seed(0)
    weights = timm.create_model("tf_efficientnet_lite0", num_classes=5).state_dict()
    checkpoint = tmp_path / "fine-tuned.pt"
    torch.save(weights, checkpoint)
    out = tmp_path / "out"
    args = ["cutmix", SAMPLE, out, *TEACHER, "--pairs", 20, "--checkpoint", checkpoint]
    run_cli(*args)
    rec = record(out)
    head = LinearHead(weights["classifier.weight"], weights["classifier.bias"]).digest()
    assert rec["config"]["cam"] == "checkpoint" and rec["teacher"]["head"] == rec["teacher"]["head_sha256"] == head
    assert not list((out / ".mixgen").glob("head-*"))  # a fixed head: nothing fitted, nothing cached
    weights["classifier.bias"] = weights["classifier.bias"] + 1
    torch.save(weights, checkpoint)
    line = one_line(run_cli(*args, expect=1).output)
    assert "the teacher's head changed" in line and "holds a different mixgen run" in line


def test_cams_without_a_head_over_srcs_classes_are_refused_in_one_line(tmp_path):
    for args, said in [
        (["snapmix", "--cam", "mean"], "and --cam mean has none"),
        (["cutmix", "--cam", "imagenet"], "and --cam imagenet has none"),
        (["attentive"], "attentive's default --cam mean has none"),
    ]:
        result = run_cli(args[0], SAMPLE, tmp_path / "out", *args[1:], "--label-weights", "teacher", expect=2)
        line = one_line(result.output)
        assert "--label-weights teacher needs a classifier over SRC's classes" in line and said in line
        assert "--cam probe" in line and "--checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_dry_run_states_the_teachers_cost(tmp_path):
    args = ["cutmix", SAMPLE, tmp_path / "out", "--pairs", 500, "--size", 64, "--label-weights", "teacher"]
    text = run_cli(*args, "--dry-run").output
    assert "teacher labels: one backbone pass per output at 64 px on the mixed image (500 passes" in text
    found = json.loads(run_cli(*args, "--dry-run", "--json").output)["estimate"]
    assert found["teacher"]["backbone_passes"] == 500 and found["teacher"]["cam_size"] == 64
    plain = json.loads(run_cli(*args[:-2], "--dry-run", "--json").output)["estimate"]
    assert "teacher" not in plain and found["seconds"] > plain["seconds"]
    assert not (tmp_path / "out").exists()


def test_the_teachers_run_mixes_the_images_of_the_papers_rule(tmp_path, teacher_run):
    """Only the weights differ: the teacher's backbone call changes torch's process-wide thread count,
    at which a bilinear paste rounds differently, so a teacher run mixes off the pool (stop 37 found
    1.5 % of 12,000 SnapMix images 1 level off when it mixed on the pool beside the teacher)."""
    paper = tmp_path / "paper"
    settings = [a for a in TEACHER if a not in ("--label-weights", "teacher")]
    run_cli("snapmix", SAMPLE, paper, *settings, "--pairs", 100, "--workers", 2)
    ours, theirs = _rows(teacher_run), _rows(paper)
    assert [r["sha256"] for r in ours] == [r["sha256"] for r in theirs]
    assert [r["label_weights"] for r in ours[:1] + theirs[:1]] == ["teacher", "semantic"]


def test_a_teacher_run_mixes_no_batch_beside_the_teachers_backbone_call(tmp_path, monkeypatch):
    """The race above, seen directly: every batch of a teacher run is mixed on the main thread (a pool
    thread would mix while the teacher holds torch at the backbone's thread count)."""
    import threading

    from mixgen.pipeline import run as pipeline

    threads: list[str] = []
    real = pipeline.mix_batch

    def spying(ctx, planned):
        threads.append(threading.current_thread().name)
        return real(ctx, planned)

    monkeypatch.setattr(pipeline, "mix_batch", spying)
    run_cli("snapmix", SAMPLE, tmp_path / "out", *TEACHER, "--pairs", 70, "--workers", 2)
    assert threads and set(threads) == {threading.main_thread().name}
