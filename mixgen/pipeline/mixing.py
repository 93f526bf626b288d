"""Mixing: a batch of planned outputs becomes its mixed images (still on the device) and their
manifest rows, through the method's declaration (``mixgen.methods``) and the label-weight rule.
``MixContext`` holds what every batch of a run shares: the prepared sources and each source's
method inputs, computed once per source, not per pair, and (--label-weights teacher) the CAM pass
whose backbone and head look at each mixed image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mixgen.config import RunConfig
    from mixgen.pipeline.prepare import Prepared
    from mixgen.sources.index import SourceIndex


@dataclass
class MixContext:
    cfg: RunConfig
    index: SourceIndex
    positions: np.ndarray  # readable source positions; plan indices point into this
    prepared: Prepared
    device: Any
    file_name: Callable[[int], str]  # the writer's name of output i (mixgen.output.writers)
    campass: Any = None  # the run's CamPass: the teacher of --label-weights teacher
    labels: np.ndarray = field(init=False)
    source_inputs: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    label_maps: np.ndarray | None = field(init=False)  # what the label rule weighs regions with

    def __post_init__(self) -> None:
        from mixgen.methods import SourceData

        self.labels = np.array([s.label for s in self.index.items], dtype=np.int64)
        sources = SourceData(
            self.prepared.views, self.prepared.maps, self.prepared.readable, self.cfg.size, self.device
        )
        # Once per source, not per pair.
        for name, source_input in self.cfg.declaration.inputs.items():
            self.source_inputs[name] = source_input.compute(sources, self.cfg.options)
        self.label_maps = self.prepared.maps
        if self.cfg.label_weights == "boxes":
            from mixgen.sources.boxes import box_maps

            self.label_maps = box_maps(self.index, self.cfg.size, self.cfg.resize, self.prepared.readable)[0]

    @property
    def teacher(self) -> Callable[[Any], Any] | None:
        """Mixed images -> their posterior over the run's classes, for --label-weights teacher."""
        from mixgen.methods import TEACHER

        if self.cfg.label_weights != TEACHER:
            return None
        if self.campass is None:
            raise ValueError("--label-weights teacher needs the run's CAM pass (backbone and head)")
        return self.campass.posterior


def _as_box(row: np.ndarray) -> dict[str, int]:
    return dict(zip(("x0", "y0", "x1", "y1"), (int(v) for v in row), strict=True))


def mix_batch(ctx: MixContext, planned: list) -> tuple[Any, list[dict[str, Any]]]:
    """Mix one batch of planned outputs; returns the (B, 3, S, S) uint8 images, still on the
    device, and their manifest rows (without sha256)."""
    import torch

    from mixgen.methods import Batch, mask_runs
    from mixgen.methods.labels import mix_with_label_weights
    from mixgen.output.manifest import soft_targets

    cfg, device = ctx.cfg, ctx.device
    canvas_pos = ctx.positions[[p.canvas for p in planned]]
    donor_pos = ctx.positions[[p.donor for p in planned]]
    views = ctx.prepared.views

    def load(pos: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(views.read(pos)).to(device).permute(0, 3, 1, 2)

    def per_source(array: np.ndarray | None, pos: np.ndarray) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array[pos]).to(device)

    label_a, label_b = ctx.labels[canvas_pos], ctx.labels[donor_pos]
    maps = ctx.label_maps
    batch = Batch(
        canvas=load(canvas_pos),
        donor=load(donor_pos),
        params=[p.params for p in planned],
        options=cfg.options,
        same_label=torch.from_numpy(label_a == label_b).to(device),
        maps_a=per_source(maps, canvas_pos),
        maps_b=per_source(maps, donor_pos),
        inputs_a={name: per_source(array, canvas_pos) for name, array in ctx.source_inputs.items()},
        inputs_b={name: per_source(array, donor_pos) for name, array in ctx.source_inputs.items()},
        label_a=torch.from_numpy(label_a).to(device),
        label_b=torch.from_numpy(label_b).to(device),
    )
    result = mix_with_label_weights(cfg.declaration, batch, cfg.label_weights, ctx.teacher)

    weight_a, weight_b = result.weight_a.cpu().numpy(), result.weight_b.cpu().numpy()
    area = result.area_ratio.cpu().numpy()
    has_box = result.has_box.cpu().numpy() if result.has_box is not None else np.zeros(len(planned), bool)
    box_a = result.box_a.cpu().numpy() if result.box_a is not None else None
    box_b = result.box_b.cpu().numpy() if result.box_b is not None else None
    cells = result.cells.cpu().numpy() if result.cells is not None else None
    masks = result.mask.cpu().numpy() if result.mask is not None else None
    lam = result.lam.cpu().numpy() if result.lam is not None else None

    rows = []
    for j, p in enumerate(planned):
        a, b = ctx.index.items[canvas_pos[j]], ctx.index.items[donor_pos[j]]
        rows.append(
            {
                "file_name": ctx.file_name(p.index),
                "index": p.index,
                "method": cfg.method,
                "source_a": a.path,
                "source_b": b.path,
                "label_a": a.label,
                "label_b": b.label,
                "class_a": ctx.index.classes[a.label],
                "class_b": ctx.index.classes[b.label],
                "weight_a": float(weight_a[j]),
                "weight_b": float(weight_b[j]),
                "targets": soft_targets(a.label, b.label, weight_a[j], weight_b[j]),
                "box_a": _as_box(box_a[j]) if has_box[j] else None,
                "box_b": _as_box(box_b[j]) if has_box[j] else None,
                "cells": [int(c) for c in cells[j] if c >= 0] if cells is not None else None,
                "mask": mask_runs(masks[j]) if masks is not None else None,
                "label_weights": cfg.label_weights,
                "lam": float(lam[j]) if lam is not None else p.params.get("lam"),
                "area_ratio": float(area[j]),
                "seed": p.seed,
                "width": cfg.size,
                "height": cfg.size,
            }
        )
    return result.images, rows
