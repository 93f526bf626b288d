"""Planning: which source is the canvas and which the donor of output i, and the per-output
random generator. Everything about output i derives from (seed, i) alone, so any batch size,
worker count, shard split or resume gives the same output i."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mixgen.errors import MixgenError
from mixgen.options import PAIRINGS

if TYPE_CHECKING:
    from mixgen.config import RunConfig


def output_seed(seed: int, index: int) -> int:
    """The 63-bit seed of output i, from SeedSequence([seed, i]); the manifest's ``seed`` column.
    ``numpy.random.default_rng(row.seed)`` replays that output's draws."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def canvas_of(seed: int, n: int, index: int) -> int:
    """Canvas of output i: cycle c = i // n walks its own seeded permutation of the n sources, so
    every source is a canvas ⌊N/n⌋ or ⌈N/n⌉ times."""
    cycle, position = divmod(index, n)
    return int(_cycle_permutation(seed, n, cycle)[position])


@functools.lru_cache(maxsize=4)
def _cycle_permutation(seed: int, n: int, cycle: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, cycle], spawn_key=(1,))).permutation(n)


def one_class_warning(src: Any, classes: list[str], labels: Iterable[int], mode: str) -> str | None:
    """Sources of one class only: --pairing cross-class is refused; random pairing mixes anyway,
    but every output's two labels are then that class, so say so (None when 2+ classes have
    images, or --pairing same-class asks for exactly that). --pairing same-class with a class of
    one image is refused here too, by the class's name, so that a dry run refuses it."""
    labels = list(labels)
    present = sorted(set(labels))
    if mode == "same-class":
        counts = Counter(labels)
        lonely = [label for label in present if counts[label] == 1]
        if lonely:
            more = f" ({len(lonely)} classes have 1)" if len(lonely) > 1 else ""
            raise MixgenError(
                f"--pairing same-class needs 2+ images per class; class {classes[lonely[0]]!r} of SRC {src} "
                f"has 1{more}; add images or use --pairing random"
            )
    if len(present) >= 2:
        return None
    if mode == "cross-class":
        raise MixgenError(f"SRC {src} has one class only; --pairing cross-class needs 2+")
    if mode != "random" or not present:
        return None
    name = classes[present[0]]
    return (
        f"SRC has one class only ({name!r}): both labels of every output are {name!r}; "
        "add images of other classes (or pass --pairing same-class to mean it)"
    )


@dataclass
class Pairing:
    """Donor drawing for one source set. Sources are grouped by label once, so a draw is O(1)."""

    labels: np.ndarray
    mode: str = "random"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        self.by_label = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels)
        self.start = np.concatenate([[0], np.cumsum(counts)])
        self.rank_in_class = np.empty(n, dtype=np.int64)
        self.rank_in_class[self.by_label] = np.arange(n) - self.start[self.labels[self.by_label]]
        present = counts[counts > 0]
        if n < 2:
            raise MixgenError("mixing needs at least 2 readable source images")
        if self.mode == "cross-class" and len(present) < 2:
            raise MixgenError("--pairing cross-class needs images of at least 2 classes")
        if self.mode == "same-class" and present.min() < 2:
            lonely = int(np.flatnonzero(counts == 1)[0])
            raise MixgenError(
                f"--pairing same-class needs 2+ images per class; class id {lonely} has 1 (use --pairing random)"
            )
        if self.mode not in PAIRINGS:
            raise ValueError(self.mode)

    def donor(self, rng: np.random.Generator, canvas: int) -> int:
        label = self.labels[canvas]
        lo, hi = self.start[label], self.start[label + 1]
        if self.mode == "random":
            pick = int(rng.integers(len(self.labels) - 1))
            return pick + (pick >= canvas)
        if self.mode == "same-class":
            members = self.by_label[lo:hi]
            pick = int(rng.integers(hi - lo - 1))
            return int(members[pick + (pick >= self.rank_in_class[canvas])])
        pick = int(rng.integers(len(self.labels) - (hi - lo)))
        return int(self.by_label[pick + (hi - lo if pick >= lo else 0)])


@dataclass
class PlannedOutput:
    index: int
    seed: int
    canvas: int
    donor: int
    params: dict


def plan_range(
    start: int,
    stop: int,
    seed: int,
    pairing: Pairing,
    draw,
    size: int,
    options: dict,
) -> list[PlannedOutput]:
    """Plan outputs [start, stop): donor first, then the method's own draws, all from output i's rng."""
    n = len(pairing.labels)
    planned = []
    for index in range(start, stop):
        out_seed = output_seed(seed, index)
        rng = np.random.default_rng(out_seed)
        canvas = canvas_of(seed, n, index)
        donor = pairing.donor(rng, canvas)
        planned.append(PlannedOutput(index, out_seed, canvas, donor, draw(rng, size, options)))
    return planned


def mix_batch_size(cfg: RunConfig) -> int:
    """Outputs mixed together, in batches aligned to each shard's start. Fixed, not --batch-size:
    every output's floats then come from the same batch shapes (``mixgen verify --recompute``
    redoes whole batches for that reason)."""
    return 64 if cfg.size <= 256 else 32


def plan_outputs(cfg: RunConfig, pairing: Pairing, start: int, stop: int) -> list:
    """The plan of outputs [start, stop): ``plan_range`` with the method's draw and options (the
    one place both the run and ``verify --recompute`` take them from)."""
    return plan_range(start, stop, cfg.seed, pairing, cfg.declaration.draw, cfg.size, cfg.options)


def batch_of(index: int, pairs: int, shard_size: int, size: int) -> tuple[int, int]:
    """[start, stop) of the mixing batch that holds output ``index``: batches of ``size`` aligned
    to the start of its shard."""
    shard_start = index // shard_size * shard_size
    start = shard_start + (index - shard_start) // size * size
    return start, min(start + size, shard_start + shard_size, pairs)
