"""The mix stage (``mixgen.pipeline.mixing``): a batch of planned outputs becomes its images and
their manifest rows, each row naming the sources, classes and weights of its own image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mixgen.config import RunConfig
from mixgen.methods import get_method
from mixgen.output.manifest import soft_targets
from mixgen.pipeline.mixing import MixContext, mix_batch
from mixgen.pipeline.plan import Pairing, plan_range
from mixgen.sources.index import Source, SourceIndex

SIZE = 16
# One flat colour per source, so that every output pixel tells which source it came from.
COLOURS = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0], [0, 250, 250], [250, 0, 250]], np.uint8)


@dataclass
class Views:
    """The view cache as mixing reads it: (B, S, S, 3) uint8 views by source position."""

    views: np.ndarray

    def read(self, positions):
        return self.views[positions]


@dataclass
class Prepared:
    views: Views
    maps: None
    readable: np.ndarray


def _context(tmp_path, method: str) -> MixContext:
    cfg = RunConfig(method=method, src=tmp_path, out=tmp_path / "out", size=SIZE, device="cpu")
    cfg.options, cfg.label_weights = get_method(method).defaults(), "area"
    items = [Source(f"c{i % 3}/s{i}.jpg", i % 3) for i in range(len(COLOURS))]
    index = SourceIndex(tmp_path, "imagefolder", ["c0", "c1", "c2"], items)
    views = np.broadcast_to(COLOURS[:, None, None, :], (len(COLOURS), SIZE, SIZE, 3)).copy()
    prepared = Prepared(Views(views), None, np.ones(len(COLOURS), bool))
    positions = np.array([5, 4, 3, 2, 1, 0])  # plan indices point into the readable positions
    return MixContext(cfg, index, positions, prepared, "cpu", lambda i: f"name-{i}")


def _mix(ctx: MixContext, start: int = 3, stop: int = 11):
    pairing = Pairing(np.array([ctx.index.items[p].label for p in ctx.positions]), "random")
    planned = plan_range(start, stop, 0, pairing, ctx.cfg.declaration.draw, SIZE, ctx.cfg.options)
    images, rows = mix_batch(ctx, planned)
    return planned, images.numpy(), rows


@pytest.mark.parametrize("method", ["cutmix", "mixup", "gridmix", "fmix", "resizemix"])
def test_each_row_describes_its_own_planned_output(tmp_path, method):
    ctx = _context(tmp_path, method)
    planned, images, rows = _mix(ctx)
    assert images.shape == (len(planned), 3, SIZE, SIZE) and images.dtype == np.uint8
    for p, row in zip(planned, rows, strict=True):
        a, b = ctx.index.items[ctx.positions[p.canvas]], ctx.index.items[ctx.positions[p.donor]]
        assert row["index"] == p.index and row["seed"] == p.seed
        assert row["file_name"] == f"name-{p.index}"
        assert (row["source_a"], row["source_b"]) == (a.path, b.path)
        assert (row["label_a"], row["label_b"]) == (a.label, b.label)
        assert (row["class_a"], row["class_b"]) == (f"c{a.label}", f"c{b.label}")
        assert row["method"] == method and row["label_weights"] == "area"
        assert row["width"] == row["height"] == SIZE
        assert row["weight_a"] + row["weight_b"] == pytest.approx(1.0, abs=1e-6)
        assert row["targets"] == soft_targets(a.label, b.label, row["weight_a"], row["weight_b"])
        assert 0.0 <= row["area_ratio"] <= 1.0


def test_cutmix_pastes_the_donor_inside_the_box_and_weighs_by_area(tmp_path):
    ctx = _context(tmp_path, "cutmix")
    planned, images, rows = _mix(ctx)
    for p, image, row in zip(planned, images, rows, strict=True):
        canvas, donor = COLOURS[ctx.positions[p.canvas]], COLOURS[ctx.positions[p.donor]]
        inside = np.zeros((SIZE, SIZE), bool)
        if row["box_a"] is not None:
            box = row["box_a"]
            inside[box["y0"] : box["y1"], box["x0"] : box["x1"]] = True
        pixels = image.transpose(1, 2, 0)
        assert (pixels[inside] == donor).all() and (pixels[~inside] == canvas).all()
        assert row["weight_b"] == pytest.approx(inside.mean(), abs=1e-6) == pytest.approx(row["area_ratio"])


def test_mixup_blends_every_pixel_by_lambda(tmp_path):
    ctx = _context(tmp_path, "mixup")
    planned, images, rows = _mix(ctx)
    for p, image, row in zip(planned, images, rows, strict=True):
        lam = row["lam"]
        canvas, donor = COLOURS[ctx.positions[p.canvas]], COLOURS[ctx.positions[p.donor]]
        expected = np.round(lam * canvas.astype(float) + (1 - lam) * donor.astype(float))
        assert np.abs(image.transpose(1, 2, 0) - expected).max() <= 1
        assert row["weight_a"] == pytest.approx(lam, abs=1e-6)


def test_a_batch_mixes_the_same_as_its_outputs_alone(tmp_path):
    ctx = _context(tmp_path, "gridmix")
    _, images, rows = _mix(ctx, 3, 11)
    _, one, one_row = _mix(ctx, 6, 7)
    np.testing.assert_array_equal(one[0], images[3])
    assert one_row[0] == rows[3]
