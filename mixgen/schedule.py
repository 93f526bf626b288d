"""``MixSchedule``: train on your photos and a mixgen OUT the way the training benchmark does.

Offline mixes replace online mixing only when they are fed like it: in each epoch every training
photo appears once, as itself or (with probability ``mix_prob``) as a mix whose canvas is that
photo; each epoch takes the next cycle of mixes (mixgen's canvas order visits every photo once per
``len(photos)`` outputs) while they last, then starts over; the last ``clean_epochs`` show clean
photos only (ReLabel and the SnapMix code end on unmixed images). The coins and the choice of a
mix depend on ``(seed, epoch, photo)`` alone, so a run is reproducible and workers agree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mixgen.dataset import MixedDataset


class MixSchedule(Dataset):
    """Item ``i`` of epoch ``e``: photo ``i`` or one of its mixes, as ``(image, target)``.

    ``photos`` yields ``(image, label)`` with ``label`` an index into ``classes`` (a torchvision
    ``ImageFolder`` does); ``photo_paths[i]`` is photo i's path as mixgen's manifest names it
    (``source_a``: relative to SRC), or any path to it when ``src`` is given. Targets are dense
    soft labels over the mixed run's classes (the manifest's; photos' labels are mapped by class name), so one
    ``cross_entropy(logits, target)`` serves both kinds of item. Call ``set_epoch`` before each
    epoch, as with ``DistributedSampler``; ``transform`` applies to both kinds of image.
    """

    def __init__(
        self,
        mixed: MixedDataset,
        photos: Dataset,
        photo_paths: Sequence[str | Path],
        classes: Sequence[str],
        *,
        epochs: int,
        mix_prob: float = 1.0,
        clean_epochs: int = 0,
        seed: int = 0,
        src: str | Path | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"mix_prob must lie in [0, 1], got {mix_prob}")
        if not 0 <= clean_epochs <= epochs:
            raise ValueError(f"clean_epochs must lie in [0, epochs={epochs}], got {clean_epochs}")
        if len(photo_paths) != len(photos):
            raise ValueError(f"{len(photo_paths)} photo_paths for {len(photos)} photos")
        self.mixed, self.photos, self.transform = mixed, photos, transform
        self.epochs, self.mix_prob, self.clean_epochs, self.seed = epochs, mix_prob, clean_epochs, seed
        unknown = sorted(set(classes) - set(mixed.classes))
        if unknown:
            raise ValueError(f"photo classes not in the mixed run: {', '.join(unknown[:5])}")
        self._to_mixed = np.array([mixed.classes.index(name) for name in classes], dtype=np.int64)
        canvases = mixed.table.column("source_a").to_pylist()
        self.cycles = mix_cycles(canvases, [_relative(p, src) for p in photo_paths])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.photos)

    def plan(self, epoch: int) -> np.ndarray:
        """(photos,) the mix row each photo is replaced by in ``epoch``, or −1 for the photo itself."""
        return plan_epoch(self.cycles, epoch, self.epochs, self.mix_prob, self.clean_epochs, self.seed)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        row = int(self.plan(self.epoch)[i])
        if row >= 0:
            image, target = self.mixed[row][:2]
        else:
            image, label = self.photos[i][:2]
            target = torch.zeros(len(self.mixed.classes))
            target[self._to_mixed[int(label)]] = 1.0
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def mix_cycles(canvases: Sequence[str], photo_paths: Sequence[str]) -> np.ndarray:
    """(cycles, photos): row of the c-th mix whose canvas is photo j, in output order; a photo with
    fewer mixes than the others repeats its own (mixgen's canvases differ by at most one)."""
    index = {path: j for j, path in enumerate(photo_paths)}
    rows: list[list[int]] = [[] for _ in photo_paths]
    for row, canvas in enumerate(canvases):
        j = index.get(canvas)
        if j is not None:
            rows[j].append(row)
    missing = [photo_paths[j] for j, found in enumerate(rows) if not found]
    if missing:
        raise ValueError(f"{len(missing)} photos are no canvas of the mixed run (first: {missing[0]})")
    cycles = max(len(found) for found in rows)
    return np.array([[found[c % len(found)] for found in rows] for c in range(cycles)], dtype=np.int64)


def plan_epoch(
    cycles: np.ndarray, epoch: int, epochs: int, mix_prob: float, clean_epochs: int, seed: int
) -> np.ndarray:
    """The replacement of each photo in ``epoch`` (−1: itself): cycle ``epoch mod cycles``, each
    photo mixed with probability ``mix_prob``, none in the last ``clean_epochs``."""
    photos = cycles.shape[1]
    if epoch >= epochs - clean_epochs or mix_prob <= 0:
        return np.full(photos, -1, dtype=np.int64)
    coins = np.random.default_rng([seed, epoch]).random(photos) < mix_prob
    return np.where(coins, cycles[epoch % len(cycles)], -1)


def _relative(path: str | Path, src: str | Path | None) -> str:
    """``path`` as the manifest's ``source_a`` names it: relative to SRC."""
    if src is None:
        return Path(path).as_posix()
    try:
        return Path(path).resolve().relative_to(Path(src).resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not under src {src}") from None
