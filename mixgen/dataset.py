"""PyTorch access to a mixgen OUT folder: ``MixedDataset`` (all shards, dense soft targets) and
``snapmix_loss``, the per-sample loss of the SnapMix paper."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mixgen.output.reader import load_rows, read_output, run_metadata

META_KEYS = ("label_a", "label_b", "weight_a", "weight_b")


def decode_image(path: str | io.BytesIO) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a file or its bytes. Pillow reads every format mixgen
    writes (torchvision's own decoders are deprecated since 0.29)."""
    with Image.open(path) as pil:
        array = np.array(pil.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


class MixedDataset(Dataset):
    """The mixed images of one OUT folder (every shard, ordered by output index).

    ``dataset[i]`` is ``(image, target)``: ``image`` a float32 (3, H, W) tensor in [0, 1] (passed
    through ``transform`` when given), ``target`` a float32 tensor of length ``len(classes)``:

    - ``normalize=True``: the manifest's ``targets`` column, a soft label summing to 1 with a class
      shared by canvas and donor merged. Use it with ``F.cross_entropy(logits, target)``.
    - ``normalize=False``: ``weight_a`` at ``label_a`` plus ``weight_b`` at ``label_b``, unnormalised.
      ``-(target * log_softmax(logits)).sum(1)`` then equals ``snapmix_loss`` exactly, including
      SnapMix's same-label rows (both weights are ρ_a + ρ_b there, so the class gets twice that,
      as in the official code).

    With ``return_meta=True`` items are ``(image, target, meta)``, ``meta`` a dict of 0-d tensors
    ``label_a``, ``label_b`` (int64), ``weight_a``, ``weight_b`` (float32) and ``index`` (int64);
    the default collate turns it into a dict of (B,) tensors, the batch format of ``snapmix_loss``.
    ``table`` holds every manifest column (plus ``image_path``) for anything else. Runs written
    with ``--writer webdataset`` are read the same way, each image from its byte range in the
    shard's tar.
    """

    def __init__(
        self,
        out: str | Path,
        normalize: bool = True,
        transform: Callable[[torch.Tensor], Any] | None = None,
        return_meta: bool = False,
    ) -> None:
        self.out = Path(out)
        self.normalize = normalize
        self.transform = transform
        self.return_meta = return_meta
        self.classes: list[str] = list(run_metadata(self.out)["classes"])
        self.table = load_rows(self.out)
        # Arrow and numpy columns, no per-row Python objects: forked DataLoader workers share
        # them instead of copying them page by page as reference counts change.
        self._paths = self.table.column("image_path").combine_chunks()
        # WebDataset shards: each image is a byte range of its shard's tar.
        self._offsets_in_tar = self._sizes_in_tar = None
        if "image_offset" in self.table.column_names:
            self._offsets_in_tar = np.array(self.table.column("image_offset"), dtype=np.int64)
            self._sizes_in_tar = np.array(self.table.column("image_size"), dtype=np.int64)
        column = self.table.column
        self.index = np.array(column("index"), dtype=np.int64)
        self.label_a = np.array(column("label_a"), dtype=np.int64)
        self.label_b = np.array(column("label_b"), dtype=np.int64)
        self.weight_a = np.array(column("weight_a"), dtype=np.float32)
        self.weight_b = np.array(column("weight_b"), dtype=np.float32)
        targets = column("targets").combine_chunks()
        self._offsets = np.array(targets.offsets, dtype=np.int64)
        self._target_ids = np.array(targets.values.field("class_id"), dtype=np.int64)
        self._target_weights = np.array(targets.values.field("weight"), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._paths)

    def target(self, i: int) -> torch.Tensor:
        """The dense soft label of item ``i`` (see the class docstring for ``normalize``)."""
        dense = torch.zeros(len(self.classes), dtype=torch.float32)
        if self.normalize:
            start, stop = self._offsets[i], self._offsets[i + 1]
            ids = torch.from_numpy(self._target_ids[start:stop])
            dense.index_add_(0, ids, torch.from_numpy(self._target_weights[start:stop]))
        else:
            dense[int(self.label_a[i])] += float(self.weight_a[i])
            dense[int(self.label_b[i])] += float(self.weight_b[i])
        return dense

    def meta(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "label_a": torch.tensor(int(self.label_a[i])),
            "label_b": torch.tensor(int(self.label_b[i])),
            "weight_a": torch.tensor(float(self.weight_a[i]), dtype=torch.float32),
            "weight_b": torch.tensor(float(self.weight_b[i]), dtype=torch.float32),
            "index": torch.tensor(int(self.index[i])),
        }

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = int(i) % len(self)
        if self._offsets_in_tar is None:
            image = decode_image(self._paths[i].as_py())
        else:
            data = read_output(self._paths[i].as_py(), int(self._offsets_in_tar[i]), int(self._sizes_in_tar[i]))
            image = decode_image(io.BytesIO(data))
        if self.transform is not None:
            image = self.transform(image)
        if self.return_meta:
            return image, self.target(i), self.meta(i)
        return image, self.target(i)


def snapmix_loss(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor] | Sequence[Any],
    reduction: str = "mean",
) -> torch.Tensor:
    """SnapMix's training loss, ``ρ_a·CE(ŷ, y_a) + ρ_b·CE(ŷ, y_b)`` per sample (Huang et al. 2021).

    ``batch`` is a mapping with (B,) tensors ``label_a``, ``label_b`` (int64) and ``weight_a``,
    ``weight_b`` (float), e.g. the collated ``meta`` of ``MixedDataset(out, return_meta=True)``;
    a whole ``(images, target, meta)`` batch is accepted too::

        loader = DataLoader(MixedDataset(out, return_meta=True), batch_size=64, shuffle=True)
        for images, _, meta in loader:
            loss = snapmix_loss(model(images), meta)

    The weights are the raw manifest values (not renormalised), as in the official code; the
    ``mean`` over the batch matches its ``torch.mean(loss_a * lam_a + loss_b * lam_b)``.
    ``reduction`` is ``mean``, ``sum`` or ``none`` (per-sample losses).
    """
    meta = batch if isinstance(batch, Mapping) else batch[-1]
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise KeyError(f"snapmix_loss: batch lacks {', '.join(missing)}; use MixedDataset(out, return_meta=True)")
    device = logits.device
    loss_a = F.cross_entropy(logits, meta["label_a"].to(device), reduction="none")
    loss_b = F.cross_entropy(logits, meta["label_b"].to(device), reduction="none")
    dtype = loss_a.dtype
    per_sample = meta["weight_a"].to(device, dtype) * loss_a + meta["weight_b"].to(device, dtype) * loss_b
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
