"""mixgen: CAM-guided mixed-image datasets on disk (SnapMix, Attentive CutMix, CutMix, MixUp,
ResizeMix, SaliencyMix, FMix, GridMix), with soft-label Parquet manifests.

The folders follow the pipeline: ``sources`` (scan SRC, decode views), ``cam`` (backbones and CAM
maths), ``methods`` (one file per mixing method), ``pipeline`` (the run, stage by stage), ``out``
(every file in OUT) and ``commands`` (verify, recompute, preview, cam, stats); ``cli`` is the thin
command line over them."""

from __future__ import annotations

from typing import Any

from mixgen.version import __version__

__all__ = ["MixSchedule", "MixedDataset", "snapmix_loss", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import mixgen` (and `mixgen --help`) never imports torch.
    if name in ("MixedDataset", "snapmix_loss"):
        from mixgen import dataset

        return getattr(dataset, name)
    if name == "MixSchedule":
        from mixgen.schedule import MixSchedule

        return MixSchedule
    raise AttributeError(f"module 'mixgen' has no attribute {name!r}")
