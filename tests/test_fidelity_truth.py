"""The label-fidelity benchmark's truth computation on hand-made masks (no accuracy thresholds:
these check the arithmetic of the true shares, not how good mixgen's labels are)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def fid():
    return load_benchmark("fidelity")


def rect(size: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((size, size))
    mask[y0:y1, x0:x1] = 1.0
    return mask


def box(x0: int, y0: int, x1: int, y1: int) -> dict[str, int]:
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1}


def test_box_shares_full_disjoint_and_half(fid) -> None:
    obj = rect(32, 8, 8, 16, 16)
    assert fid.share_inside(obj, fid.box_indicator(box(4, 4, 20, 20), 32)) == 1.0
    assert fid.share_inside(obj, fid.box_indicator(box(20, 20, 32, 32), 32)) == 0.0
    assert fid.share_inside(obj, fid.box_indicator(box(0, 0, 12, 32), 32)) == pytest.approx(0.5)


def test_snapmix_row_truth_uses_box_a_in_the_canvas_and_box_b_in_the_donor(fid) -> None:
    size = 32
    mask_a = rect(size, 0, 0, 8, 8)  # half covered by box_a
    mask_b = rect(size, 20, 20, 28, 28)  # inside box_b
    row = {"method": "snapmix", "box_a": box(4, 0, 12, 8), "box_b": box(16, 16, 32, 32), "cells": None, "mask": None}
    t_a, t_b = fid.true_shares(fid.row_geometry(row, size), mask_a, mask_b)
    assert (t_a, t_b) == (pytest.approx(0.5), pytest.approx(1.0))
    assert fid.donor_share(t_a, t_b) == pytest.approx(2 / 3)


def test_resizemix_whole_donor_view_arrives(fid) -> None:
    size = 16
    row = {"method": "resizemix", "box_a": box(0, 0, 8, 8), "box_b": box(0, 0, size, size)}
    t_a, t_b = fid.true_shares(fid.row_geometry(row, size), rect(size, 8, 8, 16, 16), rect(size, 3, 3, 9, 9))
    assert (t_a, t_b) == (1.0, 1.0)


def test_cells_follow_mixgens_grid_edges(fid) -> None:
    size, grid = 10, 3  # edges 0, 3, 6, 10: uneven cells
    cells = fid.cells_indicator([0, 8], grid, size)
    assert cells[:3, :3].all() and cells[6:, 6:].all() and cells.sum() == 9 + 16
    row = {"method": "gridmix", "box_a": None, "box_b": None, "cells": [8], "mask": None}
    geometry = fid.row_geometry(row, size, grid)
    t_a, t_b = fid.true_shares(geometry, rect(size, 6, 6, 10, 10), rect(size, 0, 0, 6, 6))
    assert (t_a, t_b) == (0.0, 0.0)
    assert np.isnan(fid.donor_share(t_a, t_b))


def test_fmix_run_lengths_start_with_canvas_pixels(fid) -> None:
    size = 4
    donor = fid.runs_indicator([0, 8, 8], size)  # top half donor
    assert donor[:2].all() and not donor[2:].any()
    row = {"method": "fmix", "box_a": None, "box_b": None, "cells": None, "mask": [2, 8, 6]}
    geometry = fid.row_geometry(row, size)
    assert geometry.canvas.sum() == 8 and geometry.canvas.flat[2:10].all()
    with pytest.raises(ValueError):
        fid.runs_indicator([3, 3], size)


def test_rows_without_paste_keep_the_canvas_and_mixup_has_no_geometry(fid) -> None:
    size = 8
    empty = fid.row_geometry({"method": "snapmix", "box_a": None, "box_b": None, "cells": None}, size)
    assert fid.true_shares(empty, rect(size, 0, 0, 4, 4), rect(size, 0, 0, 4, 4)) == (1.0, 0.0)
    assert fid.row_geometry({"method": "mixup", "box_a": None, "box_b": None, "cells": None}, size) is None


def test_view_mask_follows_the_view_crop(fid) -> None:
    """A mask on a 2:1 source: the centre-square crop keeps its middle, like mixgen's views."""
    alpha = np.zeros((20, 40), dtype=np.uint8)
    alpha[:, :10] = 255  # left quarter, cropped away
    alpha[5:15, 15:25] = 255  # centre square, kept
    view = fid.view_mask(alpha, 20, "crop")
    assert view[:, :2].max() < 0.5 and view[8:12, 8:12].min() == pytest.approx(1.0)
    assert fid.view_mask(alpha, 20, "squash")[:, :4].min() == pytest.approx(1.0)


def test_pointing_game(fid) -> None:
    mask = rect(10, 0, 0, 5, 10)  # half the view
    spm = np.zeros((10, 10))
    spm[2, 2] = 1.0
    assert fid.pointing(spm, mask) == (True, pytest.approx(2.0))
    uniform = np.full((10, 10), 0.01)
    assert fid.pointing(uniform, mask)[1] == pytest.approx(1.0)


def test_score_rows_against_hand_made_masks(fid) -> None:
    size = 16
    masks = {"a.png": (rect(size, 0, 0, 8, 16) * 255).astype(np.uint8), "b.png": np.full((size, size), 255, np.uint8)}
    row = {
        "method": "cutmix",
        "source_a": "a.png",
        "source_b": "b.png",
        "label_a": 0,
        "label_b": 1,
        "box_a": box(0, 0, 8, 16),
        "box_b": box(0, 0, 8, 16),
        "cells": None,
        "mask": None,
        "weight_a": 0.5,
        "weight_b": 0.5,
        "area_ratio": 0.5,
    }
    same = {**row, "label_b": 0}
    scores = fid.score_rows([row, same], masks, size, "crop", None)
    # Object a entirely covered, half of b arrives: the truth is all donor; 0.5 is off by 0.5 and
    # the dominant label is a tie, counted as the canvas's, so wrong.
    assert scores["rows"] == 1 and scores["mae"] == pytest.approx(0.5) and scores["wrong"] == 1.0
    assert scores["area_mae"] == pytest.approx(0.5)


def test_box_alpha_covers_fractional_edges(fid) -> None:
    alpha = fid.box_alpha([1.5, 0.0, 3.0, 2.0], width=4, height=3)
    assert alpha.shape == (3, 4)
    assert alpha[0].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.0]) and not alpha[2].any()
    assert alpha.sum() == pytest.approx(1.5 * 2)


def test_a_box_goes_through_the_view_crop_and_squash(fid) -> None:
    """A box on a 2:1 photo: crop keeps the centre square, so a box in the left quarter vanishes and
    a box across the centre keeps only its middle; squash keeps every box, narrowed by half."""
    width, height, size = 40, 20, 20
    left = fid.box_alpha([0, 0, 10, 20], width, height)
    assert fid.view_mask(left, size, "crop").sum() == pytest.approx(0.0, abs=1e-6)
    squashed = fid.view_mask(left, size, "squash")
    assert squashed[:, :4].min() == pytest.approx(1.0) and squashed.sum() == pytest.approx(size * size / 4, rel=0.03)
    across = fid.view_mask(fid.box_alpha([0, 5, 40, 15], width, height), size, "crop")
    assert across[6:14].min() == pytest.approx(1.0) and across.sum() == pytest.approx(size * 10, rel=0.05)


def test_truth_of_a_real_row_from_boxes_on_disk(fid, tmp_path) -> None:
    """boxes.json keyed by the CUB images.txt path, looked up by the manifest's ``images/…`` path:
    the canvas's bird half covered, all of the donor's bird arriving -> donor share 2/3; the area
    rule's 1/2 is off by 1/6 and names the wrong dominant label."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "images" / "001.x").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / "001.x" / f"{name}.jpg")
    boxes = {"001.x/a.jpg": [0, 0, 16, 32], "001.x/b.jpg": [16, 0, 32, 32]}
    (tmp_path / "boxes.json").write_text(__import__("json").dumps(boxes))
    regions = fid.RealRegions(tmp_path)
    assert regions["images/001.x/a.jpg"].sum() == pytest.approx(16 * 32)
    row = {
        "method": "cutmix",
        "source_a": "images/001.x/a.jpg",
        "source_b": "images/001.x/b.jpg",
        "label_a": 0,
        "label_b": 1,
        "box_a": box(8, 0, 24, 32),
        "box_b": box(8, 0, 24, 32),
        "cells": None,
        "mask": None,
        "weight_a": 0.5,
        "weight_b": 0.5,
        "area_ratio": 0.5,
    }
    shares = fid.row_shares([row], regions, 32, "crop", None)
    assert shares["truth"][0] == pytest.approx(0.5 / (0.5 + 0.5))
    row_b = {**row, "box_a": box(8, 0, 24, 32), "box_b": box(16, 0, 32, 32)}
    row_b["method"] = "snapmix"
    assert fid.row_shares([row_b], regions, 32, "crop", None)["truth"][0] == pytest.approx(1 / 1.5)
    scores = fid.score_rows([row_b], regions, 32, "crop", None)
    assert scores["area_mae"] == pytest.approx(1 / 1.5 - 0.5) and scores["area_wrong"] == 1.0


def test_masks_folder_and_missing_regions(fid, tmp_path) -> None:
    from PIL import Image

    (tmp_path / "masks" / "cat").mkdir(parents=True)
    Image.fromarray(np.full((4, 6), 255, np.uint8)).save(tmp_path / "masks" / "cat" / "x.png")
    assert fid.RealRegions(tmp_path)["cat/x.jpg"].shape == (4, 6)
    with pytest.raises(SystemExit, match="no object regions"):
        fid.RealRegions(tmp_path / "cat")


def test_judges_count_decisive_rows_and_oracle_disagreement(fid) -> None:
    truth = np.array([0.1, 0.9, 0.5, 0.6, np.nan])
    predicted = np.array([0.6, 0.95, 0.7, 0.4, 0.5])
    area = np.full(5, 0.3)
    oracle = np.array([0.2, 0.8, 0.9, 0.9, 0.5])
    a, b = np.array([0, 1, 2, 3, 0]), np.array([1, 2, 3, 0, 2])
    out = fid.judge_rows(predicted, area, truth, a, b, 4, oracle)
    assert out["rows"] == 4 and out["decisive_rows"] == 2
    assert out["mae"] == pytest.approx(np.mean([0.5, 0.05, 0.2, 0.2]))
    assert out["wrong"] == pytest.approx(2 / 3)  # the tie at 0.5 does not count
    assert out["decisive_wrong"] == pytest.approx(0.5) and out["area_decisive_wrong"] == pytest.approx(0.5)
    assert out["oracle_disagree"] == pytest.approx(2 / 5) and out["area_oracle_disagree"] == pytest.approx(3 / 5)
    low, high = out["mae_ci"]
    assert low <= out["mae"] <= high


def test_the_target_bound_holds_for_every_labelling_and_is_reached() -> None:
    """real_variants' bound on the rows both judges reject, checked against every labelling of a
    small set: no labelling meeting the target has as many, and one with one fewer meets it."""
    import itertools

    rv = load_benchmark("real_variants")
    truth_side = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1], dtype=bool)
    oracle_side = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0], dtype=bool)

    def per_row(label: np.ndarray) -> dict[str, np.ndarray]:
        wrong = np.append((label != truth_side).astype(float), np.nan)  # a tie row: no side by the truth
        return {"wrong": wrong, "oracle_disagree": np.append((label != oracle_side).astype(float), 1.0)}

    reference = per_row(np.array([0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=bool))
    both, split, allowed = rv.target_bound(reference)
    assert (both, split) == (3, 5)
    base_wrong, base_disagree = 5, 6
    assert allowed == (0.8 * base_wrong + base_disagree - split) / 2
    reachable = []
    for bits in itertools.product((False, True), repeat=len(truth_side)):
        rows = per_row(np.array(bits))
        rejected = rv.judges_split(rows)[0].sum()
        meets = np.nansum(rows["wrong"]) <= 0.8 * base_wrong and rows["oracle_disagree"][:-1].sum() < base_disagree
        if meets:
            assert rejected < allowed
            reachable.append(rejected)
    assert max(reachable) == int(np.ceil(allowed)) - 1
