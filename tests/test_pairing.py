"""Pairing plan and determinism (``--pairing``, docs/methods.md "Options every method shares")."""

from __future__ import annotations

import numpy as np
import pytest

from mixgen.errors import MixgenError
from mixgen.methods import snapmix
from mixgen.pipeline.plan import Pairing, canvas_of, output_seed, plan_range

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])


def plan(mode: str, start: int, stop: int, seed: int = 0):
    return plan_range(start, stop, seed, Pairing(LABELS, mode), snapmix.draw, 64, {"beta": 5.0})


@pytest.mark.parametrize("mode", ["random", "cross-class", "same-class"])
def test_donor_is_never_the_canvas_and_respects_the_mode(mode):
    labels = LABELS if mode != "same-class" else np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    planned = plan_range(0, 500, 3, Pairing(labels, mode), snapmix.draw, 64, {"beta": 5.0})
    for p in planned:
        assert p.canvas != p.donor
        if mode == "cross-class":
            assert labels[p.canvas] != labels[p.donor]
        if mode == "same-class":
            assert labels[p.canvas] == labels[p.donor]
    donors = {p.donor for p in planned}
    assert donors == set(range(len(labels)))


def test_every_source_is_canvas_floor_or_ceil_times():
    n, total = len(LABELS), 47
    counts = np.bincount([canvas_of(5, n, i) for i in range(total)], minlength=n)
    assert set(counts) <= {total // n, -(-total // n)}


def test_output_i_does_not_depend_on_batching():
    whole = plan("random", 0, 40)
    pieces = plan("random", 0, 13) + plan("random", 13, 29) + plan("random", 29, 40)
    assert [(p.canvas, p.donor, p.seed, p.params) for p in whole] == [
        (p.canvas, p.donor, p.seed, p.params) for p in pieces
    ]
    assert plan("random", 17, 18)[0].params == whole[17].params


def test_seed_changes_the_plan_and_the_seed_column_replays_the_draws():
    assert [p.params for p in plan("random", 0, 5, seed=0)] != [p.params for p in plan("random", 0, 5, seed=1)]
    p = plan("random", 9, 10, seed=4)[0]
    assert p.seed == output_seed(4, 9)
    rng = np.random.default_rng(p.seed)
    Pairing(LABELS, "random").donor(rng, p.canvas)
    assert snapmix.draw(rng, 64, {"beta": 5.0}) == p.params


def test_impossible_pairings_are_refused():
    with pytest.raises(MixgenError, match="same-class"):
        Pairing(np.array([0, 0, 1]), "same-class")
    with pytest.raises(MixgenError, match="cross-class"):
        Pairing(np.array([0, 0, 0]), "cross-class")
    with pytest.raises(MixgenError, match="at least 2"):
        Pairing(np.array([0]), "random")


def test_one_class_sources_warn_or_refuse_by_pairing():
    from mixgen.pipeline.plan import one_class_warning

    classes = ["cat", "dog"]
    assert one_class_warning("src", classes, [0, 1, 1], "random") is None
    assert "both labels of every output are 'dog'" in one_class_warning("src", classes, [1, 1, 1], "random")
    assert one_class_warning("src", classes, [1, 1, 1], "same-class") is None
    with pytest.raises(MixgenError, match="one class only; --pairing cross-class needs 2"):
        one_class_warning("src", classes, [1, 1], "cross-class")
    with pytest.raises(MixgenError, match="same-class needs 2\\+ images per class; class 'cat' of SRC src has 1;"):
        one_class_warning("src", classes, [0, 1, 1], "same-class")


def test_a_dry_run_refuses_same_class_pairing_with_a_lonely_class(tmp_path):
    from tests.conftest import SAMPLE, one_line, run_cli

    index = tmp_path / "index.csv"
    index.write_text(
        f"path,label\n{SAMPLE}/cat/cat_0.jpg,cat\n{SAMPLE}/cat/cat_1.jpg,cat\n{SAMPLE}/rocket/rocket_0.jpg,rocket\n"
    )
    args = ("cutmix", index, tmp_path / "out", "--pairs", "4", "--size", "64", "--pairing", "same-class")
    dry = one_line(run_cli(*args, "--dry-run", expect=1).output)
    assert dry == one_line(run_cli(*args, expect=1).output) and "class 'rocket'" in dry
