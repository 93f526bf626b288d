"""MixSchedule: each epoch every photo once, as itself or as one of its own mixes, cycle by cycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mixgen.schedule import MixSchedule, mix_cycles, plan_epoch


def test_cycles_list_each_photos_mixes_in_output_order() -> None:
    canvases = ["b", "a", "c", "c", "b", "a", "x"]  # "x": not a training photo, ignored
    cycles = mix_cycles(canvases, ["a", "b", "c"])
    assert cycles.tolist() == [[1, 0, 2], [5, 4, 3]]
    uneven = mix_cycles(["a", "b", "a"], ["a", "b"])  # b has one mix: it repeats it
    assert uneven.tolist() == [[0, 1], [2, 1]]
    with pytest.raises(ValueError, match="1 photos are no canvas"):
        mix_cycles(["a"], ["a", "b"])


def test_each_epoch_takes_the_next_cycle_and_the_last_epochs_are_clean() -> None:
    cycles = np.arange(12).reshape(3, 4)
    for epoch in range(5):
        assert plan_epoch(cycles, epoch, 8, 1.0, 3, seed=0).tolist() == cycles[epoch % 3].tolist()
    for epoch in (5, 6, 7):
        assert (plan_epoch(cycles, epoch, 8, 1.0, 3, seed=0) == -1).all()
    assert (plan_epoch(cycles, 0, 8, 0.0, 0, seed=0) == -1).all()


def test_mixing_coins_follow_the_probability_and_the_seed() -> None:
    cycles = np.arange(4000).reshape(1, 4000)
    plan = plan_epoch(cycles, 0, 10, 0.3, 0, seed=5)
    assert abs((plan >= 0).mean() - 0.3) < 0.03
    assert np.array_equal(plan, plan_epoch(cycles, 0, 10, 0.3, 0, seed=5))
    assert not np.array_equal(plan, plan_epoch(cycles, 0, 10, 0.3, 0, seed=6))
    assert ((plan == -1) | (plan == np.arange(4000))).all()  # a photo is only ever replaced by its own mix


class Photos(Dataset):
    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        return torch.full((3, 4, 4), float(i)), i % 2


class FakeMixed:
    """What MixSchedule reads of a MixedDataset: classes, the source_a column, items."""

    def __init__(self, canvases: list[str]):
        import pyarrow as pa

        self.classes = ["dog", "cat"]  # the photos' class order differs: mapped by name
        self.table = pa.table({"source_a": canvases})

    def __getitem__(self, row: int):
        return torch.full((3, 4, 4), 100.0 + row), torch.tensor([0.25, 0.75])


def test_items_are_photos_with_one_hot_targets_or_their_mixes() -> None:
    paths = ["p0.jpg", "p1.jpg", "p2.jpg"]
    mixed = FakeMixed(["p2.jpg", "p0.jpg", "p1.jpg", "p1.jpg", "p2.jpg", "p0.jpg"])
    schedule = MixSchedule(mixed, Photos(3), paths, ["cat", "dog"], epochs=4, mix_prob=1.0, clean_epochs=1)
    assert len(schedule) == 3
    schedule.set_epoch(1)  # second cycle: rows 3, 4, 5 are the mixes of p1, p2, p0
    image, target = schedule[0]
    assert image[0, 0, 0] == 105 and target.tolist() == [0.25, 0.75]
    schedule.set_epoch(3)  # clean
    image, target = schedule[1]
    assert image[0, 0, 0] == 1 and target.tolist() == [1.0, 0.0]  # label 1 = "dog", the run's class 0
    with pytest.raises(ValueError, match="clean_epochs"):
        MixSchedule(mixed, Photos(3), paths, ["cat", "dog"], epochs=2, clean_epochs=3)
    with pytest.raises(ValueError, match="not in the mixed run"):
        MixSchedule(mixed, Photos(3), paths, ["cat", "bird"], epochs=2)


def test_a_real_run_fed_with_imagefolder_photos(tmp_path, sample_src) -> None:
    """The README's loop: ImageFolder photos (paths under SRC, class order of the folders) and a
    mixgen run of them; every epoch each photo once, as itself or as a mix with it as canvas."""
    from torchvision import datasets, transforms

    from mixgen import MixedDataset, MixSchedule
    from tests.conftest import run_cli

    out = tmp_path / "out"
    photos = datasets.ImageFolder(
        str(sample_src),
        transform=transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()]),
    )
    run_cli("cutmix", str(sample_src), str(out), "--pairs", str(2 * len(photos)), "--size", "64")
    mixed = MixedDataset(out)
    paths = [path for path, _ in photos.samples]
    feed = MixSchedule(
        mixed, photos, paths, photos.classes, src=sample_src, epochs=3, mix_prob=0.5, clean_epochs=1, seed=1
    )
    canvases = mixed.table.column("source_a").to_pylist()
    relative = [str(Path(p).relative_to(sample_src).as_posix()) for p in paths]
    for epoch in range(3):
        plan = feed.plan(epoch)
        used = plan[plan >= 0]
        assert all(canvases[row] == relative[j] for j, row in enumerate(plan) if row >= 0)
        assert (epoch == 2) == (len(used) == 0)  # the last epoch is clean
        assert all(row // len(photos) == epoch for row in used)  # cycle e: outputs e·n … (e+1)·n − 1
    feed.set_epoch(0)
    j = int(np.flatnonzero(feed.plan(0) == -1)[0])
    image, target = feed[j]
    assert image.shape == (3, 64, 64) and target[mixed.classes.index(photos.classes[photos.samples[j][1]])] == 1
    k = int(np.flatnonzero(feed.plan(0) >= 0)[0])
    image, target = feed[k]
    row = int(feed.plan(0)[k])
    assert torch.equal(target, mixed.target(row)) and torch.allclose(image, mixed[row][0])
