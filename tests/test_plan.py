"""The plan stage (``mixgen.pipeline.plan``): output i's canvas, donor and draw depend only on
(seed, i), and mixing batches are aligned to shards. Pairing modes are in test_pairing.py."""

from __future__ import annotations

import numpy as np
import pytest

from mixgen.pipeline.plan import Pairing, batch_of, canvas_of, output_seed, plan_range

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2]


def _draw(rng, size, options):
    return {"lam": float(rng.random()), "x": int(rng.integers(0, size)), "scale": options["scale"]}


def _plan(start, stop, seed=7):
    return plan_range(start, stop, seed, Pairing(np.array(LABELS), "random"), _draw, 32, {"scale": 2})


def test_output_seeds_are_deterministic_and_distinct():
    seeds = [output_seed(3, i) for i in range(2000)]
    assert seeds == [output_seed(3, i) for i in range(2000)]
    assert len(set(seeds)) == len(seeds)
    assert output_seed(3, 5) != output_seed(4, 5)


def test_canvases_visit_every_source_once_per_cycle():
    n = len(LABELS)
    for cycle in range(3):
        canvases = [canvas_of(11, n, i) for i in range(cycle * n, (cycle + 1) * n)]
        assert sorted(canvases) == list(range(n))


def test_a_planned_output_depends_only_on_seed_and_index():
    whole = _plan(0, 40)
    assert _plan(17, 31) == whole[17:31]
    assert [p.index for p in whole] == list(range(40))
    assert _plan(0, 40, seed=8) != whole


def test_each_output_draws_from_its_own_rng_donor_first():
    pairing = Pairing(np.array(LABELS), "random")
    for p in _plan(0, 20):
        assert p.seed == output_seed(7, p.index)
        assert p.canvas == canvas_of(7, len(LABELS), p.index)
        rng = np.random.default_rng(p.seed)
        assert pairing.donor(rng, p.canvas) == p.donor != p.canvas
        assert p.params == _draw(rng, 32, {"scale": 2})


@pytest.mark.parametrize(("pairs", "shard_size", "size"), [(100, 30, 8), (64, 64, 64), (10, 3, 2), (7, 100, 64)])
def test_mixing_batches_tile_each_shard_and_never_cross_one(pairs, shard_size, size):
    seen = []
    index = 0
    while index < pairs:
        start, stop = batch_of(index, pairs, shard_size, size)
        assert start == index and stop > start
        assert stop - start <= size
        assert start // shard_size == (stop - 1) // shard_size
        assert (start % shard_size) % size == 0
        assert all(batch_of(i, pairs, shard_size, size) == (start, stop) for i in range(start, stop))
        seen.extend(range(start, stop))
        index = stop
    assert seen == list(range(pairs))
