"""A SRC that lists more than it holds (issue 31, items 1-3): a CUB folder whose images.txt lists 40
photos of 8 species, of which 10 photos of 3 species are there. The caches hold the 10 found, the
summary and the dry run say first which share is missing and which classes have none, the probe
reports a held-out accuracy over the classes present, ids stay those of classes.txt, and the run
resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixgen.output.manifest import metadata_of, read_manifest
from mixgen.sources.scan import scan
from tests.conftest import SAMPLE, run_cli
from tests.test_resume import snapshot

SIZE = 64
SNAP = ["--device", "cpu", "--size", str(SIZE), "--pairs", "30", "--shard-size", "10"]
SPECIES = ["cat", "rocket", "astronaut", "coffee", "flower", "ibis", "jay", "kite"]
FOUND = {"cat": 4, "rocket": 4, "astronaut": 2}  # photos of each species that are there
SHARE = "30 of 40 listed photos (75 %) are missing; 5 of 8 classes have none"


def make_partial_cub(root: Path) -> Path:
    """images.txt lists 5 train photos of each of 8 species; 10 photos of the first 3 are there."""
    rows = []
    for label, name in enumerate(SPECIES, start=1):
        folder = root / "images" / f"{label:03d}.{name}"
        folder.mkdir(parents=True)
        for k in range(5):
            rel = f"{label:03d}.{name}/{name}_{k}.jpg"
            if k < FOUND.get(name, 0):
                shutil.copy(SAMPLE / name / f"{name}_{k}.jpg", root / "images" / rel)
            rows.append((len(rows) + 1, rel, label))
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i, _, _ in rows))
    (root / "classes.txt").write_text("".join(f"{k} {k:03d}.{name}\n" for k, name in enumerate(SPECIES, start=1)))
    return root


@pytest.fixture(scope="module")
def partial_cub(tmp_path_factory) -> Path:
    return make_partial_cub(tmp_path_factory.mktemp("partial") / "CUB_200_2011")


@pytest.fixture(scope="module")
def partial_run(partial_cub, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("partial-run") / "out"
    result = run_cli("snapmix", partial_cub, out, *SNAP)
    return out, result.output


def words(text: str) -> str:
    return " ".join(text.split())


def test_missing_listed_photos_are_no_sources(partial_cub):
    """A photo images.txt lists that is not there is refused at the scan, naming its line: it
    gets no place in the index (so none in any cache); ids stay those of classes.txt."""
    from mixgen.sources.index import shortfall

    index = scan(partial_cub)
    assert index.classes == [f"{k:03d}.{name}" for k, name in enumerate(SPECIES, start=1)]
    assert len(index) == 10 and len(index.rejected) == 30
    assert sorted({item.label for item in index.items}) == [0, 1, 2]
    assert {
        "path": "images/008.kite/kite_4.jpg",
        "reason": "images/008.kite/kite_4.jpg: file not found (images.txt line 40)",
    } in index.rejected
    assert shortfall(index).startswith(f"{SHARE}: the run uses the 10 usable photos; check that SRC/images")


def test_a_cutmix_run_caches_the_photos_found_and_says_the_share_first(partial_cub, tmp_path):
    """The quick form of the two tests below (no backbone): 10 view slots, the share said first."""
    out = tmp_path / "out"
    summary = words(run_cli("cutmix", partial_cub, out, "--device", "cpu", "--size", "32", "--pairs", "12").output)
    [views] = (out / ".mixgen").glob("views-*.u8")
    assert views.stat().st_size == 10 * 32 * 32 * 3
    assert summary.index(f"warning {SHARE}") < summary.index("outputs written")


@pytest.mark.slow
def test_the_caches_hold_the_photos_found(partial_run):
    out, _ = partial_run
    [views] = (out / ".mixgen").glob("views-*.u8")
    assert views.stat().st_size == 10 * SIZE * SIZE * 3  # 10 slots, not 40
    [maps] = (out / ".mixgen").glob("maps-*.npy")
    assert np.load(maps).shape[0] == 10
    assert len(np.load(out / ".mixgen" / "sources.npy")) == 10


@pytest.mark.slow
def test_the_summary_says_first_what_share_is_missing(partial_run):
    out, output = partial_run
    summary = words(output)
    assert summary.index(f"warning {SHARE}") < summary.index("outputs written")
    assert "drop the missing ones' lines from images.txt" in summary
    record = json.loads((out / "mixgen.json").read_text())
    assert record["shortfall"].startswith(SHARE)
    assert record["counts"]["readable_sources"] == 10 and record["counts"]["skipped_sources"] == 30
    assert len(record["skipped"]) == 30


@pytest.mark.slow
def test_the_probe_reports_a_held_out_accuracy_over_the_classes_present(partial_run):
    out, output = partial_run
    probe = json.loads((out / "mixgen.json").read_text())["probe"]
    assert probe["holdout_accuracy"] is not None and 0 <= probe["holdout_accuracy"] <= 1
    assert probe["classes"] == 3 and probe["classes_empty"] == 5
    assert "held-out" in output and "over the 3 classes with photos; 5 have none" in words(output)


@pytest.mark.slow
def test_the_manifest_keeps_every_class_and_the_ids_of_classes_txt(partial_run):
    out, _ = partial_run
    table = read_manifest(out)
    assert metadata_of(table.schema)["classes"] == [f"{k:03d}.{name}" for k, name in enumerate(SPECIES, start=1)]
    labels = set(table.column("label_a").to_pylist()) | set(table.column("label_b").to_pylist())
    assert labels <= {0, 1, 2}
    names = {(row["label_a"], row["class_a"]) for row in table.select(["label_a", "class_a"]).to_pylist()}
    assert names <= {(0, "001.cat"), (1, "002.rocket"), (2, "003.astronaut")}


def test_the_dry_run_says_the_share_and_counts_the_cache_of_the_photos_found(partial_cub, tmp_path):
    out = tmp_path / "out"
    lines = run_cli("snapmix", partial_cub, out, *SNAP, "--dry-run").output.splitlines()
    assert lines[1].startswith(f"warning: {SHARE}: ")
    assert lines[-1].endswith(f"; view cache: {10 * SIZE * SIZE * 3 / 1000:.1f} kB for the 10 sources found")
    summary = json.loads(run_cli("snapmix", partial_cub, out, *SNAP, "--dry-run", "--json").output)
    assert summary["estimate"]["cache_bytes"] == 10 * SIZE * SIZE * 3
    assert summary["shortfall"].startswith(SHARE) and not out.exists()


@pytest.mark.slow
def test_a_run_on_a_partial_folder_resumes_to_the_same_bytes(partial_cub, partial_run, tmp_path):
    reference, _ = partial_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "data" / "00001")
    run_cli("snapmix", partial_cub, out, *SNAP)
    record = json.loads((out / "mixgen.json").read_text())
    assert record["counts"]["kept_from_previous_run"] == 20 and record["counts"]["written"] == 10
    assert snapshot(out) == snapshot(reference)
    again = run_cli("snapmix", partial_cub, out, *SNAP)
    assert "already complete" in again.output
    run_cli("verify", out, "--recompute", "4")


def test_strict_refuses_a_missing_photo_in_one_line(partial_cub, tmp_path):
    result = run_cli("cutmix", partial_cub, tmp_path / "out", "--size", "32", "--pairs", "4", "--strict", expect=1)
    line = words(result.output)
    assert line.startswith("mixgen: error: missing source images/001.cat/cat_4.jpg: file not found (images.txt line 5)")
    assert "(--strict; 30 unusable in all); restore it, or drop its line from images.txt" in line
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_complete_folder_or_a_small_share_says_nothing(tmp_path):
    from mixgen.sources.index import shortfall
    from tests.test_sources import make_cub

    cub = make_cub(tmp_path / "cub")
    assert shortfall(scan(cub)) is None
    (cub / "images" / "002.Bunting" / "b1.jpg").unlink()  # the only train photo of class 2
    assert shortfall(scan(cub)) == (
        "1 of 2 listed photos (50 %) are missing; 1 of 2 classes has none: the run uses the one usable photo; "
        "check that SRC/images holds every photo images.txt lists for the split, or drop the missing ones' lines "
        "from images.txt (class ids stay those of classes.txt)"
    )


def test_an_imagefolder_with_unreadable_photos_or_an_empty_class_is_said_in_words(sample_copy):
    """The same words for an ImageFolder: unreadable photos over 5 % (known once decoded), or a class
    folder with no photo."""
    from mixgen.sources.index import shortfall

    index = scan(sample_copy)
    readable = [True] * 20
    assert shortfall(index, readable) is None
    readable[0] = False  # 1 of 20 (5 %): not over the threshold, and astronaut keeps 3 photos
    assert shortfall(index, readable) is None
    readable[1] = readable[2] = readable[3] = False  # no astronaut photo can be read
    assert shortfall(index, readable).startswith(
        "4 of 20 photos (20 %) cannot be read; 1 of 5 classes has none: the run uses the 16 usable photos; "
        "check that SRC is complete (what could not be read is listed in mixgen.json)"
    )
    (sample_copy / "zebra").mkdir()
    assert shortfall(scan(sample_copy)).startswith("1 of 6 classes has no readable photo: the run uses the 20 usable")
